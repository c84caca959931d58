"""Triton kernels against their PyTorch references, through Triton's interpreter when there is no GPU.

conftest.py sets TRITON_INTERPRET=1 before anything imports Triton (on machines without CUDA), so these run on CPU
tensors in CI. Shapes are small; the cases cover every code width, both group axes, the three centerings, head dims
64/128/256, GQA ratios 1/3/4, odd context lengths, several query tokens with causal and explicit masks.
"""
import pytest
import torch

import kvshrink as ks
from kvshrink.codecs.quant import GroupCodec, encode_block
from kvshrink.codecs.rotation import RotationCodec
from kvshrink.codecs.store import PagedStore

from conftest import greedy, logits_through, tiny_gemma3, tiny_llama

pytest.importorskip("triton", reason="the kernel tests need Triton (installed by `make setup`)")

from kvshrink import kernels  # noqa: E402
from kvshrink.kernels import reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and not kernels.interpreting():
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1 (conftest sets it)", allow_module_level=True)


def _same_bits(a, b):
    assert (a is None) == (b is None)
    if a is None:
        return
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    if a.dtype == torch.float16:
        a, b = a.view(torch.int16), b.view(torch.int16)
    mismatch = (a != b).sum().item()
    assert mismatch == 0, f"{mismatch} of {a.numel()} elements differ"


