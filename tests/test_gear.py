"""The `gear` codec: outliers exact, the bulk quantized, the quantization error corrected by a low-rank product."""
import pytest
import torch
from conftest import greedy, tiny_llama

import kvshrink as ks
from kvshrink.codecs import GearCodec, GroupCodec, PagedStore
from kvshrink.codecs.gear import power_iteration


def _keys(seed=0, t=128, d=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, t, d, generator=g)
    x[..., 7] += 6.0  # an outlier channel, as keys have
    x[0, 1, 40, 3] = 30.0  # and a few outlier entries
    x[0, 0, 100, 50] = -25.0
    return x


def _stored(codec, x):
    store = PagedStore(codec, "layer 0 keys")
    store.append(x)
    return store


def test_without_rank_or_outliers_gear_is_its_bulk_codes():
    x = _keys()
    for axis in ("channel", "token"):
        gear = _stored(GearCodec(2, axis, group=32, block=64, rank=0, outliers=0), x)
        plain = _stored(GroupCodec(2, 64 if axis == "channel" else 32, axis), x)
        assert torch.equal(gear.decode(torch.float32), plain.decode(torch.float32)) and gear.nbytes() == plain.nbytes()


def test_outliers_come_back_exact_and_the_correction_never_adds_error():
    x = _keys(1)
    errors = {}
    for rank in (0, 2, 8):
        codec = GearCodec(2, "channel", block=64, rank=rank, outliers=0.01)
        y = _stored(codec, x).decode(torch.float32)
        assert y[0, 1, 40, 3] == torch.tensor(30.0).half().float() and y[0, 0, 100, 50] == -25.0
        errors[rank] = (y - x).reshape(1, 2, 2, -1).norm(dim=-1)  # per block and head
    # the correction projects each block's error onto a subspace: it can only shrink it (up to fp16 factors)
    assert (errors[2] <= errors[0] * 1.001).all() and (errors[8] <= errors[2] * 1.001).all()
    assert errors[8].sum() < 0.9 * errors[0].sum()
    # the outliers' own range no longer stretches the bulk's scales
    no_outliers = (_stored(GearCodec(2, "channel", block=64, rank=0, outliers=0), x).decode(torch.float32) - x).norm()
    assert errors[0].norm() < no_outliers


def test_power_iteration_recovers_a_low_rank_matrix():
    g = torch.Generator().manual_seed(3)
    m = torch.randn(3, 64, 2, generator=g) @ torch.randn(3, 2, 32, generator=g)
    a, b = power_iteration(m, 2, 2)
    assert torch.allclose(a @ b, m, atol=1e-4) and torch.allclose(a.transpose(-1, -2) @ a, torch.eye(2).expand(3, 2, 2),
                                                                 atol=1e-5)


def test_gear_bytes_are_counted_by_part():
    x = _keys(2)
    codec = GearCodec(4, "channel", block=64, rank=4, outliers=0.02)
    store = _stored(codec, x)
    parts = {p: sum(t.numel() * t.element_size() for t in ts) for p, ts in store.parts().items()}
    tokens, heads, d, blocks = 128, 2, 64, 2
    k = codec.kept(d)
    assert k == 82  # ceil(0.02 * 64 * 64)
    assert parts["codes"] == heads * tokens * d * 4 // 8
    assert parts["scales"] == heads * blocks * 2 * d * 2  # fp16 scale and zero per channel and block
    assert parts["lowrank"] == heads * (tokens * 4 * 2 + blocks * 4 * d * 2)
    assert parts["outliers"] == heads * blocks * k * (2 + 2)
    assert store.nbytes() == sum(parts.values())


def test_gear_as_a_method_and_as_a_composition_codec():
    model = tiny_llama(head_dim=32, hidden_size=128)
    ids = torch.randint(2, 95, (1, 200), generator=torch.Generator().manual_seed(4))
    cache = ks.make_cache(model, "gear:bits=2,block=32,rank=2,window=16")
    greedy(model, ids, cache, n=6)
    report = cache.memory_report()
    assert report["method"] == "gear" and report["by_part"]["lowrank"] > 0 and report["by_part"]["outliers"] > 0
    assert ks.canonical_spec("gear:window=16,bits=2") == "gear:bits=2,window=16"
    composed = ks.make_cache(model, "snapkv:budget=0.5 + gear:bits=4,block=32")
    greedy(model, ids, composed, n=6)
    assert composed.layers[0].key_store.codec.name == "gear" and composed.layers[0].key_store.tokens > 0
    with pytest.raises(ValueError, match="gear: .*outliers must be a share"):
        ks.make_cache(model, "gear:outliers=0.7")


def test_value_axis_codes_the_values_per_token_where_one_spec_codes_both():
    model = tiny_llama(head_dim=32, hidden_size=128)
    ids = torch.randint(2, 95, (1, 200), generator=torch.Generator().manual_seed(5))
    cache = ks.make_cache(model, "gear:bits=2,block=64,rank=1,outliers=0.01,value_axis=token,window=16")
    greedy(model, ids, cache, n=4)
    layer = cache.layers[0]
    assert layer.key_store.codec.axis == "channel" and layer.value_store.codec.axis == "token"
    # each side holds what its own codec stores for the same tokens: the values' scales are per token and group
    keys, values = layer.key_store, layer.value_store
    assert values.nbytes() == _stored(GearCodec(2, "token", block=64, rank=1, outliers=0.01),
                                      values.decode(torch.float32)).nbytes()
    # a scale pair per token and 32 channels, against one per channel and 64 tokens
    assert values.nbytes() > keys.nbytes()
    # the default keeps one axis for both sides, as before the option existed
    same = ks.make_cache(model, "gear:bits=2,block=64,rank=1,outliers=0.01,window=16")
    greedy(model, ids, same, n=4)
    assert same.layers[0].value_store.codec.axis == "channel" and same.layers[0].value_store.nbytes() == keys.nbytes()
    with pytest.raises(ValueError, match="value_axis must be one of .*'token'.*got 'rows'"):
        ks.make_cache(model, "gear:value_axis=rows")


def test_value_axis_holds_for_a_layered_profiles_value_codec(tmp_path):
    from kvshrink.profile import LayerRecipe, Profile, fingerprint

    model = tiny_llama(head_dim=32, hidden_size=128)
    spec = "gear:bits=2,block=64,rank=1,outliers=0.01,value_axis=token"
    path = tmp_path / "layered.json"
    Profile(fingerprint(model), "layered", {"window": 16}, [LayerRecipe(spec, spec, None),
                                                            LayerRecipe("exact", "exact", None)]).save(path)
    cache = ks.make_cache(model, profile=str(path))
    greedy(model, torch.randint(2, 95, (1, 200), generator=torch.Generator().manual_seed(5)), cache, n=4)
    first = cache.layers[0]
    assert first.key_store.codec.axis == "channel" and first.value_store.codec.axis == "token"
