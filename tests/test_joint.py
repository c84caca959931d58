"""Joint calibration (tokens and bits per layer): the allocator's optimum on known cases, real bytes, the probe, the
profile it writes within budget and loadable by make_cache."""
import itertools
import re

import pytest
import torch

import kvshrink as ks
from kvshrink.joint import Combo, allocate, calibrate_joint, combo_bytes, probe_samples
from kvshrink.profile import ProfileError, load_profile

from conftest import greedy, tiny_llama


def _brute_force(kl, cost, budget):
    best = None
    for choice in itertools.product(list(cost), repeat=len(kl)):
        spent = sum(cost[c] for c in choice)
        if spent <= budget:
            total = sum(layer[c] for layer, c in zip(kl, choice))
            if best is None or total < best[0] - 1e-12:
                best = (total, choice)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_allocator_finds_the_optimum_of_small_cases(seed):
    gen = torch.Generator().manual_seed(seed)
    combos = [Combo(f"k{i}", "v", 1.0) for i in range(4)]
    cost = {c: int(b) for c, b in zip(combos, (10, 20, 35, 60))}
    kl = []
    for _ in range(3):  # KL falls as bytes rise, at a different rate per layer
        drop = torch.rand(3, generator=gen).tolist()
        values = [1.0, 1.0 - 0.6 * drop[0], 1.0 - 0.6 * drop[0] - 0.3 * drop[1], 0.0]
        kl.append(dict(zip(combos, (v * float(torch.rand(1, generator=gen)) * 5 for v in values))))
    for budget in (30, 60, 75, 100, 130, 180):
        chosen = allocate(kl, cost, budget)
        spent = sum(cost[c] for c in chosen)
        assert spent <= budget
        got = sum(layer[c] for layer, c in zip(kl, chosen))
        optimum = _brute_force(kl, cost, budget)[0]
        # the Lagrangian sweep plus upgrades is exact on convex per-layer curves; allow a small gap elsewhere
        assert got <= optimum + 0.35 * max(optimum, 1e-9) + 1e-9


def test_the_allocator_refuses_a_budget_below_the_cheapest_choice():
    combos = [Combo("a", "b", 1.0), Combo("c", "d", 0.5)]
    with pytest.raises(ValueError, match="below the cheapest allocation"):
        allocate([{combos[0]: 1.0, combos[1]: 2.0}], {combos[0]: 50, combos[1]: 40}, 39)


def test_combo_bytes_are_what_a_layer_holds():
    model = tiny_llama(head_dim=32)
    exact = combo_bytes(model, Combo("exact", "exact", 1.0), "snapkv", 512, 8, 2, torch.float16)
    assert exact == 2 * 2 * 2 * 32 * 512  # keys and values, 2 KV heads, fp16: what a 16-bit cache holds
    half = combo_bytes(model, Combo("exact", "exact", 0.5), "snapkv", 512, 8, 2, torch.float16)
    # half the tokens, each with an int32 position and a float32 score per KV head (plus the low-tier positions)
    assert half == 256 * 2 * (2 * 2 * 32 + 4 + 4)
    coded = combo_bytes(model, Combo("grouped:bits=2,axis=channel", "grouped:bits=2,axis=token", 0.5), "snapkv",
                        512, 8, 2, torch.float16)
    assert coded < half / 2  # 2-bit codes, scales, positions, scores, and up to a code block of exact tokens


@pytest.mark.parametrize("style", ["digits", "hex", "both"])
def test_probes_plant_a_fact_and_score_its_answer(real_model, style):
    tok = real_model[1]
    text = ks.eval.corpus.calibration_text()[:60000]
    probes = probe_samples(tok, text, 3, 300, seed=0, style=style)
    assert len({tok.decode(p.scored[0]) for p in probes}) == 3
    forms = {"digits": [r"\d{3}-\d{3}-\d{3}"] * 3, "hex": [r"[0-9a-f]{4}(-[0-9a-f]{4}){3}"] * 3}
    forms["both"] = [forms["digits"][0], forms["hex"][0], forms["digits"][0]]
    for p, form in zip(probes, forms[style]):
        assert p.context.shape == (1, 300) and p.kind == "probe"
        answer = tok.decode(p.scored[0]).strip().rstrip(".")
        assert re.fullmatch(form, answer), answer
        context = tok.decode(p.context[0])
        assert f"is {answer}.)" in context and context.count(answer) == 1
        assert context.rstrip().endswith("vault is")


