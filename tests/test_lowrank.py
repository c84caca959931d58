"""Low-rank codec, token levels, latent attention and the lowrank / tale / dynakv methods."""
import json

import pytest
import torch
from conftest import greedy, tiny_gemma3, tiny_llama
from transformers import DynamicCache

import kvshrink as ks
from kvshrink import attention
from kvshrink.bases import bases_profile, lowrank_recipe
from kvshrink.codecs.lowrank import DROP, Level, LevelStore, energy, fit_basis, level_token_bytes, parse_levels
from kvshrink.codecs.packing import packed_size
from kvshrink.layers import LatentLayer
from kvshrink.layers.full import FullLayer
from kvshrink.policies.significance import assign_levels, level_counts, level_fractions
from kvshrink.profile import ProfileError, load_profile


def _orthonormal(groups, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(groups, dim, dim, generator=g)).Q


def test_fit_basis_finds_the_subspace_and_sorts_by_energy():
    g = torch.Generator().manual_seed(0)
    true = _orthonormal(1, 16, 1)[0][:, :4]  # data of rank 4 in 16 dims
    x = (torch.randn(500, 4, generator=g) * torch.tensor([8.0, 4.0, 2.0, 1.0])) @ true.T
    basis, sigma = fit_basis((x.T @ x)[None], 500)
    assert torch.allclose(basis[0].T @ basis[0], torch.eye(16), atol=1e-5)
    assert (sigma[0][:-1] >= sigma[0][1:]).all()
    rebuilt = (x @ basis[0][:, :4]) @ basis[0][:, :4].T
    assert torch.allclose(rebuilt, x, atol=1e-3)
    assert energy(sigma)[0, 3] > 0.9999 and energy(sigma)[0, 2] < 0.999


def test_parse_levels():
    assert parse_levels("r16b4/r64b2/r32b3") == (Level(64, 2), Level(32, 3), Level(16, 4))
    for bad, msg in (("16:4", "not r<rank>b<bits>"), ("r0b4", "between 1"), ("r8b5", "bits 5"),
                     ("r8b4/r8b4", "repeats"), ("", "at least one")):
        with pytest.raises(ValueError, match=msg):
            parse_levels(bad, 64)
    with pytest.raises(ValueError, match="between 1 and 64"):
        parse_levels("r128b4", 64)


@pytest.mark.parametrize("target", [0.07, 0.1, 0.15, 0.2, 0.3])
@pytest.mark.parametrize("top", [0.0, 0.1, 0.5])
def test_level_fractions_spend_the_target_and_never_more(target, top):
    costs = [0.29, 0.16, 0.1, 0.066]
    f = level_fractions(costs, target, top)
    assert abs(sum(f) - 1) < 1e-9 and min(f) >= 0
    spent = sum(a * c for a, c in zip(f, costs))
    assert spent <= min(target, costs[0]) + 1e-9
    assert spent >= min(target, costs[0]) - 1e-9  # the budget is spent, not only respected
    counts = level_counts(1000, f)
    assert sum(counts) == 1000
    assert sum(n * c for n, c in zip(counts, costs)) / 1000 <= min(target, costs[0]) + 1e-9


def test_level_fractions_refuse_a_target_below_the_cheapest_level():
    with pytest.raises(ValueError, match="below the cheapest"):
        level_fractions([0.3, 0.1], 0.05, 0.1)


def test_assign_levels_gives_the_best_scores_the_finest_level():
    scores = torch.tensor([[[0.1, 0.9, 0.3, 0.7, 0.2, 0.5]]])
    levels = assign_levels(scores, [2, 1, 3])
    assert levels.tolist() == [[[2, 0, 2, 0, 2, 1]]]
    with pytest.raises(ValueError, match="do not add up"):
        assign_levels(scores, [2, 2, 3])


def test_level_store_rebuilds_each_token_at_its_rank():
    torch.manual_seed(0)
    levels = (Level(8, 16), Level(4, 16), Level(2, 16))
    store = LevelStore(levels, 8, "t")
    basis, sigma = _orthonormal(2, 8, 3), torch.rand(2, 8) + 0.5
    coeffs = torch.randn(1, 2, 12, 8)
    lmap = assign_levels(torch.rand(1, 2, 12), [3, 4, 5])
    store.append(coeffs, lmap)
    out = store.reconstruct(lmap, basis, sigma)
    for g in range(2):
        for t in range(12):
            r = levels[int(lmap[0, g, t])].rank
            want = basis[g][:, :r] @ (coeffs[0, g, t, :r].half().float() * sigma[g, :r])
            assert torch.allclose(out[0, g, t], want, atol=1e-5)


