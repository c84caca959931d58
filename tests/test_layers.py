"""The layer families in kvshrink.layers, and caches saved by earlier versions of the file format."""
from pathlib import Path

import pytest
from conftest import tiny_llama

import kvshrink as ks
from kvshrink import layers

DATA = Path(__file__).parent / "data"


def test_every_kvshrink_layer_is_a_compressed_layer_that_says_whether_it_replays_a_prefill():
    own = [layers.ComposedLayer, layers.LatentLayer, layers.ResidualLayer, layers.TokenLayer]
    assert all(issubclass(cls, layers.CompressedLayer) for cls in own)
    assert {cls.__name__: cls.replays_prefill for cls in own} == {
        "ComposedLayer": True, "LatentLayer": False, "ResidualLayer": False, "TokenLayer": False}


def test_a_cache_file_of_the_first_format_is_refused_naming_its_version():
    """Version 1 files (state found by walking attributes, before the paged stores) are refused, not misread."""
    with pytest.raises(ks.CacheFileError, match=r"version 1 is not supported \(this kvshrink reads 2\).*re-create"):
        ks.load_cache(DATA / "premove-llama-mixed.safetensors", tiny_llama())