def test_joint_calibration_writes_a_loadable_profile_within_budget(tmp_path, real_model):
    tok = real_model[1]
    model = tiny_llama(vocab_size=len(tok), head_dim=32, num_hidden_layers=3)
    text = ks.eval.corpus.calibration_text()[:60000]
    out = tmp_path / "joint.json"
    profile = calibrate_joint(model, tokenizer=tok, target_ratio=0.3, budget_context=256, context=160, samples=1,
                              probes=1, scored=8, key_codecs=("grouped:bits=2,axis=channel", "exact"),
                              value_codecs=("grouped:bits=2,axis=token", "exact"), shares=(1.0, 0.5),
                              window=8, sinks=2, text=text, output=out, progress=False)
    cal = profile.calibration
    assert profile.method == "layered" and load_profile(out).layers == profile.layers
    assert cal["measured_ratio"] <= 0.3 and cal["predicted_ratio"] <= 0.3
    assert cal["measured_ratio"] == pytest.approx(cal["predicted_ratio"], rel=0.02)
    assert len(cal["sensitivity"]) == 3 * 3  # per layer: one key codec, one value codec, one share
    assert all(v >= 0 for v in cal["sensitivity"].values())
    assert cal["kl"]["all"] > 0
    # a second budget reuses the measured sensitivities: no single-layer evaluation is repeated
    kw = dict(tokenizer=tok, budget_context=256, context=160, samples=1, probes=1, scored=8,
              key_codecs=("grouped:bits=2,axis=channel", "exact"), value_codecs=("grouped:bits=2,axis=token", "exact"),
              shares=(1.0, 0.5), window=8, sinks=2, text=text, progress=False)
    again = calibrate_joint(model, target_ratio=0.25, sensitivity_from=out, **kw)
    assert again.calibration["sensitivity"] == cal["sensitivity"]
    assert again.calibration["evaluations"] < cal["evaluations"] - 8
    assert again.calibration["measured_ratio"] <= 0.25
    with pytest.raises(ProfileError, match="seed=0, this run uses 1"):
        calibrate_joint(model, target_ratio=0.25, sensitivity_from=out, **{**kw, "seed": 1})
    # a candidate the earlier run did not try is measured, layer by layer; the others are reused
    wider = calibrate_joint(model, target_ratio=0.25, sensitivity_from=out,
                            **{**kw, "key_codecs": ("grouped:bits=2,axis=channel", "grouped:bits=4,axis=channel",
                                                    "exact")})
    sens = wider.calibration["sensitivity"]
    assert {k: v for k, v in sens.items() if k in cal["sensitivity"]} == cal["sensitivity"]
    assert sorted(set(sens) - set(cal["sensitivity"])) == [f"{i}/key/grouped:bits=4,axis=channel" for i in range(3)]
    # three new single-layer evaluations; the rest (the baseline, the chosen profile, the uniform pairings) as before
    w, a = wider.calibration, again.calibration
    assert w["evaluations"] - len(w["uniform"]) == a["evaluations"] - len(a["uniform"]) + 3
    # the written profile builds a cache that generates and holds the bytes calibration said
    ids = tok("def f(x):\n    return x", return_tensors="pt").input_ids
    cache = ks.make_cache(model, profile=str(out))
    greedy(model, ids, cache, n=4)
    assert cache.memory_report()["tokens"] > 0


def test_per_head_retention_is_a_calibration_choice(tmp_path, real_model):
    tok = real_model[1]
    model = tiny_llama(vocab_size=len(tok), head_dim=32, num_hidden_layers=2)
    out = tmp_path / "adakv.json"
    profile = calibrate_joint(model, tokenizer=tok, target_ratio=0.4, budget_context=256, context=160, samples=1,
                              probes=1, scored=8, key_codecs=("exact",), value_codecs=("exact",), shares=(1.0, 0.25),
                              policy="snapkv:heads=adaptive,floor=0.5", window=8, sinks=2,
                              text=ks.eval.corpus.calibration_text()[:60000], output=out, progress=False)
    assert profile.calibration["measured_ratio"] <= 0.4
    chosen = [r.policy for r in profile.layers]
    assert "snapkv:heads=adaptive,floor=0.5,budget=0.25" in chosen  # 0.4 of fp16 needs a quarter in some layer
    cache = ks.make_cache(model, profile=str(out))
    greedy(model, tok("def f(x):\n" * 40, return_tensors="pt").input_ids, cache, n=3)
    split = [x for x in cache.layers if hasattr(x, "held_per_head")]
    assert split and all(len(x.held_per_head()) == 2 for x in split)