def test_a_centred_level_store_codes_offset_coefficients_far_better():
    # coefficients with a constant offset 50x their spread (Qwen2's keys: a bias along one direction); one 4-bit
    # group per token spends its range on the offset unless the level's mean is subtracted first
    torch.manual_seed(0)
    levels = (Level(16, 4),)
    basis, sigma = _orthonormal(1, 16, 5), torch.ones(1, 16)
    offset = torch.zeros(16)
    offset[0] = 50.0
    first, later = torch.randn(1, 1, 64, 16) + offset, torch.randn(1, 1, 8, 16) + offset
    err = {}
    for center in ("none", "channel"):
        store = LevelStore(levels, 16, "t", center)
        lmap = torch.zeros(1, 1, 64, dtype=torch.uint8)
        store.append(first, lmap)
        store.append(later, torch.zeros(1, 1, 8, dtype=torch.uint8))  # later blocks reuse the first block's mean
        lmap = torch.zeros(1, 1, 72, dtype=torch.uint8)
        want = torch.cat([first, later], 2)[0] @ basis[0].T
        err[center] = (store.reconstruct(lmap, basis, sigma)[0] - want).pow(2).mean().sqrt().item()
        assert bool(store.parts()["means"]) == (center == "channel")
    assert err["channel"] < err["none"] / 10, err
    with pytest.raises(ValueError, match="center must be one of"):
        LevelStore(levels, 16, "t", "head")


def _layer(mode, kv_heads, head_dim, groups, levels, fractions, seed=0, significance="attention", center="none",
           coeff_axis="token", coeff_group=32):
    row = kv_heads // groups * head_dim
    kb, vb = _orthonormal(groups, row, seed), _orthonormal(groups, row, seed + 1)
    ks_, vs_ = torch.rand(groups, row) + 0.5, torch.rand(groups, row) + 0.5
    rank = max(lv.rank for lv in levels)
    return LatentLayer(kb[..., :rank], ks_[..., :rank], vb[..., :rank], vs_[..., :rank], levels, fractions,
                       kv_heads=kv_heads, window=4, sinks=2, block=4, code_group=row, layer_idx=0, mode=mode,
                       observe=3, significance=significance, basis_dtype=torch.float32, center=center,
                       coeff_axis=coeff_axis, coeff_group=coeff_group)


@pytest.mark.parametrize("q_heads,kv_heads,head_dim,joint", [(4, 2, 64, False), (9, 3, 64, False), (4, 4, 64, False),
                                                             (2, 1, 256, False), (6, 3, 64, True), (4, 1, 256, True)])
@pytest.mark.parametrize("spec", ["r64b16", "r64b4/r32b4/r16b2/r8b3", "r16b8/r8b2", "r16b8/r8b2/drop",
                                  "r16b8/r8b2/drop/mean", "r64b4/r16b8/r8b2/drop/channel"])
def test_latent_attention_equals_reconstruct_then_attend(q_heads, kv_heads, head_dim, joint, spec):
    torch.manual_seed(0)
    row = kv_heads * head_dim if joint else head_dim
    center = "channel" if spec.endswith("/mean") else "none"
    axis = "channel" if spec.endswith("/channel") else "token"  # groups of 4 tokens: some coded, some pending
    spec = spec.removesuffix("/mean").removesuffix("/channel")
    levels = parse_levels(spec.replace("r64", f"r{min(64, row)}").replace("/drop", ""), row)
    levels = (*levels, DROP) if spec.endswith("/drop") else levels
    fractions = [1.0 / len(levels)] * len(levels)
    fractions[-1] = 1 - sum(fractions[:-1])
    layer = _layer("latent", kv_heads, head_dim, 1 if joint else kv_heads, levels, fractions, center=center,
                   coeff_axis=axis, coeff_group=4)
    scaling = head_dim ** -0.5
    for step, n in enumerate([23, 1, 1, 5, 1, 1, 1, 1, 1]):  # prefill, decode steps, a 5-token chunk, ...
        k, v = torch.randn(2, kv_heads, n, head_dim), torch.randn(2, kv_heads, n, head_dim)
        layer.update(k, v)
        q = torch.randn(2, q_heads, n, head_dim) * 3
        held = layer.held()
        mask = torch.ones(2, 1, n, held, dtype=torch.bool).tril(held - n)
        mask[1, :, :, :3] = False  # left padding in the second sequence
        latent, p1 = layer.attention(q, mask, scaling, "latent")
        recon, p2 = layer.attention(q, mask, scaling, "reconstruct")
        assert torch.allclose(latent, recon, atol=2e-5, rtol=1e-4), (step, (latent - recon).abs().max())
        assert torch.allclose(p1, p2, atol=1e-6)
        layer.attend(q, mask, scaling)
    assert layer.level_map.shape[-1] > 0 and len(set(layer.level_map.flatten().tolist())) == len(levels)
    if axis == "channel":  # both kinds of tokens were attended: coded groups and a pending tail
        assert any(p is not None for p in layer.key_store.pending)
        assert any(st is not None and st.tokens for st in layer.key_store.stores)


