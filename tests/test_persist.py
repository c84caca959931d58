"""Saved caches: a conversation resumed from disk continues with the same tokens; bad files are refused."""
import json

import pytest
import torch
from conftest import tiny_gemma3, tiny_llama

import kvshrink as ks

SPECS = ["full", "kivi:bits=2,group=8,window=8", "tada:bits=2,group=8,window=8", "tada:bits=3,mean=channel,group=8",
         "snapkv:budget=0.4,window=8", "h2o:budget=0.4,window=8,score=normalized", "tova:budget=0.4,window=8",
         "mixed:budget=0.5,codec=rotated,window=8", "turboquant:bits=3,window=8",
         "turboquant:bits=4,quantizer=uniform,group=16,window=8", "kvdirect:window=8",
         "kvdirect:scheme=token,window=8",
         "gear:bits=2,group=8,block=16,rank=1,outliers=0.02,value_axis=token,window=8"]


def _generate(model, ids, cache, n):
    with torch.no_grad():
        return model.generate(ids, past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
@pytest.mark.parametrize("spec", SPECS)
def test_a_resumed_conversation_continues_with_the_same_tokens(make, spec, tmp_path):
    model = make()
    ids = torch.randint(2, 95, (1, 70), generator=torch.Generator().manual_seed(6))
    whole = _generate(model, ids, ks.make_cache(model, spec), 16)
    cache = ks.make_cache(model, spec)
    first = _generate(model, ids, cache, 8)
    path = cache.save(tmp_path / "conv.safetensors")
    nbytes = cache.memory_report()["nbytes"]
    del cache
    loaded = ks.load_cache(path, model)
    assert loaded.memory_report()["nbytes"] == nbytes
    rest = _generate(model, first, loaded, 8)
    assert torch.equal(rest, whole)


@pytest.mark.parametrize("method,options", [("tale", "target_ratio=0.2"),
                                            ("dynakv", "target_ratio=0.12,keep=0.5,pool=7")])
def test_a_resumed_low_rank_conversation_continues_with_the_same_tokens(method, options, tmp_path):
    from kvshrink.bases import bases_profile

    model = tiny_llama()
    calib = torch.randint(2, 95, (1, 512), generator=torch.Generator().manual_seed(0))
    bases = bases_profile(model, calib, method=method, samples=2, context=256, progress=False)
    spec = f"{method}:profile={bases.save(tmp_path / 'bases.json')},{options},window=8"
    ids = torch.randint(2, 95, (1, 70), generator=torch.Generator().manual_seed(6))
    whole = _generate(model, ids, ks.make_cache(model, spec), 16)
    cache = ks.make_cache(model, spec)
    first = _generate(model, ids, cache, 8)
    levels = cache.memory_report()["by_layer"][0]["levels"]
    loaded = ks.load_cache(cache.save(tmp_path / "conv.safetensors"), model)
    assert loaded.memory_report()["by_layer"][0]["levels"] == levels and levels.get("dropped", 1) > 0
    assert torch.equal(_generate(model, first, loaded, 8), whole)


def test_bad_files_are_refused(tmp_path):
    model = tiny_llama()
    ids = torch.randint(2, 95, (1, 50))
    cache = ks.make_cache(model, "kivi:bits=2,group=8,window=8")
    _generate(model, ids, cache, 4)
    path = cache.save(tmp_path / "c.safetensors")
    with pytest.raises(ks.CacheFileError, match="saved for another model"):
        ks.load_cache(path, tiny_llama(num_hidden_layers=3))
    raw = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ks.CacheFileError, match="not a readable safetensors file"):
        ks.load_cache(tmp_path / "cut.safetensors", model)
    edited = bytearray(raw)
    edited[-3] ^= 0xFF  # a byte of the last tensor's data
    (tmp_path / "edited.safetensors").write_bytes(bytes(edited))
    with pytest.raises(ks.CacheFileError, match="do not match their sha256"):
        ks.load_cache(tmp_path / "edited.safetensors", model)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ks.CacheFileError, match="not a kvshrink cache"):
        ks.load_cache(tmp_path / "other.safetensors", model)
    header = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()["kvshrink"])
    header["version"] = 99
    save_file({"x": torch.zeros(2)}, str(tmp_path / "v99.safetensors"), metadata={"kvshrink": json.dumps(header)})
    with pytest.raises(ks.CacheFileError, match="version 99 is not supported"):
        ks.load_cache(tmp_path / "v99.safetensors", model)
    with pytest.raises(ks.CacheFileError, match="no such file"):
        ks.load_cache(tmp_path / "missing.safetensors", model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "cut.safetensors", "edited.safetensors",
                                                          "other.safetensors", "v99.safetensors"]  # no temp files


def test_written_files_get_the_ordinary_mode_not_mkstemps(tmp_path):
    import os

    from kvshrink.io import atomic_write_text

    mask = os.umask(0o022)
    try:
        text = atomic_write_text(tmp_path / "a.json", "{}")
        model = tiny_llama()
        cache = ks.make_cache(model, "kivi:bits=2,group=8,window=8")
        _generate(model, torch.randint(2, 95, (1, 20)), cache, 2)
        saved = cache.save(tmp_path / "c.safetensors")
    finally:
        os.umask(mask)
    assert text.stat().st_mode & 0o777 == 0o644 and saved.stat().st_mode & 0o777 == 0o644
