import pytest
import torch

from kvshrink.codecs.quant import GroupCodec, dequantize, quantize
from kvshrink.codecs.store import PagedStore


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_error_within_half_step(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(5, 7, 32, generator=g) * torch.linspace(0.01, 30, 32)
    codes, scale, zero = quantize(x, bits)
    assert scale.dtype == torch.float16 and zero.dtype == torch.float16
    y = dequantize(codes, scale, zero, bits, 32)
    half_step = scale.float() / 2
    assert ((y - x).abs() <= half_step * (1 + 1e-3) + 1e-6).all()
    # codes really use the width: a group spanning the range hits both ends
    assert y.amin(-1).allclose(x.amin(-1), atol=float(half_step.max()))
    # groups along another dimension: scale and zero keep that dimension with size 1
    codes, scale, zero = quantize(x, bits, dim=1)
    assert scale.shape == (5, 1, 32)
    assert ((dequantize(codes, scale, zero, bits, 32) - x).abs() <= scale.float() / 2 * (1 + 1e-3) + 1e-6).all()


def test_constant_groups_are_exact():
    x = torch.full((2, 16), 3.25)
    codes, scale, zero = quantize(x, 2)
    assert torch.equal(dequantize(codes, scale, zero, 2, 16), x)


def test_fp16_overflow_is_an_error():
    with pytest.raises(ValueError, match="fp16 range"):
        quantize(torch.tensor([[0.0, 1e6]]), 4)


def test_spec_validation_names_the_value():
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4, 8, 16\), got 5"):
        GroupCodec(bits=5)
    with pytest.raises(ValueError, match="axis must be one of"):
        GroupCodec(axis="diagonal")
    with pytest.raises(ValueError, match="center must be one of"):
        GroupCodec(center="median")
    with pytest.raises(ValueError, match="group=48 does not divide head_dim=64"):
        GroupCodec(group=48).check_head_dim(64, "layer 3 keys")


def _kv(seed=0, b=2, h=3, t=64, d=16):
    g = torch.Generator().manual_seed(seed)
    # an outlier channel and a per-head offset, as real keys have
    x = torch.randn(b, h, t, d, generator=g)
    x[..., 3] += 8
    return x + torch.arange(h).view(1, h, 1, 1)


@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("center", ["none", "head", "channel"])
def test_store_roundtrip_error(axis, center):
    x = _kv()
    store = PagedStore(GroupCodec(bits=8, group=8, axis=axis, center=center))
    store.append(x[:, :, :32])
    store.append(x[:, :, 32:])
    y = store.decode(torch.float32)
    assert y.shape == x.shape and store.tokens == 64
    assert (y - x).abs().max() < 0.1
    store4 = PagedStore(GroupCodec(bits=2, group=8, axis=axis, center=center))
    store4.append(x)
    assert (store4.decode(torch.float32) - x).abs().mean() > (y - x).abs().mean()  # fewer bits, more error


def test_head_mean_stores_one_vector_per_token_and_is_exact_at_16_bits():
    x = _kv()
    store = PagedStore(GroupCodec(bits=16, center="head"))
    store.append(x)
    mean = store.field("head_mean")
    assert mean.shape == (2, 1, 64, 16) and mean.dtype == torch.float16
    assert torch.allclose(store.decode(torch.float32), x, atol=1e-2)
    assert set(store.parts()) == {"codes", "means"}  # fp16 values carry no scales


def test_channel_mean_helps_per_token_groups_with_offsets():
    x = _kv()
    plain, centred = (PagedStore(GroupCodec(bits=2, group=16, axis="token", center=c)) for c in ("none", "channel"))
    plain.append(x)
    centred.append(x)
    err = lambda s: (s.decode(torch.float32) - x).pow(2).mean()  # noqa: E731
    assert err(centred) < err(plain)


def test_channel_axis_needs_whole_groups_and_drop_front():
    store = PagedStore(GroupCodec(bits=4, group=8, axis="channel"), name="layer 0 keys")
    with pytest.raises(ValueError, match="layer 0 keys: 12 tokens is not a multiple"):
        store.append(_kv(t=12))
    x = _kv(t=32)
    store.append(x)
    before = store.decode(torch.float32)
    store.drop_front(16)
    assert store.tokens == 16
    after = store.decode(torch.float32)
    assert torch.equal(after, before[:, :, 16:])  # the kept groups' codes and scales are untouched
    # and they are 4-bit codes of x: each value within half a step (range / 15 of its channel group) of the input
    g = x[:, :, 16:].reshape(*x.shape[:2], 2, 8, x.shape[-1])
    step = (g.amax(3, keepdim=True) - g.amin(3, keepdim=True)) / 15
    bound = (step / 2).expand_as(g).reshape(after.shape) * (1 + 1e-2) + 1e-3  # fp16 scales and zero points
    assert ((after - x[:, :, 16:]).abs() <= bound).all()
    with pytest.raises(ValueError, match="cannot drop"):
        store.drop_front(3)
