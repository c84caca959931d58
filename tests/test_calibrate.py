"""Per-layer allocation: the budget is never exceeded and is spent; profiles round-trip and refuse bad files."""
import json

import pytest
import torch

import kvshrink as ks
from kvshrink.calibrate import ByteModel, Option, _options, allocate, calibrate, profile_ratio
from kvshrink.profile import LayerChoice, Profile, ProfileError, fingerprint, load_profile

from conftest import tiny_gemma3, tiny_llama


def _tiny():
    return tiny_llama(head_dim=32, num_hidden_layers=3)


def _profile(model, bits=((4, 2), (8, 3), (2, 16))):
    layers = [LayerChoice(k, v, "head" if i == 0 else "none", "none") for i, (k, v) in enumerate(bits)]
    return Profile(fingerprint(model), "tada", {"group": 8, "window": 8, "sinks": 0}, layers, 0.3, {"kl": 0.1})


@pytest.mark.parametrize("ratio", [0.45, 0.55, 0.7, 0.9, 1.2])
def test_allocator_spends_the_budget_without_exceeding_it(ratio):
    model = _tiny()
    opts = _options(2, (2, 3, 4, 8, 16))
    costs = ByteModel(model, {"group": 8, "window": 8, "sinks": 0}, opts, 256)
    gen = torch.Generator().manual_seed(int(ratio * 100))
    sens = {(i, t, m): float(torch.rand(1, generator=gen)) + 0.01 for i in range(3) for t in (0, 1)
            for m in ("none", "head")}
    budget = int(ratio * costs.fp16)
    alloc = allocate(sens, costs, opts, budget)
    spent = costs.total(alloc)
    assert spent <= budget
    # spent within one step: no single upgrade of any layer's keys or values still fits
    for item, o in alloc.items():
        for up in opts:
            extra = costs.cost[(*item, up)] - costs.cost[(*item, o)]
            if extra > 0 and up.bits > o.bits:
                assert spent + extra > budget, f"{item} could still go from {o} to {up}"
    # and the modelled bytes never under-count the bytes a cache built from the choice really holds
    from kvshrink.calibrate import _profile as make_profile

    real, _ = profile_ratio(model, make_profile(model, {"group": 8, "window": 8, "sinks": 0}, alloc, 3), 256)
    assert real <= spent


def test_a_budget_below_two_bits_everywhere_is_refused():
    model = _tiny()
    opts = _options(2, (2, 4))
    costs = ByteModel(model, {"group": 8, "window": 8, "sinks": 0}, opts, 256)
    sens = {(i, t, m): 1.0 for i in range(3) for t in (0, 1) for m in ("none", "head")}
    with pytest.raises(ValueError, match="below the cheapest allocation"):
        allocate(sens, costs, opts, 100)


def test_profile_round_trips_and_drives_the_cache(tmp_path):
    model = _tiny()
    path = _profile(model).save(tmp_path / "p.json")
    loaded = load_profile(path)
    assert loaded.layers == _profile(model).layers and loaded.model == fingerprint(model)
    cache = ks.make_cache(model, "tada", profile=str(path), group=8, window=8, sinks=0)
    with torch.no_grad():
        model(torch.randint(2, 90, (1, 64)), past_key_values=cache)
    report = cache.memory_report()
    assert [r["bits"] for r in report["by_layer"]] == ["4/2", "8/3", "2/16"]
    assert "center=head" in report["by_layer"][0]["key"] and "center=none" in report["by_layer"][1]["key"]


def test_profile_for_another_model_is_refused(tmp_path):
    path = _profile(_tiny()).save(tmp_path / "p.json")
    with pytest.raises(ProfileError, match="calibrated for another model.*layers: profile 3 vs model 2"):
        ks.make_cache(tiny_llama(head_dim=32), "tada", profile=str(path))
    with pytest.raises(ProfileError, match="another model"):
        ks.make_cache(tiny_gemma3(), "tada", profile=str(path))