def test_bytes_follow_the_levels_assigned():
    levels = (Level(32, 4), Level(16, 3), Level(8, 2))
    layer = _layer("latent", 2, 32, 2, levels, (0.25, 0.25, 0.5), significance="norm")
    layer.update(torch.randn(1, 2, 70, 32), torch.randn(1, 2, 70, 32))
    layer.attend(torch.randn(1, 4, 70, 32), None, 0.2)
    layer.update(torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32))  # the lazy flush happens here
    counts = [s.tokens for s in layer.key_store.stores]
    assert sum(counts) == 64 and counts == [16, 16, 32]
    parts = {p: sum(t.numel() * t.element_size() for t in ts) for p, ts in layer.parts().items()}
    per_token = [level_token_bytes(lv, 32) for lv in levels]
    assert per_token == [packed_size(32, 4) + 4, packed_size(16, 3) + 4, packed_size(8, 2) + 4]
    want = 2 * 2 * sum(n * c for n, c in zip(counts, per_token))  # keys and values, 2 heads (batch 1)
    assert parts["codes"] + parts["scales"] == want
    assert parts["levels"] == 2 * 64  # one uint8 per token and head


@pytest.mark.parametrize("kv_heads,groups", [(2, 2), (2, 1)])
def test_dropped_tokens_are_evicted_exactly(kv_heads, groups):
    """Full-rank fp16 coefficients for the kept tokens and a DROP level for the rest: attention equals exact
    attention over the tokens kept (sinks, kept, window), the dropped ones cost only their level byte."""
    torch.manual_seed(0)
    head_dim, row = 16, kv_heads // groups * 16
    layer = _layer("latent", kv_heads, head_dim, groups, (Level(row, 16), DROP), (0.5, 0.5))
    keys, values = torch.randn(1, kv_heads, 42, head_dim), torch.randn(1, kv_heads, 42, head_dim)
    layer.update(keys[:, :, :41], values[:, :, :41])
    layer.attend(torch.randn(1, 2 * kv_heads, 41, head_dim), None, 0.25)
    layer.update(keys[:, :, 41:], values[:, :, 41:])  # the flush: tokens 2..37 leave the window, half dropped
    lmap = layer.level_map  # [1, groups, n]: the tokens flushed (whole blocks), the rest still in the window
    n = lmap.shape[-1]
    assert n >= 32 and int((lmap == 1).sum()) == (n - n // 2) * groups
    q = torch.randn(1, 2 * kv_heads, 1, head_dim)
    out = layer.attend(q, None, 0.25)
    for h in range(2 * kv_heads):
        kv, g = h // 2, (h // 2) // (kv_heads // groups)
        kept = torch.cat([torch.ones(2, dtype=torch.bool), lmap[0, g] == 0, torch.ones(40 - n, dtype=torch.bool)])
        p = torch.softmax(q[0, h] @ keys[0, kv, kept].T * 0.25, -1)
        assert torch.allclose(out[0, h], p @ values[0, kv, kept], atol=2e-3), h  # fp16 coefficients
    assert layer.key_store.tokens == n // 2
    assert layer.describe()["levels"] == {f"r{row}b16": n // 2, "dropped": n - n // 2}
    parts = {p: sum(t.numel() * t.element_size() for t in ts) for p, ts in layer.parts().items()}
    assert parts["levels"] == groups * n
    assert parts["codes"] == 2 * groups * (n // 2) * level_token_bytes(Level(row, 16), row)


def test_tale_keep_evicts_the_least_significant_share_within_the_target():
    model = tiny_llama()
    prompt = torch.randint(2, 95, (1, 300), generator=torch.Generator().manual_seed(4))
    prof = _bases(model, "dynakv")
    for keep in (1.0, 0.5, 0.25):
        cache = ks.make_cache(model, ks.build_method("dynakv", target_ratio=0.12, keep=keep, pool=7, window=8,
                                                     sinks=2).use_profile(prof))
        greedy(model, prompt, cache, n=4)
        report = cache.memory_report()
        levels = report["by_layer"][0]["levels"]
        stored = sum(levels.values())
        assert ("dropped" in levels) == (keep < 1)
        dropped = levels.get("dropped", 0)  # every flush rounds the kept levels down, eviction takes the rest
        assert (1 - keep) * stored - 1e-9 <= dropped <= (1 - keep) * stored + 0.03 * stored
        approx = report["nbytes"] - sum(report["by_part"][p] for p in ("bases", "window", "sinks"))
        assert approx <= 0.12 * report["fp16_nbytes"]  # the evicted tokens' level bytes are inside the target
    with pytest.raises(ValueError, match="keep must be in"):
        ks.build_method("dynakv", keep=0)
    with pytest.raises(ValueError, match="pool must be an odd"):
        ks.build_method("tale", pool=4)
    with pytest.raises(ValueError, match="mean must be one of none, channel"):
        ks.build_method("dynakv", mean="head")
    with pytest.raises(ValueError, match="with keep=0.9"):
        ks.make_cache(model, ks.build_method("tale", target_ratio=0.01, keep=0.9).use_profile(_bases(model)))


def test_exact_layers_keep_a_plain_cache_and_are_checked():
    model = tiny_llama()
    prof = _bases(model, "dynakv")
    prompt = torch.randint(2, 95, (1, 120), generator=torch.Generator().manual_seed(5))
    ref = DynamicCache(config=model.config)
    cache = ks.make_cache(model, ks.build_method("dynakv", target_ratio=0.3, exact_layers="0").use_profile(prof))
    with torch.no_grad():
        model(prompt, past_key_values=ref, use_cache=True)
        model(prompt, past_key_values=cache, use_cache=True)
    assert isinstance(cache.layers[0], FullLayer) and isinstance(cache.layers[1], LatentLayer)
    assert torch.equal(cache.layers[0].keys, ref.layers[0].keys)  # layer 0's cache untouched
    # layer 0's keys and values are in the reported bytes, at their own size
    assert cache.memory_report()["by_part"]["window"] >= 2 * ref.layers[0].keys.nbytes
    with pytest.raises(ValueError, match="exact_layers must be layer indices"):
        ks.build_method("tale", exact_layers="first")
    with pytest.raises(ValueError, match=r"exact_layers \[7\] are beyond the model's"):
        ks.make_cache(model, ks.build_method("tale", exact_layers="0/7").use_profile(_bases(model)))


def _bases(model, method="tale", seed=0):
    ids = torch.randint(2, 95, (1, 512), generator=torch.Generator().manual_seed(seed))
    return bases_profile(model, ids, method=method, samples=2, context=256, progress=False)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
@pytest.mark.parametrize("method", ["lowrank", "tale", "dynakv"])
def test_full_rank_16_bit_coefficients_reproduce_full(make, method):
    model = make()
    head_dim = model.config.head_dim
    row = head_dim * (model.config.num_key_value_heads if method == "dynakv" else 1)
    opts = dict(exact_dtype="model", basis_dtype="float32")
    if method == "lowrank":
        opts.update(rank=row, bits=16)
    else:
        opts.update(levels=f"r{row}b16", target_ratio=2.0)
    prompt = torch.randint(2, 95, (2, 90), generator=torch.Generator().manual_seed(3))
    ref = greedy(model, prompt, DynamicCache(config=model.config), n=20)
    cache = ks.build_method(method, **opts).use_profile(_bases(model, method)).make_cache(model)
    out = greedy(model, prompt, cache, n=20)
    assert torch.equal(out, ref)
    assert cache.memory_report()["by_part"]["codes"] > 0  # tokens really went through the coefficient store


def test_tale_compresses_and_differs_at_a_low_target():
    model = tiny_llama()
    prompt = torch.randint(2, 95, (1, 300), generator=torch.Generator().manual_seed(4))
    ref = greedy(model, prompt, DynamicCache(config=model.config), n=16)
    method = ks.build_method("tale", target_ratio=0.25, window=8, sinks=2).use_profile(_bases(model))
    cache = ks.make_cache(model, method)
    out = greedy(model, prompt, cache, n=16)
    report = cache.memory_report()
    levels = report["by_layer"][0]["levels"]
    assert sum(levels.values()) > 0 and len([n for n in levels.values() if n]) >= 2
    per_token = report["nbytes"] - report["by_part"]["bases"] - report["by_part"]["window"] - report["by_part"]["sinks"]
    assert per_token <= 0.25 * report["fp16_nbytes"]  # the approximated tokens keep to the target
    assert report["nbytes"] < 0.5 * report["fp16_nbytes"]
    assert not torch.equal(out, ref)  # a quarter of the bytes is not lossless on random weights


def test_low_rank_profiles_round_trip_and_are_checked(tmp_path):
    model = tiny_llama()
    prof = _bases(model)
    path = prof.save(tmp_path / "b.json")
    back = load_profile(path)
    assert set(back.tensors) == set(prof.tensors)
    assert all(torch.equal(back.tensors[k], prof.tensors[k]) for k in prof.tensors)
    ks.make_cache(model, "tale", profile=str(path), target_ratio=0.3)
    with pytest.raises(ProfileError, match="per-head bases; this method needs joint"):
        ks.make_cache(model, "dynakv", profile=str(path))
    with pytest.raises(ProfileError, match="calibrated for another model"):
        ks.make_cache(tiny_llama(num_hidden_layers=3), "tale", profile=str(path))
    raw = json.loads(path.read_text())
    name = next(iter(raw["tensors"]))
    data = raw["tensors"][name]["data"]
    raw["tensors"][name]["data"] = ("A" if data[0] != "A" else "B") + data[1:]
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(ProfileError, match="sha256"):
        load_profile(tmp_path / "bad.json")
    (tmp_path / "cut.json").write_text(path.read_text()[: len(path.read_text()) // 2])
    with pytest.raises(ProfileError, match="truncated or corrupted"):
        load_profile(tmp_path / "cut.json")
    with pytest.raises(ValueError, match="needs bases"):
        ks.make_cache(model, "tale")
    with pytest.raises(ValueError, match="below the cheapest level"):
        ks.make_cache(model, "tale", profile=str(path), target_ratio=0.01)


def test_a_low_rank_cache_refuses_to_run_without_kvshrink_attention():
    model = tiny_llama()
    cache = ks.build_method("tale", target_ratio=0.3).use_profile(_bases(model)).make_cache(model)
    assert model.config._attn_implementation == "kvshrink"
    model.set_attn_implementation("sdpa")
    prompt = torch.randint(2, 95, (1, 40), generator=torch.Generator().manual_seed(5))
    with pytest.raises(RuntimeError, match="attn_implementation='kvshrink'"):
        greedy(model, prompt, cache, n=4)


def test_kvshrink_attention_leaves_other_caches_unchanged():
    model = tiny_llama()
    prompt = torch.randint(2, 95, (1, 50), generator=torch.Generator().manual_seed(6))
    ref = greedy(model, prompt, ks.make_cache(model, "kivi", bits=4, group=8), n=12)
    attention.enable(model)
    assert torch.equal(greedy(model, prompt, ks.make_cache(model, "kivi", bits=4, group=8), n=12), ref)


def test_full_rank_reproduces_full_on_the_real_model(real_model):
    model, tok = real_model
    text = ks.eval.corpus.pydoc_text()
    cal = tok(text[:20000], return_tensors="pt", add_special_tokens=False).input_ids
    prof = bases_profile(model, cal, method="tale", samples=1, context=512, progress=False)
    prompt = tok(text[-6000:-3000], return_tensors="pt", add_special_tokens=False).input_ids[:, :400]
    ref = greedy(model, prompt, DynamicCache(config=model.config), n=24)
    cache = ks.build_method("lowrank", rank=64, bits=16, exact_dtype="model", basis_dtype="float32").use_profile(
        prof).make_cache(model)
    try:
        assert torch.equal(greedy(model, prompt, cache, n=24), ref)
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_pre_rope_keys_full_rank_reproduce_full(make):
    model = make()
    ids = torch.randint(2, 95, (1, 512), generator=torch.Generator().manual_seed(0))
    prof = bases_profile(model, ids, method="tale", samples=2, context=256, key_space="pre_rope", progress=False)
    d = model.config.head_dim
    prompt = torch.randint(2, 95, (1, 90), generator=torch.Generator().manual_seed(3))
    ref = greedy(model, prompt, DynamicCache(config=model.config), n=20)
    method = ks.build_method("lowrank", rank=d, bits=16, exact_dtype="model", basis_dtype="float32",
                             key_space="pre_rope", attention="reconstruct").use_profile(prof)
    assert torch.equal(greedy(model, prompt, method.make_cache(model), n=20), ref)
    with pytest.raises(ValueError, match="attends by reconstruction only"):
        ks.build_method("lowrank", key_space="pre_rope")
    with pytest.raises(ProfileError, match="holds keys fitted pre-rope"):
        ks.build_method("lowrank", rank=d).use_profile(prof).make_cache(model)


# -- per-channel coefficient codes (coeff_axis=channel) ---------------------------------------------------------------
_CH_LEVELS = (Level(16, 8), Level(16, 4), Level(8, 2), Level(4, 16), DROP)


def _pieces(sizes, b=2, g=3, rank=16, seed=0):
    """Coefficients and level maps in pieces; every row puts the same number of tokens in each level."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        lmap = assign_levels(torch.rand(b, g, n, generator=gen), level_counts(n, [0.3, 0.3, 0.2, 0.1, 0.1]))
        out.append((torch.randn(b, g, n, rank, generator=gen) * 3, lmap))
    return out


def _channel_store(pieces, group=16):
    store = LevelStore(_CH_LEVELS, 16, "t", axis="channel", coeff_group=group)
    for c, lmap in pieces:
        store.append(c, lmap)
    return store


def _part_bytes(parts):
    return {p: sum(t.numel() * t.element_size() for t in ts) for p, ts in parts.items()}


def test_channel_codes_fed_in_pieces_equal_one_append():
    pieces = _pieces([7, 20, 1, 50, 33, 39])
    coeffs, lmap = torch.cat([c for c, _ in pieces], 2), torch.cat([m for _, m in pieces], 2)
    split, whole = _channel_store(pieces), _channel_store([(coeffs, lmap)])
    assert split.tokens == whole.tokens == int((lmap < 4).sum()) // 6  # the dropped level stores nothing
    for a, b in zip(split.coefficients(), whole.coefficients()):
        assert (a is None and b is None) or torch.equal(a, b)
    for a, b in zip(split.positions(lmap), whole.positions(lmap)):
        assert (a is None and b is None) or torch.equal(a, b)
    basis, sigma = _orthonormal(3, 16, 2), torch.rand(3, 16) + 0.5
    assert torch.equal(split.reconstruct(lmap, basis, sigma), whole.reconstruct(lmap, basis, sigma))
    assert _part_bytes(split.parts()) == _part_bytes(whole.parts())


def test_channel_codes_hold_the_last_partial_group_exactly_and_count_its_bytes():
    pieces = _pieces([70, 45])
    coeffs, lmap = torch.cat([c for c, _ in pieces], 2), torch.cat([m for _, m in pieces], 2)
    store = _channel_store(pieces, group=16)
    want_bytes = {"codes": 0, "scales": 0, "window": 0}
    for i, (lv, c) in enumerate(zip(_CH_LEVELS, store.coefficients())):
        n = int((lmap[0, 0] == i).sum())
        if lv.dropped:
            assert c is None
            continue
        given = coeffs[..., : lv.rank][lmap == i].reshape(2, 3, n, lv.rank)
        coded = n if lv.bits == 16 else n // 16 * 16
        pending = n - coded
        assert store.stores[i].tokens == coded and store.level_tokens(i) == n
        assert (store.pending[i] is None) == (pending == 0)
        assert torch.equal(c[:, :, coded:], given[:, :, coded:].half().float())  # pending: exact fp16
        if lv.bits != 16:  # coded: within half a step of a per-coefficient, per-16-token range
            span = given[:, :, :coded].reshape(2, 3, -1, 16, lv.rank)
            step = (span.amax(3) - span.amin(3)) / (2 ** lv.bits - 1)
            err = (c[:, :, :coded] - given[:, :, :coded]).abs().reshape(2, 3, -1, 16, lv.rank)
            assert (err <= step[:, :, :, None] * 0.5 + 2e-2).all()
            assert not torch.equal(c[:, :, :coded], given[:, :, :coded].half().float())
        rows = 2 * 3
        if lv.bits == 16:
            want_bytes["codes"] += rows * n * 2 * lv.rank
        else:
            want_bytes["codes"] += rows * coded * packed_size(lv.rank, lv.bits)
            want_bytes["scales"] += rows * (coded // 16) * lv.rank * 2 * 2  # fp16 scale and zero per coefficient
            want_bytes["window"] += rows * pending * lv.rank * 2
            assert level_token_bytes(lv, 16, "channel", 16) * coded * rows == \
                rows * coded * packed_size(lv.rank, lv.bits) + rows * (coded // 16) * lv.rank * 4
    assert {k: v for k, v in _part_bytes(store.parts()).items() if v} == {k: v for k, v in want_bytes.items() if v}
    assert want_bytes["window"] > 0 and want_bytes["scales"] > 0
    assert level_token_bytes(Level(64, 4), 64, "channel", 32) == 32 + 8  # codes + 4 * rank / 32 per token
    assert level_token_bytes(Level(64, 4), 64) == 32 + 4  # per token: one scale and zero


def test_channel_codes_save_load_map_batch_and_drop_front():
    pieces = _pieces([70, 45])
    store = _channel_store(pieces)
    tensors, counts = store.state_dict()
    assert any(k.startswith("pending.") for k in tensors) and counts["axis"] == "channel"
    back = LevelStore(_CH_LEVELS, 16, "t", axis="channel", coeff_group=16)
    back.load_state_dict(tensors, json.loads(json.dumps(counts)))
    more = _pieces([29], seed=1)[0]
    for st in (store, back):
        st.append(*more)
    for a, b in zip(store.coefficients(), back.coefficients()):
        assert (a is None and b is None) or torch.equal(a, b)
    assert _part_bytes(store.parts()) == _part_bytes(back.parts())
    for wrong in (LevelStore(_CH_LEVELS, 16, "t"), LevelStore(_CH_LEVELS, 16, "t", axis="channel", coeff_group=32)):
        with pytest.raises(ValueError, match="saved with coeff_axis=channel, coeff_group=16"):
            wrong.load_state_dict(tensors, counts)
    # beam reorder: every tensor, pending ones included, follows the batch
    before = store.coefficients()
    store.map_batch(lambda t: t.flip(0))
    for a, b in zip(before, store.coefficients()):
        assert (a is None and b is None) or torch.equal(a.flip(0), b)
    # dropping the oldest tokens: whole groups, or every coded token then pending ones; not part of a group
    n0 = store.level_tokens(0)
    with pytest.raises(NotImplementedError, match="coeff_axis=channel.*coeff_group=16"):
        store.drop_front([5, 0, 0, 0, 0])
    c0 = store.coefficients()[0]
    store.drop_front([16, 0, 0, 0, 0])
    assert torch.equal(store.coefficients()[0], c0[:, :, 16:]) and store.level_tokens(0) == n0 - 16
    coded = store.stores[0].tokens
    store.drop_front([coded + 1, 0, 0, 0, 0])
    assert store.stores[0].tokens == 0 and torch.equal(store.coefficients()[0], c0[:, :, 16 + coded + 1:])


def test_coefficient_code_options_are_checked():
    for bad, msg in ((dict(coeff_axis="head"), "coeff_axis must be one of token, channel, got 'head'"),
                     (dict(coeff_axis="channel", coeff_group=0), "coeff_group must be a positive integer"),
                     (dict(coeff_axis="channel", code_group=8), "leave code_group=0")):
        for method in ("lowrank", "tale", "dynakv"):
            with pytest.raises(ValueError, match=msg):
                ks.build_method(method, **bad)
    with pytest.raises(ValueError, match="coeff_axis must be one of token, channel"):
        LevelStore(_CH_LEVELS, 16, "t", axis="tokens")
    with pytest.raises(ValueError, match="coeff_group must be a positive integer"):
        _layer("latent", 2, 16, 2, (Level(16, 4),), (1.0,), coeff_axis="channel", coeff_group=-1)


@pytest.mark.parametrize("method", ["lowrank", "tale", "dynakv"])
def test_coeff_axis_token_is_the_default_cache(method):
    model = tiny_llama()
    prof = _bases(model, method)
    prompt = torch.randint(2, 95, (1, 150), generator=torch.Generator().manual_seed(7))
    opts = dict(window=8, sinks=2) if method == "lowrank" else dict(window=8, sinks=2, target_ratio=0.2)
    runs = []
    for extra in ({}, dict(coeff_axis="token", coeff_group=8)):
        cache = ks.build_method(method, **opts, **extra).use_profile(prof).make_cache(model)
        out = greedy(model, prompt, cache, n=8)
        report = cache.memory_report()
        runs.append((out, report["nbytes"], report["tokens"], report["by_part"], report["by_layer"][0]["levels"]))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1:] == runs[1][1:]


def _teacher_forced_logits(model, cache, prompt, follow):
    with torch.no_grad():
        out = [model(prompt, past_key_values=cache, use_cache=True).logits[:, -1:]]
        for t in range(follow.shape[1]):
            out.append(model(follow[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(out, 1)


@pytest.mark.parametrize("method", ["lowrank", "tale", "dynakv"])
def test_channel_codes_decode_end_to_end_latent_equal_to_reconstruct(method, tmp_path):
    model = tiny_llama()
    prof = _bases(model, method)
    prompt = torch.randint(2, 95, (1, 200), generator=torch.Generator().manual_seed(8))
    follow = torch.randint(2, 95, (1, 43), generator=torch.Generator().manual_seed(9))
    opts = dict(window=8, sinks=2, coeff_axis="channel", coeff_group=16)
    if method != "lowrank":
        opts.update(target_ratio=0.2)
    logits, caches = {}, {}
    for mode in ("latent", "reconstruct"):
        caches[mode] = ks.build_method(method, attention=mode, **opts).use_profile(prof).make_cache(model)
        logits[mode] = _teacher_forced_logits(model, caches[mode], prompt, follow)
    assert torch.allclose(logits["latent"], logits["reconstruct"], atol=1e-3, rtol=1e-3), \
        (logits["latent"] - logits["reconstruct"]).abs().max()
    layer = caches["latent"].layers[0]
    stored = [s.tokens for s in layer.key_store.stores if s is not None]
    assert sum(stored) > 0 and any(p is not None for p in layer.key_store.pending)
    report = caches["latent"].memory_report()
    assert report["by_layer"][0]["coeff_codes"] == "channel g16"
    pending = sum(p.numel() * 2 for L in caches["latent"].layers for st in (L.key_store, L.value_store)
                  for p in st.pending if p is not None)
    exact = sum(t.numel() * t.element_size() for L in caches["latent"].layers
                for t in (L.keys, L.values, L.sig_sum, L.sig_count, L.sink_keys, L.sink_values))
    assert report["by_part"]["window"] + report["by_part"]["sinks"] == pending + exact
    # per-token codes of the same bits give other logits: the option reaches the stores
    token = ks.build_method(method, **{**opts, "coeff_axis": "token"}).use_profile(prof).make_cache(model)
    assert not torch.allclose(_teacher_forced_logits(model, token, prompt, follow), logits["latent"])
    # saved and loaded mid-conversation, the cache continues with the same tokens
    ids = torch.randint(2, 95, (1, 110), generator=torch.Generator().manual_seed(6))
    spec = f"{method}:profile={prof.save(tmp_path / 'bases.json')}," + ",".join(f"{k}={v}" for k, v in opts.items())
    whole = greedy(model, ids, ks.make_cache(model, spec), n=16)
    cache = ks.make_cache(model, spec)
    first = greedy(model, ids, cache, n=8)
    assert any(p is not None for p in cache.layers[0].key_store.pending)
    loaded = ks.load_cache(cache.save(tmp_path / "c.safetensors"), model)
    assert loaded.memory_report()["nbytes"] == cache.memory_report()["nbytes"]
    again = torch.cat([ids, first], 1)  # a generated 0 is the pad id: the mask must not hide it
    assert torch.equal(greedy(model, again, loaded, n=8, attention_mask=torch.ones_like(again)), whole[:, 8:])


@pytest.mark.parametrize("method", ["tale", "dynakv"])
def test_a_recipe_profile_builds_the_same_cache_as_bases_and_options(method, tmp_path):
    model = tiny_llama()
    bases = _bases(model, method)
    row = bases.tensors["layer0.key_basis"].shape[1]
    opts = dict(window=8, sinks=2, coeff_axis="channel", coeff_group=16, target_ratio=0.2,
                levels=f"r{row // 2}b4/r{row // 4}b4/r{row // 8}b4")
    path = lowrank_recipe(bases, method, **opts).save(tmp_path / "recipe.json")
    recipe = load_profile(path)
    assert recipe.method == method and recipe.options["coeff_axis"] == "channel"
    # the bases are cut to the largest level's rank and stored in float16
    assert recipe.tensors["layer0.key_basis"].shape[-1] == row // 2
    assert json.loads(path.read_text())["tensors"]["layer0.key_basis"]["dtype"] == "float16"
    prompt = torch.randint(2, 95, (1, 160), generator=torch.Generator().manual_seed(5))
    ref_cache = ks.build_method(method, **opts).use_profile(bases).make_cache(model)
    ref = greedy(model, prompt, ref_cache, n=12)
    cache = ks.make_cache(model, profile=str(path))
    layer = cache.layers[0]
    assert isinstance(layer, LatentLayer) and layer.groups == (1 if method == "dynakv" else layer.kv_heads)
    assert torch.equal(greedy(model, prompt, cache, n=12), ref)
    # the same bytes: the cache held the cut bases in float16 either way
    assert cache.memory_report()["nbytes"] == ref_cache.memory_report()["nbytes"]
    # an explicit option different from the recipe's is refused; the same one is fine
    with pytest.raises(ValueError, match="is a recipe with target_ratio=0.2"):
        ks.make_cache(model, method, profile=str(path), target_ratio=0.3)
    ks.make_cache(model, method, profile=str(path), target_ratio=0.2)
    other = "dynakv" if method == "tale" else "tale"
    with pytest.raises(ValueError, match=f"is a '{method}' recipe"):
        ks.build_method(other, profile=str(path))
    with pytest.raises(ValueError, match="not a recipe option"):
        lowrank_recipe(bases, method, joint=True)
    with pytest.raises(ValueError, match="fitted post-rope; key_space='pre_rope'"):
        lowrank_recipe(bases, method, key_space="pre_rope", attention="reconstruct")
    with pytest.raises(ProfileError, match="starts from a bases profile"):
        lowrank_recipe(recipe, method)


def test_calibrate_bases_writes_a_recipe_from_the_command_line(tmp_path, capsys):
    from kvshrink.cli import main

    bases = _bases(tiny_llama()).save(tmp_path / "bases.json")
    out = tmp_path / "tale.json"
    assert main(["calibrate", "--method", "tale", "--bases", str(bases), "-O", "target_ratio=0.3",
                 "-O", "levels=r8b4/r4b4", "-o", str(out)]) == 0
    recipe = load_profile(out)
    assert recipe.method == "tale" and recipe.options["target_ratio"] == 0.3
    assert recipe.tensors["layer0.key_basis"].shape[-1] == 8
    assert "cut from rank 16 to 8" in capsys.readouterr().out
    assert main(["calibrate", "--method", "tada", "--bases", str(bases), "-o", str(tmp_path / "x.json")]) == 2
    assert "--method must be one of tale, dynakv, lowrank" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
