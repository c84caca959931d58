"""The `projected` codec: tokens as their leading coefficients in a fitted per-head basis, coded per coefficient."""
import pytest
import torch
from conftest import greedy, tiny_llama
from transformers import DynamicCache

import kvshrink as ks
from kvshrink.bases import bases_profile, layer_bases
from kvshrink.codecs import PagedStore
from kvshrink.codecs.base import codec_from_spec
from kvshrink.codecs.projected import ProjectedCodec
from kvshrink.codecs.quant import GroupCodec


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    model = tiny_llama()
    torch.manual_seed(1)
    cal = torch.randint(2, 90, (1, 512))
    path = tmp_path_factory.mktemp("bases") / "tale.json"
    bases_profile(model, cal, method="tale", samples=2, context=256, progress=False).save(path)
    joint = path.parent / "dynakv.json"
    bases_profile(model, cal, method="dynakv", samples=1, context=256, progress=False).save(joint)
    return model, path, joint


def _store(codec, role):
    return PagedStore(codec, f"test {role}s", role=role)


def test_full_rank_fp16_coefficients_give_back_the_tokens_and_a_rank_cut_is_the_projection(fitted):
    model, path, _ = fitted
    x = torch.randn(1, 2, 64, 16) * 3
    full = ProjectedCodec(bases=str(path), rank=16, bits=16, layer=1)
    store = _store(full, "key")
    store.append(x)
    assert torch.allclose(store.decode(torch.float32), x, atol=0.02)  # an fp16 orthonormal basis, fp16 coefficients
    kb, _, vb, _ = layer_bases(ks.profile.load_profile(path), 1, False, "test")
    cut = ProjectedCodec(bases=str(path), rank=6, bits=16, layer=1)
    for role, basis in (("key", kb), ("value", vb)):
        store = _store(cut, role)
        store.append(x)
        u = basis[:, :, :6].half().float()
        assert torch.equal(store.state["basis"][0].float(), u)  # each side its own basis, the first `rank` columns
        projection = x @ u @ u.transpose(-1, -2)
        assert torch.allclose(store.decode(torch.float32), projection, atol=0.02)
        assert (store.decode(torch.float32) - x).norm() > 0.1 * x.norm()  # six of 16 coefficients lose something


def test_per_coefficient_codes_and_their_bytes(fitted):
    model, path, _ = fitted
    x = torch.randn(2, 2, 96, 16)
    x[..., 3] += 40  # an offset channel: per-coefficient scales keep it from costing the others their range
    codec = ProjectedCodec(bases=str(path), rank=8, bits=4, group=32, layer=0)
    store = _store(codec, "key")
    store.append(x)
    exact = _store(ProjectedCodec(bases=str(path), rank=8, bits=16, layer=0), "key")
    exact.append(x)
    err = (store.decode(torch.float32) - exact.decode(torch.float32)).norm() / exact.decode(torch.float32).norm()
    assert err < 0.05
    # every byte held: the coefficients' codes and scales as a 4-bit per-channel code of 8-wide vectors, and the
    # fp16 basis [batch, heads, head_dim, rank] once
    inner = GroupCodec(4, 32, "channel").layout(8).token_bytes()
    parts = {k: sum(t.numel() * t.element_size() for t in v) for k, v in store.parts().items()}
    assert parts["codes"] + parts["scales"] == inner * 2 * 2 * 96
    assert parts["bases"] == 2 * 2 * 16 * 8 * 2
    assert store.nbytes() == sum(parts.values())


def test_a_composition_and_a_layered_profile_build_it_per_layer(fitted, tmp_path):
    model, path, _ = fitted
    ids = torch.randint(2, 90, (1, 300), generator=torch.Generator().manual_seed(3))
    spec = f"snapkv:budget=0.5 + projected:bases={path},rank=8,bits=4,window=8"
    cache = ks.make_cache(model, spec)
    greedy(model, ids, cache, n=6)
    layers = cache.layers
    assert [x.key_codec.layer for x in layers] == [0, 1]
    assert layers[1].key_store.role == "key" and layers[1].value_store.role == "value"
    for layer_idx, layer in enumerate(layers):
        kb, _, vb, _ = layer_bases(ks.profile.load_profile(path), layer_idx, False, "test")
        assert torch.equal(layer.key_store.state["basis"][0].float(), kb[:, :, :8].half().float())
        assert torch.equal(layer.value_store.state["basis"][0].float(), vb[:, :, :8].half().float())
    report = cache.memory_report()
    assert report["by_part"]["bases"] == 2 * 2 * 2 * 16 * 8 * 2  # layers x (keys, values) x heads x D x rank x fp16
    assert report["ratio"] < 0.5
    # a saved cache holds its bases and continues with the same tokens
    whole = greedy(model, ids, ks.make_cache(model, spec), n=12)
    first = greedy(model, ids, saved := ks.make_cache(model, spec), n=6)
    path_saved = saved.save(tmp_path / "conv.safetensors")
    loaded = ks.load_cache(path_saved, model)
    assert loaded.memory_report()["nbytes"] == saved.memory_report()["nbytes"]
    assert torch.equal(torch.cat([first, greedy(model, torch.cat([ids, first], 1), loaded, n=6)], 1), whole)
    # full rank with fp16 coefficients decodes within fp16 rounding: the tiny model's tokens stay those of `full`
    lossless = ks.make_cache(model, f"projected:bases={path},rank=16,bits=16,window=8")
    assert torch.equal(greedy(model, ids, lossless, n=8), greedy(model, ids, DynamicCache(config=model.config), n=8))


def test_bad_settings_are_refused_clearly(fitted):
    model, path, joint = fitted
    with pytest.raises(ValueError, match="bases= is required"):
        codec_from_spec("projected:rank=8")
    with pytest.raises(ValueError, match="joint \\(dynakv\\) bases"):
        codec_from_spec(f"projected:bases={joint}")
    with pytest.raises(ValueError, match="bits must be one of"):
        codec_from_spec(f"projected:bases={path},bits=5")
    with pytest.raises(ValueError, match="side must be one of auto, key, value"):
        codec_from_spec(f"projected:bases={path},side=both")
    with pytest.raises(ValueError, match="rank 32 exceeds head_dim=16"):
        ks.make_cache(model, f"projected:bases={path},rank=32")
    with pytest.raises(ValueError, match="are for head_dim 16"):
        ks.make_cache(tiny_llama(head_dim=32), f"projected:bases={path},rank=8")
    store = PagedStore(ProjectedCodec(bases=str(path), rank=4), "a loose store")
    with pytest.raises(ValueError, match="neither a layer's keys nor its values: give side=key or side=value"):
        store.append(torch.randn(1, 2, 32, 16))
    with pytest.raises(ValueError, match="hold 2 KV heads at layer 0; the store holds 3"):
        _store(ProjectedCodec(bases=str(path), rank=4), "key").append(torch.randn(1, 3, 32, 16))
