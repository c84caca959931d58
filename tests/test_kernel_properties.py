"""Property-based test of the CPU decode kernel against its PyTorch reference: random codecs for keys and values
(grouped codes of every width, both axes, the three centrings; rotated Lloyd-Max, uniform and fp8 codes), random
GQA shapes and head dims, stored and exact token counts (page boundaries included), query tokens, padding masks,
work splits and fp32/bf16 inputs. Tolerance as in tests/test_cpu_decode.py: the kernel computes in float32 and
rounds once to the input dtype. The int8 key scores (qdot="int8") are checked the same way against the reference's
emulation of them."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvshrink.codecs import GroupCodec, PagedStore, RotationCodec
from kvshrink.codecs.base import BIT_WIDTHS
from kvshrink.kernels import cpu, reference

WHY = cpu.unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"the CPU kernel is unavailable here: {WHY}")
SETTINGS = dict(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def codecs(draw, d: int):
    """A codec the kernel reads, for head dim d."""
    kind = draw(st.sampled_from(["grouped", "lloydmax", "uniform", "fp8", "rotated16"]))
    if kind == "grouped":
        axis = draw(st.sampled_from(["token", "channel"]))
        group = draw(st.sampled_from([g for g in (8, 16, 32) if d % g == 0])) if axis == "token" else 32
        return GroupCodec(draw(st.sampled_from(BIT_WIDTHS["uniform"])), group, axis,
                          draw(st.sampled_from(["none", "head", "channel"])))
    norm = draw(st.sampled_from(["float16", "float32"]))
    seed = draw(st.integers(0, 3))
    if kind == "lloydmax":
        return RotationCodec(draw(st.sampled_from(BIT_WIDTHS["lloydmax"])), norm=norm, seed=seed)
    if kind == "uniform":
        return RotationCodec(draw(st.sampled_from([2, 3, 4, 8])), "uniform", group=16, norm=norm, seed=seed)
    if kind == "fp8":
        return RotationCodec(8, "fp8", rotate=draw(st.booleans()), norm="float32", seed=seed)
    return RotationCodec(16, seed=seed)


def _problem(kc, vc, b, hkv, rep, qn, d, stored, exact, piece, pieces, masked, dtype, seed):
    """A random decode problem: `stored` tokens coded in stores (appended in random pieces of up to `pieces - 1` x
    `piece` tokens, as a cache flushes blocks), `exact` exact tokens of which up to 4 are sinks, queries, a mask
    with left padding when `masked`."""
    exact = max(exact, qn) if stored == 0 else exact
    g = torch.Generator().manual_seed(seed)
    ks, vs = PagedStore(kc, "keys"), PagedStore(vc, "values")
    done = 0
    while done < stored:
        n = min(stored - done, piece * int(torch.randint(1, pieces, (1,), generator=g)))
        ks.append(torch.randn(b, hkv, n, d, generator=g) * 2 + torch.randn(1, 1, 1, d, generator=g))
        vs.append(torch.randn(b, hkv, n, d, generator=g))
        done += n
    sinks = min(4, exact)
    ek = torch.randn(b, hkv, exact, d, generator=g).to(dtype)
    ev = torch.randn(b, hkv, exact, d, generator=g).to(dtype)
    q = torch.randn(b, hkv * rep, qn, d, generator=g).to(dtype)
    index = torch.cat([torch.arange(sinks), torch.arange(sinks + stored, stored + exact)])
    mask = None
    if masked:
        mask = torch.rand(b, 1, qn, stored + exact, generator=g) > 0.3
        mask[0, :, :, :int(torch.randint(0, stored + exact, (1,), generator=g))] = False  # left padding
    return q, ks, vs, ek, ev, index, sinks, mask


@settings(**SETTINGS)
@given(data=st.data(), d=st.sampled_from([32, 64, 128]), hkv=st.integers(1, 3), rep=st.sampled_from([1, 2, 3, 6]),
       b=st.integers(1, 2), groups=st.integers(0, 20), exact=st.integers(0, 40), qn=st.sampled_from([1, 2, 4]),
       masked=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       split=st.sampled_from([None, 64, 128]), seed=st.integers(0, 2**31 - 1))
def test_kernel_equals_reference_on_random_problems(data, d, hkv, rep, b, groups, exact, qn, masked, dtype, split,
                                                     seed):
    kc, vc = data.draw(codecs(d), "keys"), data.draw(codecs(d), "values")
    stored = 32 * groups  # whole per-channel groups; up to 640 tokens: three 256-token pages
    q, ks, vs, ek, ev, index, sinks, mask = _problem(kc, vc, b, hkv, rep, qn, d, stored, exact, 32, 9, masked, dtype,
                                                     seed)
    want = reference.packed_attention(q.float(), ks, vs, ek.float(), ev.float(), index, sinks, mask=mask,
                                      scaling=0.25)
    got = cpu.packed_attention(q, ks, vs, ek, ev, index, sinks, mask=mask, scaling=0.25, block_tokens=split)
    assert got.shape == q.shape and got.dtype == dtype
    tol = dict(atol=5e-5, rtol=2e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(got.float(), want, **tol)


@settings(**SETTINGS)
@given(data=st.data(), d=st.sampled_from([32, 64, 128]), hkv=st.integers(1, 3), rep=st.sampled_from([1, 2, 3, 6]),
       b=st.integers(1, 2), groups=st.integers(0, 10), exact=st.integers(0, 40), qn=st.sampled_from([1, 2, 4]),
       masked=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       split=st.sampled_from([None, 64, 128]), seed=st.integers(0, 2**31 - 1))
def test_int8_key_scores_equal_the_reference_emulation_on_random_problems(data, d, hkv, rep, b, groups, exact, qn,
                                                                          masked, dtype, split, seed):
    """qdot="int8" with per-channel key groups of 2/3/4/8 bits (no head mean; groups of 16, 32 or 64 tokens) and
    any value codec: equal to the reference's emulation of the int8 query within the float tolerances above, and
    every integer path this build has (VNNI, AVX2, plain loops) gives the same bits."""
    kc = GroupCodec(data.draw(st.sampled_from([2, 3, 4, 8]), "key bits"), data.draw(st.sampled_from([16, 32, 64])),
                    "channel", data.draw(st.sampled_from(["none", "channel"])))
    vc = data.draw(codecs(d), "values")
    q, ks, vs, ek, ev, index, sinks, mask = _problem(kc, vc, b, hkv, rep, qn, d, 64 * groups, exact, 64, 5, masked,
                                                     dtype, seed)
    want = reference.packed_attention(q.float(), ks, vs, ek.float(), ev.float(), index, sinks, mask=mask,
                                      scaling=0.25, qdot="int8")
    got = cpu.packed_attention(q, ks, vs, ek, ev, index, sinks, mask=mask, scaling=0.25, block_tokens=split,
                               qdot="int8")
    path = data.draw(st.sampled_from([p for p in cpu.qdot_paths() if p.startswith("int8-")]), "path")
    assert torch.equal(cpu.packed_attention(q, ks, vs, ek, ev, index, sinks, mask=mask, scaling=0.25,
                                            block_tokens=split, qdot=path), got)
    tol = dict(atol=5e-5, rtol=2e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(got.float(), want, **tol)


def test_int8_reference_divides_as_the_kernel_does():
    """A problem hypothesis found: one folded query entry sits one ulp above 78.5 when 127 / amax is a true division
    (the kernel's), and one ulp below when it is torch's `127.0 / tensor` (reciprocal, then multiply), so the two
    rounded it to different integers and one output row moved by 5e-3. The reference now divides as the kernel does."""
    kc, vc = GroupCodec(4, 16, "channel", "channel"), RotationCodec(16, seed=0)
    q, ks, vs, ek, ev, index, sinks, mask = _problem(kc, vc, 1, 1, 6, 4, 128, 192, 0, 64, 5, False, torch.float32, 3)
    want = reference.packed_attention(q, ks, vs, ek, ev, index, sinks, mask=mask, scaling=0.25, qdot="int8")
    got = cpu.packed_attention(q, ks, vs, ek, ev, index, sinks, mask=mask, scaling=0.25, qdot="int8")
    torch.testing.assert_close(got, want, atol=5e-5, rtol=2e-4)
