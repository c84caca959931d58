"""Property-based tests of the codecs and the paged store over random shapes, magnitudes and extreme inputs: errors
within each codec's own bound, exactness where it is promised, non-finite or out-of-range values refused with the
store named, and a store fed in pieces equal to one fed at once (pages never copied once sealed)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvshrink.codecs import GroupCodec, PagedStore, RotationCodec
from kvshrink.codecs.base import BIT_WIDTHS

SETTINGS = dict(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FP16_TINY = 2.0 ** -24  # the smallest fp16 subnormal: what a scale or zero near 0 may be off by


@st.composite
def tensors(draw, channel_unit: int = 1):
    """x [B, H, T, D] with a random magnitude (1e-6 .. 1e3), and sometimes constant or all-zero channels."""
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    d = draw(st.sampled_from([16, 32, 64]))
    t = channel_unit * draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = 10.0 ** draw(st.integers(-6, 3))  # within fp16 (what is beyond it is refused: tested below)
    x = torch.randn(b, h, t, d, generator=torch.Generator().manual_seed(seed)) * scale
    kind = draw(st.sampled_from(["plain", "constant channel", "zeros", "offset"]))
    if kind == "constant channel":
        x[..., 3] = 0.5 * scale
    elif kind == "zeros":
        x = torch.zeros_like(x)
    elif kind == "offset":
        x = x + 7 * scale  # a channel offset as Qwen's keys have
    return x


@settings(**SETTINGS)
@given(data=st.data(), bits=st.sampled_from(BIT_WIDTHS["uniform"]), axis=st.sampled_from(["token", "channel"]),
       center=st.sampled_from(["none", "head", "channel"]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_grouped_codes_stay_within_half_a_step_of_their_group(data, bits, axis, center, dtype):
    codec = GroupCodec(bits, 16, axis, center)
    x = data.draw(tensors(codec.tokens_per_unit)).to(dtype).float()
    store = PagedStore(codec, "layer 5 keys", page_tokens=16)
    store.append(x)
    y = store.decode(torch.float32)
    assert y.shape == x.shape and torch.isfinite(y).all()
    m = x.mean(1, keepdim=True) if center == "head" else x[:, :, :max(codec.tokens_per_unit, 1)].mean(2, True) \
        if center == "channel" else torch.zeros(())
    centred = x - m
    ulp = torch.clamp(x.abs().amax() * 2.0 ** -10, min=FP16_TINY)
    if bits == 16:  # fp16 of the centred values: a relative rounding only
        bound = centred.abs() * 2.0 ** -10 + 2 * ulp
    else:  # half a step of the widest group of the row (its scale rounded up, its zero down to fp16), plus roundings
        rng = (centred.amax((2, 3), keepdim=True) - centred.amin((2, 3), keepdim=True))
        bound = 0.5 * (rng + 2 * ulp) / ((1 << bits) - 1) * 1.01 + 2 * ulp
    assert ((y - x).abs() <= bound).all(), float(((y - x).abs() - bound).max())


@settings(**SETTINGS)
@given(data=st.data(), bits=st.sampled_from([2, 3, 4, 16]), quantizer=st.sampled_from(["lloydmax", "uniform"]))
def test_rotated_codes_decode_consistently_and_keep_norms(data, bits, quantizer):
    codec = RotationCodec(bits, quantizer, group=16, layer=2)
    x = data.draw(tensors())
    if x.abs().amax() > 1e3 or x.abs().amax() == 0:
        x = x / x.abs().amax().clamp_min(1e-30)  # norms must fit fp16 (larger ones are refused, below)
    store = PagedStore(codec, "layer 2 values", page_tokens=8)
    store.append(x)
    y = store.decode(torch.float32)
    assert torch.isfinite(y).all()
    rotated = torch.cat([codec.decode_rotated(p, store) for p in store.pages], 2)
    assert torch.allclose(codec.from_rotated(rotated, store), y)  # the rotated space and back: the same tokens
    if bits == 16:
        assert torch.allclose(y, x, rtol=2e-3, atol=float(x.abs().amax()) * 2e-3 + 4 * FP16_TINY)  # fp16 subnormals
    elif quantizer == "lloydmax":  # norm correction: every decoded vector has its vector's norm
        assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("codec", [GroupCodec(2, 16, "channel"), GroupCodec(4, 16, "token", "head"),
                                   RotationCodec(3), RotationCodec(8, "fp8")], ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e6])
def test_values_a_codec_cannot_store_are_refused_naming_the_store(codec, bad):
    x = torch.randn(1, 2, 16, 32)
    x[0, 1, 3, 5] = bad
    store = PagedStore(codec, "layer 7 keys")
    if bad == 1e6 and isinstance(codec, RotationCodec) and codec.quantizer == "fp8":
        store.append(x)  # fp8 keeps a per-token scale: a large value is representable
        return
    with pytest.raises(ValueError, match="layer 7 keys: .*(non-finite|fp16 range|exceeds)"):
        store.append(x)
    assert store.tokens == 0 and not store.pages  # nothing half-written


@settings(**SETTINGS)
@given(data=st.data(), axis=st.sampled_from(["token", "channel"]), center=st.sampled_from(["none", "head", "channel"]),
       page=st.sampled_from([16, 32, 48]))
def test_a_store_fed_in_pieces_equals_one_fed_at_once_and_never_copies_a_sealed_page(data, axis, center, page):
    codec = GroupCodec(2, 16, axis, center)
    unit = codec.tokens_per_unit
    pieces = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=8))
    x = torch.randn(1, 2, unit * sum(pieces), 32, generator=torch.Generator().manual_seed(len(pieces)))
    whole = PagedStore(codec, "whole", page_tokens=page)
    whole.append(x[:, :, :unit * pieces[0]])  # the same first block: a channel mean is fixed by the first block
    whole.append(x[:, :, unit * pieces[0]:])
    parts = PagedStore(codec, "parts", page_tokens=page)
    done, sealed = 0, {}
    for n in pieces:
        parts.append(x[:, :, done:done + n * unit])
        done += n * unit
        for i, p in enumerate(parts.pages[:-1]):  # every page but the last is sealed: its tensors stay put
            ptr = p["codes"].data_ptr()
            assert sealed.setdefault(i, ptr) == ptr
    assert torch.equal(parts.decode(torch.float32), whole.decode(torch.float32))
    assert all(f == parts.page_tokens for f in parts.fills[:-1]) and sum(parts.fills) == x.shape[2]
    assert parts.copied <= len(pieces) * parts.page_tokens * 2 * 32  # at most a page per append (codes are smaller)
    drop = data.draw(st.integers(0, sum(pieces))) * unit
    parts.drop_front(drop)
    assert torch.equal(parts.decode(torch.float32), whole.decode(torch.float32)[:, :, drop:]) if drop < x.shape[2] \
        else parts.tokens == 0