def test_gear_is_a_candidate_like_any_codec(tmp_path, real_model):
    tok = real_model[1]
    model = tiny_llama(vocab_size=len(tok), head_dim=32, num_hidden_layers=2)
    gear = "gear:bits=2,block=32,rank=2,outliers=0.01"
    profile = calibrate_joint(model, tokenizer=tok, target_ratio=0.75, budget_context=256, context=160, samples=1,
                              probes=1, scored=8, key_codecs=(gear, "exact"), value_codecs=("exact",), shares=(1.0,),
                              window=8, sinks=2, text=ks.eval.corpus.calibration_text()[:60000],
                              output=tmp_path / "gear.json", progress=False)
    cal = profile.calibration
    assert f"{gear} | exact | 1" in cal["combo_bytes"] and cal["measured_ratio"] <= 0.75
    assert [r.key for r in profile.layers].count(gear) >= 1  # exact keys everywhere hold more than 0.75
    cache = ks.make_cache(model, profile=str(tmp_path / "gear.json"))
    greedy(model, tok("def f(x):\n" * 40, return_tensors="pt").input_ids, cache, n=3)


def test_a_low_rank_codec_is_a_candidate_with_its_bases_counted(tmp_path, real_model):
    from kvshrink.bases import bases_profile

    tok = real_model[1]
    model = tiny_llama(vocab_size=len(tok), head_dim=32, num_hidden_layers=2)
    text = ks.eval.corpus.calibration_text()[:60000]
    bases = tmp_path / "bases.json"
    bases_profile(model, tok(text, return_tensors="pt").input_ids[:, :1024], method="tale", samples=2, context=256,
                  progress=False).save(bases)
    low = f"projected:bases={bases},rank=8,bits=4"
    profile = calibrate_joint(model, tokenizer=tok, target_ratio=0.5, budget_context=256, context=160, samples=1,
                              probes=1, scored=8, key_codecs=(low, "exact"), value_codecs=(low, "exact"),
                              shares=(1.0,), window=8, sinks=2, text=text, output=tmp_path / "low.json",
                              progress=False)
    cal = profile.calibration
    assert cal["measured_ratio"] <= 0.5
    chosen = [r.key for r in profile.layers] + [r.value for r in profile.layers]
    assert low in chosen  # exact keys and values everywhere hold 1.0
    cache = ks.make_cache(model, profile=str(tmp_path / "low.json"))
    greedy(model, tok("def f(x):\n" * 80, return_tensors="pt").input_ids, cache, n=3)
    assert cache.memory_report()["by_part"]["bases"] > 0  # the bases a coded layer holds are in its bytes


def test_joint_calibration_refuses_bad_targets_and_candidates(real_model):
    tok = real_model[1]
    model = tiny_llama(vocab_size=len(tok), head_dim=32)
    kw = dict(tokenizer=tok, budget_context=256, progress=False)
    with pytest.raises(ValueError, match="target_ratio must be in"):
        calibrate_joint(model, target_ratio=3, **kw)
    with pytest.raises(ValueError, match="policy must be one of snapkv"):
        calibrate_joint(model, target_ratio=0.1, policy="h2o", **kw)
    with pytest.raises(ValueError, match="option 'budget' is set by the calibration"):
        calibrate_joint(model, target_ratio=0.1, policy="snapkv:budget=0.3", **kw)
    with pytest.raises(ValueError, match="heads must be one of uniform, adaptive"):
        calibrate_joint(model, target_ratio=0.1, policy="snapkv:heads=some", **kw)
    with pytest.raises(ValueError, match="probe_style must be one of digits, hex, both"):
        calibrate_joint(model, target_ratio=0.1, probe_style="uuid", **kw)
    with pytest.raises(ValueError, match="shares must be fractions"):
        calibrate_joint(model, target_ratio=0.1, shares=(0.5, 1.5), **kw)
    with pytest.raises(ValueError, match="grouped"):
        calibrate_joint(model, target_ratio=0.1, key_codecs=("grouped:bits=5",), **kw)