@pytest.mark.parametrize("damage,message,resign", [
    (lambda text: text[: len(text) // 2], "not a readable JSON", False),
    (lambda text: "", "not a readable JSON", False),
    (lambda text: text.replace('"kvshrink-profile"', '"other"'), "not a kvshrink profile", False),
    (lambda text: text.replace('"version": 3', '"version": 9'), "version 9 is not supported", False),
    (lambda text: text.replace('"key_bits": 8', '"key_bits": 5'), "does not match its sha256", False),
    (lambda text: text.replace('"key_bits": 8', '"key_bits": 5'), "layer 1: key_bits must be one of", True),
    (lambda text: text.replace('"value_mean": "none"', '"value_mean": "median"', 1), "value_mean must be one of",
     True),
])
def test_corrupted_profiles_are_refused_before_anything_is_built(tmp_path, damage, message, resign):
    """An edit is caught by the profile's digest; one written so on purpose (re-signed) by the field's check."""
    from kvshrink.profile import _body_digest

    path = _profile(_tiny()).save(tmp_path / "p.json")
    text = damage(path.read_text())
    if resign:
        raw = json.loads(text)
        raw["sha256"] = _body_digest(raw)
        text = json.dumps(raw)
    path.write_text(text)
    with pytest.raises(ProfileError, match=message):
        ks.make_cache(_tiny(), "tada", profile=str(path))


def test_profile_with_missing_layers_is_refused(tmp_path):
    path = _profile(_tiny()).save(tmp_path / "p.json")
    raw = json.loads(path.read_text())
    raw["layers"] = raw["layers"][:2]
    path.write_text(json.dumps(raw))
    with pytest.raises(ProfileError, match="does not match its sha256"):  # an edit is caught first
        load_profile(path)
    from kvshrink.profile import _body_digest

    raw["sha256"] = _body_digest(raw)  # a file written so on purpose is still refused, for what it says
    path.write_text(json.dumps(raw))
    with pytest.raises(ProfileError, match="2 layer entries for a model of 3 layers"):
        load_profile(path)


def _kl_of_profile(model, tok, text, path, context, scored) -> float:
    """The calibration score of the profile at `path`, recomputed here: calibration's one window (samples=1, seed 0)
    prefilled through the profile's cache and through a DynamicCache, the scored tokens as one forward pass after
    it, the mean KL(reference || profile) over the scored positions."""
    import random

    from transformers import DynamicCache

    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    start = random.Random(0).randrange(0, ids.shape[1] - (context + scored) + 1)
    ctx, cont = ids[:, start:start + context], ids[:, start + context:start + context + scored]

    def logprobs(cache):
        with torch.no_grad():
            first = model(ctx, past_key_values=cache, use_cache=True).logits[:, -1:]
            rest = model(cont[:, :-1], past_key_values=cache, use_cache=True).logits
        return torch.cat([first, rest], 1)[0].double().log_softmax(-1)

    ref, got = logprobs(DynamicCache(config=model.config)), logprobs(ks.make_cache(model, "tada", profile=str(path)))
    kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
    assert kl > 1e-6  # a 0.6 budget puts some layer under 16 bits
    return kl


def test_a_target_that_16_bits_meet_is_refused_before_any_text_or_measurement(monkeypatch, real_model):
    import kvshrink.calibrate as cal
    import kvshrink.eval.corpus as corpus

    def untouched(*_, **__):
        raise AssertionError("calibration read text or measured a KL for a target 16 bits already meet")

    monkeypatch.setattr(corpus, "pydoc_text", untouched)
    monkeypatch.setattr(corpus, "calibration_text", untouched, raising=False)
    monkeypatch.setattr(cal, "Scorer", untouched)
    tok = real_model[1]
    model = tiny_llama(vocab_size=len(tok), head_dim=32, num_hidden_layers=3)
    kw = dict(tokenizer=tok, budget_context=256, options={"group": 8, "window": 8, "sinks": 0}, progress=False)
    with pytest.raises(ValueError, match=r"--target-ratio 3: 16 bits on every layer already meet it \(\d+ bytes, "
                                         r"1\.000 of a 16-bit cache at 256 tokens"):
        calibrate(model, target_ratio=3, **kw)
    for target in (dict(target_ratio=1.0), dict(target_bytes=10**9), dict(target_bits=16, bits=(2, 4, 16))):
        with pytest.raises(ValueError, match="nothing to calibrate"):
            calibrate(model, **target, **kw)
    with pytest.raises(AssertionError, match="read text or measured"):  # just under the 16-bit share: it calibrates
        calibrate(model, target_ratio=0.99, **kw)


def test_calibrate_on_a_tiny_model_writes_a_profile_within_budget(tmp_path, real_model):
    tok = real_model[1]
    model = tiny_llama(vocab_size=len(tok), head_dim=32, num_hidden_layers=3)
    text = ks.eval.corpus.pydoc_text()[:20000]
    for search in ("greedy", "random", "both"):
        out = tmp_path / f"{search}.json"
        profile = calibrate(model, tokenizer=tok, target_ratio=0.6, budget_context=256, search=search, trials=3,
                            samples=1, context=96, scored=8, text=text, output=out,
                            options={"group": 8, "window": 8, "sinks": 0}, progress=False)
        assert profile.predicted_ratio <= 0.6 and load_profile(out).layers == profile.layers
        cal = profile.calibration
        assert cal["chosen"] in ("greedy", "random", "greedy+random")
        assert cal["kl"] == min(cal[name]["kl"] for name in ("greedy", "random") if name in cal)
        assert cal["kl"] == pytest.approx(_kl_of_profile(model, tok, text, out, context=96, scored=8), rel=1e-3)
        _, ratio = profile_ratio(model, profile, 256)
        assert ratio == pytest.approx(profile.predicted_ratio)
    with pytest.raises(ValueError, match="exactly one target"):
        calibrate(model, tokenizer=tok, target_ratio=0.3, target_bits=2)


def test_the_shared_prefill_gives_the_same_kl_as_running_every_prefill(real_model):
    from kvshrink.calibrate import Option, Scorer

    model, tok = real_model
    text = ks.eval.corpus.pydoc_text()[:40000]
    base = {"exact_dtype": "float16", "group": 32, "window": 32}
    shared, own = (Scorer(model, tok, text, base, 2, 160, 8, 0, share_prefill=flag) for flag in (True, False))
    assert shared.records is not None and own.records is None
    layers = model.config.num_hidden_layers
    for alloc in ({(i, t): Option(2, "head" if i % 2 else "none") for i in range(layers) for t in (0, 1)},
                  {(i, t): Option(16 if i < 10 else 3) for i in range(layers) for t in (0, 1)}):
        a, b = shared(alloc), own(alloc)
        assert a > 1e-4 and a == pytest.approx(b, rel=1e-5, abs=1e-7)


def test_sensitivities_are_reused_only_under_the_same_settings(tmp_path, real_model):
    tok = real_model[1]
    model = tiny_llama(vocab_size=len(tok), head_dim=32, num_hidden_layers=3)
    kw = dict(tokenizer=tok, budget_context=256, search="greedy", samples=1, context=96, scored=8,
              text=ks.eval.corpus.pydoc_text()[:20000], options={"group": 8, "window": 8, "sinks": 0}, progress=False)
    first = calibrate(model, target_ratio=0.6, output=tmp_path / "a.json", **kw)
    again = calibrate(model, target_ratio=0.8, sensitivity_from=tmp_path / "a.json", **kw)
    assert again.calibration["greedy"]["sensitivity"] == first.calibration["greedy"]["sensitivity"]
    assert again.predicted_ratio <= 0.8 and again.mean_bits() >= first.mean_bits()
    with pytest.raises(ProfileError, match="scored=8, this run uses 16"):
        calibrate(model, target_ratio=0.8, sensitivity_from=tmp_path / "a.json", **{**kw, "scored": 16})


def test_a_profile_brings_the_options_it_was_calibrated_with(tmp_path):
    model = _tiny()
    path = _profile(model).save(tmp_path / "p.json")  # calibrated with group 8, window 8, sinks 0
    method = ks.build_method("tada", profile=str(path))
    assert (method.group, method.window, method.sinks) == (8, 8, 0)
    assert ks.build_method("tada", profile=str(path), window=8).window == 8
    with pytest.raises(ValueError, match="calibrated with window=8; window=16 was asked for"):
        ks.build_method("tada", profile=str(path), window=16)


def test_shipped_profiles_load_by_name_and_run_uses_the_best(real_model):
    import argparse

    from kvshrink.cli import _method_spec
    from kvshrink.profile import ProfileError, load_profile, shipped_profiles

    assert "smollm2-135m-tada-0.27" in shipped_profiles()
    profile = load_profile("smollm2-135m-tada-0.27")
    profile.check_model(real_model[0])
    assert 0.25 < profile.predicted_ratio <= 0.27
    with pytest.raises(ProfileError, match="not a shipped profile \\(shipped: .*smollm2-135m-tada-0.27"):
        load_profile("smollm2-135m-tada-0.01")
    args = argparse.Namespace(method="best", model="smollm2-135m", bits=None, group=None, window=None, sinks=None,
                              profile=None, option=None)
    assert _method_spec(args) == "tada:profile=smollm2-135m-tada-0.27"
    args = argparse.Namespace(method="best", model="gemma3-270m", bits=None, group=None, window=None, sinks=None,
                              profile=None, option=None)
    assert _method_spec(args) == "kivi:bits=4"
    args.profile = "smollm2-135m-tada-0.27"  # a profile alone builds what it describes
    assert _method_spec(args) == "tada:profile=smollm2-135m-tada-0.27"
    args.profile, args.method, args.bits = None, "tova:budget=0.5 + turboquant", 3  # shortcuts go to the codec side
    assert _method_spec(args) == "tova:budget=0.5 + turboquant:bits=3"
    args.bits = None
    args.method, args.bits = "best", 2
    with pytest.raises(ValueError, match="--bits need a method"):
        _method_spec(args)
