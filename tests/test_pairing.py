"""Pairing profiles: a `POLICY + CODEC` composition written into one profile file (the codec's per-layer choices
copied in), that `make_cache(model, profile=PATH)` builds token for token and byte for byte as the spec does."""
import json

import pytest
import torch
from conftest import greedy, tiny_llama

import kvshrink as ks
from kvshrink.cli import main
from kvshrink.methods.pairing import pairing_profile
from kvshrink.profile import LayerChoice, Profile, ProfileError, fingerprint, load_profile


def _tada_profile(model, path):
    layers = [LayerChoice(3, 2, value_rotate=True), LayerChoice(2, 4, key_mean="none", value_mean="head")]
    Profile(fingerprint(model), "tada", {"exact_dtype": "float16"}, layers, 0.2).save(path)
    return path


def _ids(n, seed):
    return torch.randint(2, 95, (1, n), generator=torch.Generator().manual_seed(seed))


def _held(cache):
    return [(layer.positions.clone(), layer.key_store.tokens) for layer in cache.layers]


@pytest.mark.parametrize("policy", ["kvzip:budget=0.4,prompt=none,chunk=64", "snapkv:budget=0.3,window=8"])
def test_a_pairing_profile_builds_what_its_spec_builds(tmp_path, policy):
    model = tiny_llama(head_dim=32, hidden_size=128)
    codes = _tada_profile(model, tmp_path / "codes.json")
    spec = f"{policy} + tada:profile={codes}"
    path = tmp_path / "pair.json"
    pairing_profile(policy, f"tada:profile={codes}").save(path)
    ids = _ids(300, 1)
    by_spec, by_file = ks.make_cache(model, spec), ks.make_cache(model, profile=str(path))
    out_spec, out_file = greedy(model, ids, by_spec, n=12), greedy(model, ids, by_file, n=12)
    assert torch.equal(out_spec, out_file)
    for (pa, ta), (pb, tb) in zip(_held(by_spec), _held(by_file)):
        assert torch.equal(pa, pb) and ta == tb
    ra, rb = by_spec.memory_report(), by_file.memory_report()
    assert ra["nbytes"] == rb["nbytes"] and ra["tokens"] == rb["tokens"]
    assert rb["ratio"] < 0.5  # the codes are the profile's, not 16-bit copies
    layer = by_file.layers[0]
    assert layer.value_store.codec.name == "rotated" and layer.key_store.codec.bits == 3  # layer 0's choice
    assert by_file.spec == f"pairing:profile={path}"
    prof = load_profile(path)
    assert prof.calibration["codec_profile"]["file"] == "codes.json"
    assert "profile" not in prof.options["codec"]  # held in the file, not named by a path


def test_a_pairing_with_a_plain_codec_needs_the_model_and_holds_no_layers(tmp_path):
    model = tiny_llama(head_dim=32, hidden_size=128)
    with pytest.raises(ValueError, match="the model must be given"):
        pairing_profile("snapkv:budget=0.5", "kivi:bits=4")
    path = tmp_path / "pair.json"
    prof = pairing_profile("snapkv:budget=0.5", "grouped:bits=4", model)
    assert prof.layers == []
    prof.save(path)
    ids = _ids(120, 2)
    a, b = ks.make_cache(model, "snapkv:budget=0.5 + grouped:bits=4"), ks.make_cache(model, profile=str(path))
    assert torch.equal(greedy(model, ids, a, n=8), greedy(model, ids, b, n=8))
    assert a.memory_report()["nbytes"] == b.memory_report()["nbytes"]


def test_a_pairing_profile_is_checked_where_it_is_read(tmp_path):
    model = tiny_llama(head_dim=32, hidden_size=128)
    codes = _tada_profile(model, tmp_path / "codes.json")
    good = pairing_profile("snapkv:budget=0.5", f"tada:profile={codes}")

    def write(**changes):
        path = tmp_path / "bad.json"
        Profile(**{**vars(good), **changes}).save(path)
        return str(path)

    with pytest.raises(ProfileError, match="options are policy, codec"):
        ks.make_cache(model, profile=write(options={"policy": "snapkv"}))
    with pytest.raises(ProfileError, match="held in the file, not named by a path"):
        ks.make_cache(model, profile=write(options={"policy": "snapkv", "codec": f"tada:profile={codes}"}))
    with pytest.raises(ProfileError, match="POLICY side .* must be a token-policy method"):
        ks.make_cache(model, profile=write(options={"policy": "kivi", "codec": "tada"}))
    with pytest.raises(ProfileError, match="codec 'grouped' takes no per-layer choices"):
        ks.make_cache(model, profile=write(options={"policy": "snapkv", "codec": "grouped:bits=4"}))
    with pytest.raises(ProfileError, match="calibrated for another model"):
        ks.make_cache(tiny_llama(head_dim=16), profile=write())
    with pytest.raises(ProfileError, match="builds 'tada', not a pairing"):
        ks.make_cache(model, "pairing", profile=str(codes))
    with pytest.raises(ValueError, match="pairing: needs profile="):
        ks.make_cache(model, "pairing")


def test_calibrate_method_pairing_writes_the_profile(tmp_path, capsys):
    model = tiny_llama(head_dim=32, hidden_size=128)
    codes = _tada_profile(model, tmp_path / "codes.json")
    out = tmp_path / "pair.json"
    assert main(["calibrate", "--method", "pairing", "--policy", "kvzip:budget=0.45", "--codec",
                 f"tada:profile={codes}", "-o", str(out)]) == 0
    raw = json.loads(out.read_text())
    assert raw["method"] == "pairing" and raw["options"]["policy"] == "kvzip:budget=0.45"
    assert raw["options"]["codec"] == "tada:exact_dtype=float16" and len(raw["layers"]) == 2
    assert "make_cache(model, profile=" in capsys.readouterr().out
    out.unlink()
    assert main(["calibrate", "--method", "pairing", "--codec", f"tada:profile={codes}", "-o", str(out)]) != 0
    assert "--method pairing needs --policy and --codec" in capsys.readouterr().err and not out.exists()


def test_a_shipped_codec_profile_is_copied_in_by_name(tmp_path):
    prof = pairing_profile("snapkv:budget=0.5", "tada:profile=smollm2-135m-tada-0.27")
    assert prof.calibration["codec_profile"]["file"] == "smollm2-135m-tada-0.27.json"
    assert prof.model["architecture"] == "llama" and len(prof.layers) == prof.model["layers"]


def test_a_pairing_cache_is_saved_and_resumed(tmp_path):
    model = tiny_llama(head_dim=32, hidden_size=128)
    codes = _tada_profile(model, tmp_path / "codes.json")
    path = tmp_path / "pair.json"
    pairing_profile("snapkv:budget=0.5,window=8", f"tada:profile={codes}").save(path)
    ids = _ids(150, 4)
    whole = greedy(model, ids, ks.make_cache(model, profile=str(path)), n=16)
    cache = ks.make_cache(model, profile=str(path))
    first = greedy(model, ids, cache, n=8)
    saved = cache.save(tmp_path / "conv.safetensors")
    loaded = ks.load_cache(saved, model)
    assert loaded.memory_report()["nbytes"] == cache.memory_report()["nbytes"]
    rest = greedy(model, torch.cat([ids, first], 1), loaded, n=8)
    assert torch.equal(torch.cat([first, rest], 1), whole)