def _block(shape, dtype, seed, kind="normal"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    if kind == "ties":  # values on a coarse grid: many codes land exactly on .5 and constant groups have scale 0
        x = torch.round(x * 2) / 4
        x[..., :8, :] = 1.25
    elif kind == "large":
        x = x * 2000
    return x.to(dtype).to(DEV)


QUANT_CASES = [
    (bits, axis, group, center, d, dtype, kind)
    for i, (bits, axis, group, center, d) in enumerate([
        (2, "token", 32, "none", 64), (2, "channel", 32, "head", 128), (2, "token", 16, "channel", 256),
        (3, "token", 32, "head", 64), (3, "channel", 16, "channel", 64), (3, "token", 64, "none", 128),
        (4, "token", 64, "head", 256), (4, "channel", 64, "none", 64), (4, "token", 16, "channel", 128),
        (8, "token", 128, "channel", 128), (8, "channel", 32, "head", 256), (8, "token", 32, "none", 64),
        (16, "token", 32, "head", 64), (16, "channel", 32, "channel", 128), (16, "token", 32, "none", 64),
    ])
    for dtype, kind in ([(torch.float16, "normal"), (torch.float32, "ties")] if i % 2 else
                        [(torch.bfloat16, "normal"), (torch.float32, "large")])
]


@pytest.mark.parametrize("bits,axis,group,center,d,dtype,kind", QUANT_CASES)
def test_quantize_pack_matches_reference_bit_for_bit(bits, axis, group, center, d, dtype, kind):
    heads, tokens = (3, 64) if d < 256 else (1, 32)
    x = _block((2, heads, tokens, d), dtype, seed=bits * 7 + d, kind=kind)
    spec = GroupCodec(bits, group, axis, center)
    cm = x.float().mean(2, keepdim=True).half() if center == "channel" else None
    want = reference.quantize_pack(x, spec, cm)
    got = kernels.quantize_pack(x, spec, cm)
    for a, b in zip(want, got):
        _same_bits(a, b)


def test_quantize_pack_reports_fp16_overflow_like_the_reference():
    x = torch.full((1, 2, 16, 64), 1e5).to(DEV)
    x[:, :, :, 0] = -1e5
    spec = GroupCodec(4, 32, "token", "none")
    with pytest.raises(ValueError, match="fp16 range"):
        encode_block(x, spec)
    with pytest.raises(ValueError, match="fp16 range"):
        kernels.quantize_pack(x, spec)


def test_unsupported_layouts_are_named():
    assert "power of two" in kernels.unsupported(GroupCodec(4, 32), 96)
    assert "multiple of 8" in kernels.unsupported(GroupCodec(3, 4, "token"), 64)
    assert kernels.unsupported(GroupCodec(2, 32, "channel"), 64) is None
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        kernels.quantize_pack(torch.zeros(1, 1, 4, 96, device=DEV), GroupCodec(4, 32))


def _stores(b, hkv, t, d, kspec, vspec, seed):
    ks_, vs_ = PagedStore(kspec, "keys"), PagedStore(vspec, "values")
    g = torch.Generator().manual_seed(seed)
    if t:
        ks_.append((torch.randn(b, hkv, t, d, generator=g) + torch.randn(1, 1, 1, d, generator=g) * 2).to(DEV))
        vs_.append(torch.randn(b, hkv, t, d, generator=g).to(DEV))
    return ks_, vs_


ATTN_CASES = [
    # bits, key axis/group/center, value axis/group/center, head dim, query heads, kv heads, stored, exact, qn
    (2, ("channel", 32, "head"), ("token", 32, "head"), 64, 9, 3, 96, 11, 1),
    (2, ("channel", 16, "channel"), ("token", 16, "none"), 128, 8, 2, 208, 5, 4),
    (3, ("channel", 32, "none"), ("token", 32, "channel"), 64, 4, 4, 64, 7, 1),
    (3, ("token", 64, "head"), ("token", 64, "head"), 256, 4, 1, 32, 3, 3),
    (4, ("token", 32, "none"), ("channel", 32, "none"), 128, 12, 3, 160, 37, 2),
    (4, ("channel", 64, "channel"), ("token", 16, "channel"), 256, 2, 1, 64, 1, 1),
    (8, ("channel", 32, "head"), ("token", 128, "none"), 128, 32, 8, 96, 9, 1),
    (8, ("token", 16, "none"), ("token", 16, "none"), 64, 3, 3, 0, 13, 5),
    (16, ("token", 32, "head"), ("token", 32, "none"), 64, 6, 2, 48, 4, 2),
]


def _attention_problem(kspec, vspec, d, hq, hkv, stored, exact, qn, masked, seed=0):
    """Two sequences: stores of `stored` random tokens, `exact` exact ones (the first two are sinks), queries, an
    optional random padding mask (the second sequence left-padded by 5)."""
    b, sinks = 2, min(2, exact)
    ks_, vs_ = _stores(b, hkv, stored, d, kspec, vspec, seed=stored + d + seed)
    g = torch.Generator().manual_seed(d + qn + seed)
    ek = torch.randn(b, hkv, exact, d, generator=g).to(DEV)
    ev = torch.randn(b, hkv, exact, d, generator=g).to(DEV)
    q = torch.randn(b, hq, qn, d, generator=g).to(DEV)
    index = torch.cat([torch.arange(sinks), torch.arange(sinks + stored, stored + exact)])
    mask = None
    if masked:
        mask = (torch.rand(b, 1, qn, stored + exact, generator=g) > 0.3).to(DEV)
        mask[1, :, :, :5] = False  # left padding of the second sequence
    return q, ks_, vs_, ek, ev, index, sinks, mask


@pytest.mark.parametrize("bits,kcfg,vcfg,d,hq,hkv,stored,exact,qn", ATTN_CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_packed_attention_matches_reference(bits, kcfg, vcfg, d, hq, hkv, stored, exact, qn, masked):
    q, ks_, vs_, ek, ev, index, sinks, mask = _attention_problem(
        GroupCodec(bits, kcfg[1], kcfg[0], kcfg[2]), GroupCodec(bits, vcfg[1], vcfg[0], vcfg[2]), d, hq, hkv, stored,
        exact, qn, masked)
    want = reference.packed_attention(q, ks_, vs_, ek, ev, index, sinks, mask=mask, scaling=0.3)
    got = kernels.packed_attention(q, ks_, vs_, ek, ev, index, sinks, mask=mask, scaling=0.3, block_tokens=32)
    assert got.shape == want.shape and got.dtype == q.dtype
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


ROTATED_CASES = [
    # key codec, value codec, head dim, query heads, kv heads, stored, exact, query tokens
    (RotationCodec(3, layer=1), RotationCodec(2, layer=1), 128, 12, 2, 96, 9, 1),   # the 0.20 profile's layers
    (RotationCodec(4, norm="float32"), RotationCodec(3), 64, 6, 3, 64, 5, 4),
    (RotationCodec(8, "fp8", rotate=False, norm="float32", norm_correction=False), RotationCodec(4), 64, 4, 2,
     48, 3, 1),                                                                      # vLLM's k8v4
    (RotationCodec(4, "uniform", group=32), RotationCodec(2, "uniform", group=16), 64, 4, 2, 64, 3, 2),
    (RotationCodec(16), RotationCodec(16), 64, 4, 4, 32, 2, 1),
    (GroupCodec(2, 32, "channel"), RotationCodec(3), 64, 6, 2, 64, 7, 1),              # tada: grouped keys
]


@pytest.mark.parametrize("kspec,vspec,d,hq,hkv,stored,exact,qn", ROTATED_CASES,
                         ids=[f"{k.describe()}-{v.describe()}" for k, v, *_ in ROTATED_CASES])
@pytest.mark.parametrize("masked", [False, True])
def test_packed_attention_reads_rotated_codes_as_the_reference_decodes_them(kspec, vspec, d, hq, hkv, stored, exact,
                                                                            qn, masked):
    """Lloyd-Max codes times their norms, fp8 bytes times a scale, uniform groups of rotated channels: read in the
    rotated space (query turned once per KV head, output turned back once), equal to decoding every token."""
    assert kernels.unsupported(kspec, d) is None and kernels.unsupported(vspec, d) is None
    q, ks_, vs_, ek, ev, index, sinks, mask = _attention_problem(kspec, vspec, d, hq, hkv, stored, exact, qn, masked,
                                                                 seed=1)
    want = reference.packed_attention(q, ks_, vs_, ek, ev, index, sinks, mask=mask, scaling=0.3)
    got = kernels.packed_attention(q, ks_, vs_, ek, ev, index, sinks, mask=mask, scaling=0.3, block_tokens=32)
    assert got.shape == want.shape and got.dtype == q.dtype
    torch.testing.assert_close(got, want, atol=3e-5, rtol=2e-4)


def test_packed_attention_reads_the_codes_it_is_given():
    """A corrupted code byte must change the kernel's output exactly as it changes the reference's."""
    ks_, vs_ = _stores(1, 2, 64, 64, GroupCodec(2, 32, "channel", "none"), GroupCodec(2, 32, "token", "none"), 3)
    q = torch.randn(1, 4, 1, 64).to(DEV)
    ek = ev = torch.zeros(1, 2, 0, 64, device=DEV)
    index = torch.zeros(0, dtype=torch.int32)
    before = kernels.packed_attention(q, ks_, vs_, ek, ev, index, 0)
    vs_.pages[0]["codes"][0, 1, 40] ^= 0xFF
    after = kernels.packed_attention(q, ks_, vs_, ek, ev, index, 0)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, reference.packed_attention(q, ks_, vs_, ek, ev, index, 0), atol=2e-5, rtol=1e-4)


def test_packed_attention_splits_do_not_change_the_result():
    ks_, vs_ = _stores(1, 1, 192, 64, GroupCodec(4, 32, "channel", "head"), GroupCodec(4, 32, "token", "head"), 5)
    q = torch.randn(1, 3, 1, 64).to(DEV)
    ek = ev = torch.randn(1, 1, 4, 64).to(DEV)
    index = torch.tensor([0, 193, 194, 195])
    outs = [kernels.packed_attention(q, ks_, vs_, ek, ev, index, 1, splits=s, block_tokens=16) for s in (1, 3, 13)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(outs[0], outs[2], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3])
def test_tiny_llama_decodes_the_same_through_the_kernels(chunk):
    model = tiny_llama().to(DEV)
    ids = torch.randint(2, 90, (2, 45), generator=torch.Generator().manual_seed(1)).to(DEV)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    opts = dict(bits=4, group=16, window=8, sinks=2)
    ref_cache = ks.make_cache(model, "tada", kernel="torch", **opts)
    want, want_tok = logits_through(model, ids, ref_cache, 12, chunk, mask)
    cache = ks.make_cache(model, "tada", kernel="triton", **opts)
    assert all(layer.backend == "triton" for layer in cache.layers)
    assert model.config._attn_implementation == "kvshrink"
    got, got_tok = logits_through(model, ids, cache, 12, chunk, mask)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got_tok, want_tok)
    layer = cache.layers[0]  # a left-padded batch keeps one layer per row
    assert all(row.backend == "triton" and row.key_store.tokens > 0 for row in layer.rows)  # the kernel read codes


