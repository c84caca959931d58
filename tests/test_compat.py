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
