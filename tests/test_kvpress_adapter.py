"""The kvpress method where kvpress is not installed (kvshrink's main environment): it is listed, says how to
install kvpress, and its hooks are never put on a model by other methods. The adapter itself is tested against
kvpress in kvpress's environment (tests/kvpress/, `make test-kvpress`)."""
import sys

import pytest
from conftest import tiny_llama

import kvshrink as ks
from kvshrink.methods import METHODS


def test_the_method_is_listed_with_its_options():
    options = [f["name"] for f in ks.method_options(METHODS["kvpress"])]
    assert {"press", "args", "budget", "sinks", "window"} <= set(options)


def test_without_kvpress_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "kvpress", None)  # `import kvpress` now fails, installed or not
    with pytest.raises(ImportError, match=r"transformers<5.3.*kvshrink\[kvpress\]"):
        ks.build_method("kvpress:press=SnapKVPress,budget=0.5 + kivi:bits=2")


def test_other_methods_put_no_input_hooks_on_the_model():
    model = tiny_llama()
    ks.make_cache(model, "snapkv:budget=0.5 + kivi:bits=4,group=16")
    assert not getattr(model, "_kvshrink_input_hooks", 0)
    assert all(not m._forward_pre_hooks for name, m in model.named_modules() if name.endswith("self_attn"))