@pytest.mark.parametrize("spec,opts", [
    ("tada", dict(bits=3, rotate="both", mean="none", group=16, window=8, sinks=2)),   # rotation-aware profiles' layers
    ("turboquant", dict(bits=3, window=8, sinks=2)),
])
def test_tiny_llama_decodes_rotated_codes_the_same_through_the_kernels(spec, opts):
    """Rotated codes on the GPU path: the Triton kernel reads them in the rotated space; the PyTorch reference
    (decode, then SDPA) gives the same tokens and logits within float tolerance."""
    model = tiny_llama().to(DEV)
    ids = torch.randint(2, 90, (1, 45), generator=torch.Generator().manual_seed(3)).to(DEV)
    reference_opts = dict(kernel="torch") if spec == "tada" else dict(attention="decode")
    want, want_tok = logits_through(model, ids, ks.make_cache(model, spec, **opts, **reference_opts), 10)
    kernel_opts = dict(kernel="triton") if spec == "tada" else dict(attention="triton")
    cache = ks.make_cache(model, spec, **opts, **kernel_opts)
    assert all(layer.backend == "triton" for layer in cache.layers)
    got, got_tok = logits_through(model, ids, cache, 10)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got_tok, want_tok)
    assert cache.layers[0].key_store.tokens > 0  # the kernel read codes


