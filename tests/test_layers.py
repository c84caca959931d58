"""The layer classes live in kvshrink.layers; their old import paths and caches saved before the move still work."""
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_gemma3, tiny_llama

import kvshrink as ks
from kvshrink import layers

DATA = Path(__file__).parent / "data"


def test_old_import_paths_name_the_same_classes():
    from kvshrink.cache import FullLayer, FullSlidingLayer, RotatedLayer, WindowedLayer
    from kvshrink.evict import EvictingLayer
    from kvshrink.latent import MODES, SIGNIFICANCE, LatentLayer
    from kvshrink.residual import RESIDUAL_DTYPES, PrefixRunner, ResidualLayer, TokenLayer, install_hooks

    assert (FullLayer, FullSlidingLayer, WindowedLayer, RotatedLayer) == (
        layers.FullLayer, layers.FullSlidingLayer, layers.WindowedLayer, layers.RotatedLayer)
    assert EvictingLayer is layers.EvictingLayer and LatentLayer is layers.LatentLayer
    assert (ResidualLayer, TokenLayer, PrefixRunner) == (layers.ResidualLayer, layers.TokenLayer, layers.PrefixRunner)
    assert ks.WindowedLayer is WindowedLayer and ks.FullLayer is FullLayer
    assert MODES and SIGNIFICANCE and RESIDUAL_DTYPES and callable(install_hooks)


def test_every_kvshrink_layer_is_a_compressed_layer_that_says_whether_it_replays_a_prefill():
    own = [layers.WindowedLayer, layers.RotatedLayer, layers.EvictingLayer, layers.LatentLayer, layers.ResidualLayer,
           layers.TokenLayer]
    assert all(issubclass(cls, layers.CompressedLayer) for cls in own)
    assert {cls.__name__: cls.replays_prefill for cls in own} == {
        "WindowedLayer": True, "RotatedLayer": True, "EvictingLayer": True, "LatentLayer": False,
        "ResidualLayer": False, "TokenLayer": False}


@pytest.mark.parametrize("name", json.loads((DATA / "premove.json").read_text()))
def test_a_cache_saved_before_the_layers_moved_still_loads_and_continues(name):
    """Files written by kvshrink before the layers moved into kvshrink.layers (the header names no class or module:
    state is found by attribute path)."""
    want = json.loads((DATA / "premove.json").read_text())[name]
    model = {"tiny_llama": tiny_llama, "tiny_gemma3": tiny_gemma3}[want["model"]]()
    cache = ks.load_cache(DATA / f"premove-{name}.safetensors", model)
    assert cache.memory_report()["nbytes"] == want["nbytes"]
    with torch.no_grad():
        rest = model.generate(torch.tensor(want["first"]), past_key_values=cache, max_new_tokens=8, min_new_tokens=8,
                              do_sample=False, pad_token_id=0)
    assert rest.tolist() == want["rest"]
