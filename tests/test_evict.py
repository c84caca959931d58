"""Eviction methods (streamingllm, h2o, snapkv, tova) and evict-to-low-bits (mixed)."""
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import greedy, tiny_gemma3, tiny_llama
from transformers import DynamicCache

import kvshrink as ks
from kvshrink.policies.scoring import get_policy

EVICTING = ["streamingllm", "h2o", "snapkv", "tova"]


def _prompt(batch=2, n=100, seed=2):
    return torch.randint(2, 95, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
@pytest.mark.parametrize("method", EVICTING + ["mixed", "h2o:score=normalized", "mixed:codec=rotated"])
def test_a_full_budget_reproduces_full(make, method):
    model = make()
    ids = _prompt()
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0  # left padding in the second sequence
    ref = greedy(model, ids, DynamicCache(config=model.config), n=20, attention_mask=mask)
    spec = (method + ("," if ":" in method else ":") + "budget=1.0"
            + (",group=8" if method.startswith("mixed") and "rotated" not in method else ""))
    cache = ks.make_cache(model, spec)
    out = greedy(model, ids, cache, n=20, attention_mask=mask)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("method", EVICTING)
def test_a_small_budget_keeps_exactly_what_it_promises(method):
    model = tiny_llama()
    ids = _prompt(batch=1, n=120)
    cache = ks.make_cache(model, f"{method}:budget=0.25,sinks=3,window=8")
    greedy(model, ids, cache, n=10)
    seen = 120 + 9  # the last generated token is never fed back
    for layer in cache.layers:
        kept = layer.positions
        if method == "snapkv":  # the prompt is compressed once; decoding keeps every new token
            assert kept.shape[-1] == math.ceil(0.25 * 120) + 9
        else:
            assert kept.shape[-1] == math.ceil(0.25 * seen)
        for row in kept.reshape(-1, kept.shape[-1]).tolist():
            assert {0, 1, 2} <= set(row)  # sinks
            assert len(row) == len(set(row)) and row == sorted(row)
        if method != "snapkv":
            assert set(range(seen - 8, seen)) <= set(kept[0, 0].tolist())  # the recent window
    report = cache.memory_report()
    assert report["ratio"] < 0.4
    if method == "streamingllm":
        want = [0, 1, 2] + list(range(seen - (math.ceil(0.25 * seen) - 3), seen))
        assert cache.layers[0].positions[0, 0].tolist() == want


def test_a_token_count_budget():
    model = tiny_llama()
    cache = ks.make_cache(model, "h2o:tokens=40,sinks=2,window=8")
    greedy(model, _prompt(batch=1, n=90), cache, n=8)
    assert all(layer.positions.shape[-1] == 40 for layer in cache.layers)


def test_window_keeps_only_the_most_recent_tokens():
    model = tiny_llama()
    cache = ks.make_cache(model, "window:tokens=16")
    greedy(model, _prompt(batch=1, n=70), cache, n=6)
    seen = 70 + 5
    assert all(layer.positions[0, 0].tolist() == list(range(seen - 16, seen)) for layer in cache.layers)


def test_tova_keeps_the_same_tokens_in_every_head_and_h2o_need_not():
    model = tiny_llama()
    ids = _prompt(batch=1, n=120)
    tova = ks.make_cache(model, "tova:budget=0.3,window=4")
    greedy(model, ids, tova, n=6)
    pos = tova.layers[0].positions
    assert torch.equal(pos[:, 0], pos[:, 1])
    h2o = ks.make_cache(model, "h2o:budget=0.3,window=4")
    greedy(model, ids, h2o, n=6)
    assert not torch.equal(h2o.layers[0].positions[:, 0], h2o.layers[0].positions[:, 1])


def _ctx(old, received, positions, prefill):
    """What a policy reads of a layer's attention call (the fields of `ScoreContext` these policies use)."""
    return SimpleNamespace(old=old, received=received, positions=positions, prefill=prefill)


def test_policies_score_as_their_papers_say():
    received = {"all": torch.tensor([[[1.0, 2.0, 3.0]]]), "observed": torch.tensor([[[0.0, 5.0, 0.0]]]),
                "last": torch.tensor([[[3.0, 1.0, 2.0]]])}
    old = torch.tensor([[[10.0, 0.0, 0.0]]])
    pos = torch.tensor([[[0, 1, 2]]])
    assert get_policy("h2o").score(_ctx(old, received, pos, False)).tolist() == [[[11.0, 2.0, 3.0]]]
    assert get_policy("tova").score(_ctx(old, received, pos, False)).tolist() == [[[3.0, 1.0, 2.0]]]
    assert get_policy("streamingllm").score(_ctx(old, received, pos, False)).tolist() == [[[0.0, 1.0, 2.0]]]
    assert get_policy("snapkv").score(_ctx(old, received, pos, True)).tolist() == [[[5.0, 5.0, 5.0]]]  # pooled
    assert get_policy("snapkv").score(_ctx(old, received, pos, False)) is old  # decoding leaves the scores
    with pytest.raises(ValueError, match="unknown token policy 'lru'"):
        get_policy("lru")
    # normalised H2O accumulates the same sums but ranks by the mean over the queries that saw each token
    norm = get_policy("h2o_norm")
    sums = norm.score(_ctx(old, received, pos, False))
    assert sums.tolist() == [[[11.0, 2.0, 3.0]]]
    assert torch.allclose(norm.rank(sums, pos, seen=3), torch.tensor([[[11.0 / 3, 1.0, 3.0]]]))
    assert get_policy("h2o").rank(sums, pos, seen=3) is sums


def test_normalized_h2o_keeps_other_tokens_than_the_raw_sum():
    model = tiny_llama()
    ids = _prompt(batch=1, n=150)
    kept = {}
    for score in ("sum", "normalized"):
        cache = ks.make_cache(model, f"h2o:budget=0.3,window=4,score={score}")
        greedy(model, ids, cache, n=4)
        kept[score] = cache.layers[1].positions
        assert kept[score].shape[-1] == math.ceil(0.3 * 153)
    assert not torch.equal(kept["sum"], kept["normalized"])
    # the raw sum favours early tokens: its kept tokens sit earlier on average
    assert kept["sum"].float().mean() < kept["normalized"].float().mean()
    with pytest.raises(ValueError, match="h2o: score must be one of sum, normalized"):
        ks.make_cache(model, "h2o:score=mean")


def test_mixed_keeps_every_token_and_spends_its_budget():
    model = tiny_llama()
    ids = _prompt(batch=1, n=200)
    plain = ks.make_cache(model, "h2o:budget=0.5")
    mixed = ks.make_cache(model, "mixed:policy=h2o,budget=0.5,bits=2,group=8")
    ref = greedy(model, ids, DynamicCache(config=model.config), n=10)
    greedy(model, ids, plain, n=10)
    greedy(model, ids, mixed, n=10)
    for layer in mixed.layers:
        assert layer.positions.shape[-1] + layer.low_positions.shape[-1] == 209  # none dropped
        assert layer.low_keys.tokens == layer.low_positions.shape[-1] > 0
        both = torch.cat([layer.positions, layer.low_positions], -1)[0, 0].sort().values
        assert both.tolist() == list(range(209))
    r = mixed.memory_report()
    assert r["by_part"]["codes"] > 0 and abs(r["ratio"] - 0.5) < 0.08
    assert ref.shape == (1, 10)
    centred = ks.make_cache(model, "mixed:policy=h2o,budget=0.5,bits=2,group=8,mean=channel")
    greedy(model, ids, centred, n=10)
    layer = centred.layers[0]
    assert layer.low_keys.state["channel_mean"].shape == (1, 2, 1, 16)
    assert centred.memory_report()["by_part"]["means"] > 0
    rotated = ks.make_cache(model, "mixed:policy=h2o,budget=0.5,bits=2,codec=rotated")
    greedy(model, ids, rotated, n=10)
    r = rotated.memory_report()
    kv = sum(r["by_part"][p] for p in ("codes", "scales", "window"))  # positions and scores come on top
    assert abs(kv / r["fp16_nbytes"] - 0.5) < 0.03 and r["by_part"]["codes"] > 0
    layer = rotated.layers[0]
    assert layer.positions.shape[-1] + layer.low_positions.shape[-1] == 209
    with pytest.raises(ValueError, match="codec='rotated' takes bits 2, 3 or 4 and mean 'none'"):
        ks.make_cache(model, "mixed:codec=rotated,mean=channel")


def test_eviction_options_are_checked():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
        ks.make_cache(model, "h2o:budget=1.5")
    with pytest.raises(ValueError, match="unknown token policy 'lru'"):
        ks.make_cache(model, "mixed:policy=lru")
    with pytest.raises(ValueError, match="mixed: mean must be 'none' or 'channel', got 'head'"):
        ks.make_cache(model, "mixed:mean=head")
    with pytest.raises(ValueError, match="below the cost of keeping every token at 2 bits"):
        ks.make_cache(model, "mixed:budget=0.1,group=8")


def test_mixed_takes_its_low_tier_from_a_tada_profile(tmp_path):
    from kvshrink.codecs.quant import GroupCodec
    from kvshrink.codecs.rotation import RotationCodec
    from kvshrink.profile import LayerChoice, Profile, fingerprint

    model = tiny_llama()
    path = tmp_path / "tada.json"
    Profile(fingerprint(model), "tada", {}, [LayerChoice(3, 2, value_rotate=True),
                                              LayerChoice(2, 4, key_rotate=True, value_rotate=True)]).save(path)
    ids = _prompt(batch=1, n=200)
    cache = ks.make_cache(model, f"mixed:policy=snapkv,budget=0.4,group=8,low={path}")
    greedy(model, ids, cache, n=10)
    first, second = cache.layers
    k0, v0 = first.low_codecs
    assert isinstance(k0, GroupCodec) and (k0.bits, k0.axis, k0.center) == (3, "token", "channel")
    assert isinstance(v0, RotationCodec) and v0.bits == 2
    k1, v1 = second.low_codecs
    assert isinstance(k1, RotationCodec) and (k1.bits, v1.bits) == (2, 4)
    for layer in cache.layers:
        assert layer.positions.shape[-1] + layer.low_positions.shape[-1] == 209  # none dropped
    r = cache.memory_report()
    kv = sum(r["by_part"][p] for p in ("codes", "scales", "means", "window"))  # positions and scores on top
    assert abs(kv / r["fp16_nbytes"] - 0.4) < 0.05
    lossless = ks.make_cache(model, f"mixed:policy=snapkv,budget=1.0,group=8,low={path}")
    assert torch.equal(greedy(model, ids, lossless, n=10), greedy(model, ids, DynamicCache(config=model.config), n=10))
    # the budget is the whole cache's: one under the dearer layer's low tier but over the mean of the two builds,
    # every layer keeping the same share exact; one under the mean is refused
    hd = model.config.hidden_size // model.config.num_attention_heads
    costs = [sum(c.layout(hd).token_bytes() for c in layer.low_codecs) / (4 * hd) for layer in cache.layers]
    assert max(costs) > sum(costs) / 2 + 0.02
    between = (max(costs) + sum(costs) / 2) / 2
    split = ks.make_cache(model, f"mixed:policy=snapkv,budget={between:.4f},group=8,low={path}")
    greedy(model, ids, split, n=10)
    kept = [layer.positions.shape[-1] for layer in split.layers]
    assert kept[0] == kept[1] < 209
    with pytest.raises(ValueError, match=r"codes of .* \(mean over its 2 layers\)"):
        ks.make_cache(model, f"mixed:policy=snapkv,budget={sum(costs) / 2 - 0.01:.4f},group=8,low={path}")
    layered = Path(__file__).resolve().parent.parent / "benchmarks/profiles/qwen2.5-coder-1.5b-layered-0.10.json"
    with pytest.raises(ValueError, match="is a 'layered' profile; the low tier takes a TaDA profile"):
        ks.make_cache(model, f"mixed:low={layered}")
    with pytest.raises(ValueError, match=f"mixed: low={path}"):  # calibrated for another model
        ks.make_cache(tiny_llama(num_hidden_layers=3), f"mixed:low={path}")
