"""kvshrink.compat: the stand-ins for what transformers releases before 5.3 lack compute what the newest release's
own functions compute (kvpress's environment has 5.2: tests/kvpress run there)."""
import pytest
import torch
from conftest import tiny_gemma3, tiny_llama

from kvshrink import compat


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_the_layer_types_stand_in_equals_transformers_own(make, monkeypatch):
    config = make().config.get_text_config(decoder=True)
    theirs = compat.layer_types_and_kwargs(config)
    if compat._upstream_layer_types is None:
        pytest.skip("this transformers has no get_layer_types_and_kwargs to compare with (the stand-in is in use)")
    monkeypatch.setattr(compat, "_upstream_layer_types", None)
    assert compat.layer_types_and_kwargs(config) == theirs


def test_mask_sizes_take_a_count_or_the_positions_of_the_queries():
    assert compat.query_length(7) == 7
    assert compat.query_length(torch.arange(3, 10)) == 7


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_one_kwargs_dict_for_the_model_becomes_one_per_layer(make, monkeypatch):
    """transformers 5.3 to 5.2x return one kwargs dict for the whole model (5.17 on a GPU machine gave a cache of no
    layers: the dict was zipped with the layer types); it becomes one dict per layer, windowed layers keeping the
    window, as the stand-in and the newest releases give."""
    import kvshrink as ks

    config = make().config.get_text_config(decoder=True)
    want = compat.layer_types_and_kwargs(config)

    def one_dict(cfg):  # as transformers 5.17's get_layer_types_and_kwargs
        types, _ = want
        kwargs = {"sliding_window": cfg.sliding_window} if "sliding_attention" in types else {}
        return list(types), kwargs

    monkeypatch.setattr(compat, "_upstream_layer_types", one_dict)
    assert compat.layer_types_and_kwargs(config) == want
    model = make()
    assert len(ks.make_cache(model, "kivi:bits=4,group=16").layers) == config.num_hidden_layers