def test_tiny_gemma3_sliding_layers_through_the_kernels():
    model = tiny_gemma3(sliding_window=16).to(DEV)
    ids = torch.randint(2, 90, (1, 40), generator=torch.Generator().manual_seed(2)).to(DEV)
    opts = dict(bits=4, group=16, window=4, sinks=0)
    want = greedy(model, ids, ks.make_cache(model, "kivi", kernel="torch", **opts), n=16)
    got = greedy(model, ids, ks.make_cache(model, "kivi", kernel="triton", **opts), n=16)
    assert torch.equal(got, want)


def test_kernel_option_errors_are_clear():
    model = tiny_llama().to(DEV)
    with pytest.raises(ValueError, match="kernel must be one of auto, triton, torch"):
        ks.make_cache(model, "tada", kernel="cuda")
    with pytest.raises(ValueError, match="config, not the model"):
        ks.make_cache(model.config, "tada", kernel="triton", group=16)
    with pytest.raises(ValueError, match="layer 0 values: per-token groups"):
        ks.make_cache(model, "tada", kernel="triton", bits=3, value_group=4, group=16)
    auto = ks.make_cache(tiny_llama(), "tada", group=16)  # a CPU model: auto takes the CPU kernel, not Triton
    assert not any(layer.backend == "triton" for layer in auto.layers)


def test_kernel_path_refuses_non_finite_values_before_compressing_them():
    model = tiny_llama().to(DEV)
    cache = ks.make_cache(model, "kivi", kernel="triton", bits=4, group=16, window=4, sinks=0)
    layer = cache.layers[0]
    k = torch.randn(1, 2, 20, 16).to(DEV)
    layer.update(k, k)  # a prefill: PyTorch path
    assert layer.key_store.tokens == 16
    bad = torch.randn(1, 2, 1, 16).to(DEV)
    bad[0, 1, 0, 3] = float("nan")
    step = torch.randn(1, 2, 1, 16).to(DEV)
    q = torch.randn(1, 4, 1, 16).to(DEV)
    layer.update(bad, step)  # a decode step: the kernel path; the NaN stays in the exact window for now
    layer.attend(q, None, 0.25)
    with pytest.raises(ValueError, match=r"layer 0: key_states contain NaN or Inf"):
        for _ in range(16):  # ... and is refused when its block leaves the window to be compressed
            layer.update(step, step)
            layer.attend(q, None, 0.25)
    assert layer.key_store.tokens == 16  # nothing half-written
