"""The CPU decode-attention kernel (`kernel=cpu`) against its PyTorch reference, and its fallbacks.

The C++ extension is built on first use (about 15 s, then cached under the kvshrink cache dir); where it cannot be
built (no compiler) the tests that need it are skipped with the reason, and the fallback tests still run. Cases
cover code widths 2/3/4/8/16, both group axes as kivi/tada use them, the three centerings, GQA ratios 1/3/6, head
dims 64/128/256 (and 36/40, which take the generic loops), padding masks, 1 and 4 query tokens, fp32 and bf16.
"""
import os
import warnings
from pathlib import Path

import pytest
import torch

import kvshrink as ks
from kvshrink.codecs.quant import GroupCodec
from kvshrink.codecs.store import PagedStore
from kvshrink.codecs.rotation import RotationCodec
from kvshrink.kernels import cpu, reference

from conftest import greedy, logits_through, tiny_gemma3, tiny_llama

WHY = cpu.unavailable()
needs_kernel = pytest.mark.skipif(WHY is not None, reason=f"the CPU kernel is unavailable here: {WHY}")


def _stores(b, hkv, t, d, kspec, vspec, seed):
    k, v = PagedStore(kspec, "keys"), PagedStore(vspec, "values")
    g = torch.Generator().manual_seed(seed)
    if t:
        k.append(torch.randn(b, hkv, t, d, generator=g) + torch.randn(1, 1, 1, d, generator=g) * 2)
        v.append(torch.randn(b, hkv, t, d, generator=g))
    return k, v


def _problem(b, hq, hkv, d, stored, exact, qn, kspec, vspec, masked, dtype, seed=0):
    sinks = min(2, exact)
    k, v = _stores(b, hkv, stored, d, kspec, vspec, seed=seed + stored + d)
    g = torch.Generator().manual_seed(seed + d + qn)
    ek = torch.randn(b, hkv, exact, d, generator=g).to(dtype)
    ev = torch.randn(b, hkv, exact, d, generator=g).to(dtype)
    q = torch.randn(b, hq, qn, d, generator=g).to(dtype)
    index = torch.cat([torch.arange(sinks), torch.arange(sinks + stored, stored + exact)])
    mask = None
    if masked:
        mask = torch.rand(b, 1, qn, stored + exact, generator=g) > 0.2
        mask[-1, :, :, :7] = False  # left padding of the last sequence (a sink and stored tokens)
    return q, k, v, ek, ev, index, sinks, mask


KIVI, TADA = ("channel", "token", "none"), ("channel", "token", "head")
CASES = [
    # bits, (key axis, value axis, center), head dim, query heads, kv heads, stored, exact, query tokens
    (2, KIVI, 128, 12, 2, 320, 36, 1),       # Qwen-shaped, GQA 6
    (2, TADA, 128, 12, 2, 192, 9, 4),
    (3, KIVI, 64, 3, 3, 128, 5, 1),          # GQA 1
    (3, TADA, 256, 6, 2, 96, 3, 4),          # GQA 3
    (4, KIVI, 256, 6, 1, 64, 7, 1),          # GQA 6
    (4, ("channel", "token", "channel"), 64, 9, 3, 160, 12, 4),
    (8, TADA, 64, 6, 6, 96, 4, 1),
    (8, ("token", "channel", "none"), 128, 6, 2, 128, 11, 4),
    (16, TADA, 128, 6, 1, 64, 5, 4),
    (2, ("token", "token", "channel"), 64, 4, 4, 96, 2, 1),
    (4, ("channel", "channel", "head"), 128, 3, 1, 128, 0, 1),   # no exact tokens
    (3, ("token", "channel", "channel"), 36, 6, 2, 96, 6, 4),    # head dim 36: the generic (non-AVX2) loops
    (2, ("channel", "token", "head"), 40, 3, 1, 64, 4, 1),       # 40: AVX2 scores, generic value sums
    (2, ("channel", "token", "head"), 36, 6, 2, 64, 5, 1),       # 2/4-bit byte tables (rows not in 8s)
    (4, ("channel", "token", "head"), 36, 4, 4, 64, 3, 4),
    (8, KIVI, 64, 6, 2, 0, 13, 4),                               # nothing stored yet
]


@needs_kernel
@pytest.mark.parametrize("bits,layout,d,hq,hkv,stored,exact,qn", CASES)
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_kernel_matches_reference(bits, layout, d, hq, hkv, stored, exact, qn, masked, dtype):
    key_axis, value_axis, center = layout
    group = 32 if d % 32 == 0 else (12 if d == 36 else 8)
    kspec = GroupCodec(bits, group if key_axis == "token" else 32, key_axis, center)
    vspec = GroupCodec(bits, group if value_axis == "token" else 32, value_axis, center)
    q, k, v, ek, ev, index, sinks, mask = _problem(2, hq, hkv, d, stored, exact, qn, kspec, vspec, masked, dtype)
    # the reference in float32 from the same (possibly bf16) inputs; the kernel rounds its float32 result once
    want = reference.packed_attention(q.float(), k, v, ek.float(), ev.float(), index, sinks, mask=mask, scaling=0.3)
    got = cpu.packed_attention(q, k, v, ek, ev, index, sinks, mask=mask, scaling=0.3, block_tokens=64)
    assert got.shape == q.shape and got.dtype == dtype
    tol = dict(atol=3e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(got.float(), want, **tol)


ROTATED = [
    # key codec, value codec, head dim, query heads, kv heads, stored, exact, query tokens
    (RotationCodec(3, layer=1), RotationCodec(4, layer=1), 128, 12, 2, 600, 36, 1),  # Qwen-shaped, > 2 pages
    (RotationCodec(2, norm="float32"), RotationCodec(2), 64, 6, 3, 96, 5, 4),
    (RotationCodec(8, "fp8", rotate=False, norm="float32", norm_correction=False), RotationCodec(4), 128, 6, 2,
     300, 8, 1),                                                                       # vLLM's k8v4
    (RotationCodec(4, "uniform", group=32), RotationCodec(3, "uniform", group=16), 64, 4, 2, 128, 3, 4),
    (RotationCodec(16), RotationCodec(16), 64, 4, 4, 64, 2, 1),
    (GroupCodec(2, 32, "channel"), RotationCodec(3), 128, 6, 2, 256, 7, 1),             # tada: grouped keys
    (RotationCodec(2), GroupCodec(4, 32, "token"), 64, 3, 1, 64, 0, 4),                # rotated keys only
]


@needs_kernel
@pytest.mark.parametrize("kspec,vspec,d,hq,hkv,stored,exact,qn", ROTATED, ids=lambda x: getattr(x, "describe",
                                                                                             lambda: None)())
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_kernel_reads_rotated_codes_as_the_reference_decodes_them(kspec, vspec, d, hq, hkv, stored, exact, qn,
                                                                      masked, dtype):
    """Rotated codes (Lloyd-Max with their norms, fp8 with a scale, uniform groups) read in their rotated space: the
    query turns once per KV head, the values' weighted sum turns back once; the reference decodes every token."""
    q, k, v, ek, ev, index, sinks, mask = _problem(2, hq, hkv, d, stored, exact, qn, kspec, vspec, masked, dtype)
    want = reference.packed_attention(q.float(), k, v, ek.float(), ev.float(), index, sinks, mask=mask, scaling=0.3)
    got = cpu.packed_attention(q, k, v, ek, ev, index, sinks, mask=mask, scaling=0.3, block_tokens=64)
    tol = dict(atol=5e-5, rtol=2e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(got.float(), want, **tol)


@needs_kernel
@pytest.mark.parametrize("kspec,vspec", [(GroupCodec(3, 32, "channel", "head"), GroupCodec(2, 32, "token")),
                                         (RotationCodec(3), RotationCodec(4))], ids=["grouped", "rotated"])
@pytest.mark.parametrize("window", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16_bit_exact_tokens_and_int32_positions_give_the_widened_inputs_bits(kspec, vspec, window):
    """The layers hand the kernel their exact window as held (`exact_dtype`, 16 bits) with int32 positions; the
    op widens them itself, which must give exactly what float32 copies and int64 positions give."""
    q, k, v, ek, ev, index, sinks, _ = _problem(2, 6, 2, 64, 192, 9, 1, kspec, vspec, False, torch.float32)
    ek, ev = ek.to(window), ev.to(window)
    got = cpu.packed_attention(q, k, v, ek, ev, index.int(), sinks, block_tokens=64)
    want = cpu.packed_attention(q, k, v, ek.float(), ev.float(), index.long(), sinks, block_tokens=64)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    mixed = cpu.packed_attention(q, k, v, ek, ev.float(), index.int(), sinks, block_tokens=64)  # both widened
    torch.testing.assert_close(mixed, want, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="one per exact token"):
        cpu.packed_attention(q, k, v, ek, ev, index[:-1], sinks, block_tokens=64)


@needs_kernel
def test_work_split_does_not_change_the_result():
    q, k, v, ek, ev, index, sinks, _ = _problem(1, 6, 2, 128, 1024, 8, 1, GroupCodec(2, 32, "channel", "head"),
                                                GroupCodec(2, 32, "token", "head"), False, torch.float32)
    outs = [cpu.packed_attention(q, k, v, ek, ev, index, sinks, block_tokens=n) for n in (64, 320, 4096, None)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-6, rtol=1e-5)


@needs_kernel
def test_fully_masked_rows_give_zeros_like_the_reference():
    q, k, v, ek, ev, index, sinks, _ = _problem(2, 4, 2, 64, 64, 4, 2, GroupCodec(4, 32, "channel"),
                                                GroupCodec(4, 32, "token"), False, torch.float32)
    mask = torch.ones(2, 1, 2, 68, dtype=torch.bool)
    mask[1, :, 0] = False  # the second sequence's first query sees nothing
    got = cpu.packed_attention(q, k, v, ek, ev, index, sinks, mask=mask)
    want = reference.packed_attention(q, k, v, ek, ev, index, sinks, mask=mask)
    assert torch.equal(got[1, :, 0], torch.zeros_like(got[1, :, 0]))
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4)


@needs_kernel
def test_cpu_kernel_reads_the_codes_it_is_given():
    q, k, v, ek, ev, index, sinks, _ = _problem(1, 4, 2, 64, 64, 0, 1, GroupCodec(2, 32, "channel"),
                                                GroupCodec(2, 32, "token"), False, torch.float32)
    before = cpu.packed_attention(q, k, v, ek, ev, index, sinks)
    v.pages[0]["codes"][0, 1, 40] ^= 0xFF
    k.pages[0]["codes"][0, 0, 1, 3] ^= 0x0F
    after = cpu.packed_attention(q, k, v, ek, ev, index, sinks)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, reference.packed_attention(q, k, v, ek, ev, index, sinks), atol=3e-5,
                               rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("method,chunk", [("tada", 1), ("kivi", 3)])
def test_tiny_llama_decodes_the_same_through_the_cpu_kernel(method, chunk):
    model = tiny_llama()
    ids = torch.randint(2, 90, (2, 45), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    opts = dict(bits=4, group=16, window=8, sinks=2)
    want, want_tok = logits_through(model, ids, ks.make_cache(model, method, kernel="torch", **opts), 12, chunk, mask)
    cache = ks.make_cache(model, method, kernel="cpu", **opts)
    assert all(layer.backend == "cpu" for layer in cache.layers)
    assert model.config._attn_implementation == "kvshrink"
    got, got_tok = logits_through(model, ids, cache, 12, chunk, mask)  # note_attention_mask splits the rows
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got_tok, want_tok)
    layer = cache.layers[0]  # a left-padded batch keeps one layer per row
    assert all(row.backend == "cpu" and row.key_store.tokens > 0 for row in layer.rows)  # the kernel read codes


@needs_kernel
def test_tiny_gemma3_sliding_layers_through_the_cpu_kernel():
    model = tiny_gemma3(sliding_window=16)
    ids = torch.randint(2, 90, (1, 40), generator=torch.Generator().manual_seed(2))
    opts = dict(bits=4, group=16, window=4, sinks=0)
    want = greedy(model, ids, ks.make_cache(model, "kivi", kernel="torch", **opts), n=16)
    got = greedy(model, ids, ks.make_cache(model, "kivi", kernel="cpu", **opts), n=16)
    assert torch.equal(got, want)


@needs_kernel
@needs_kernel
def test_rotation_layers_decode_through_the_kernel_as_through_the_pytorch_path():
    model = tiny_llama()
    ids = torch.randint(2, 90, (1, 40), generator=torch.Generator().manual_seed(3))
    opts = dict(bits=4, group=16, window=4, sinks=0, mean="none", rotate="keys")
    cache = ks.make_cache(model, "tada", kernel="cpu", **opts)
    assert all(layer.backend == "cpu" for layer in cache.layers)
    assert torch.equal(greedy(model, ids, cache, n=8),
                       greedy(model, ids, ks.make_cache(model, "tada", kernel="torch", **opts), n=8))
    assert cpu.unsupported(RotationCodec(4), 64) is None and cpu.unsupported(GroupCodec(3, 32, "channel", "head"),
                                                                             64) is None
    assert "uniform groups of 48 do not divide" in cpu.unsupported(RotationCodec(4, "uniform", group=48), 64)


def test_layers_whose_codec_has_no_cpu_kernel_fall_back_to_the_pytorch_path_and_say_so(monkeypatch):
    model = tiny_llama()
    opts = dict(bits=4, group=16, window=4, sinks=0, mean="none", rotate="keys")
    real = cpu.unsupported
    monkeypatch.setattr(cpu, "unsupported", lambda spec, d: "a test's refusal" if isinstance(spec, RotationCodec)
                        else real(spec, d))
    if cpu.unavailable() is None:
        with pytest.warns(UserWarning, match=r"decodes layer\(s\) \[0, 1\] with the PyTorch path .*test's refusal"):
            cache = ks.make_cache(model, "tada", kernel="cpu", **opts)
        assert all(layer.backend == "torch" for layer in cache.layers)


def test_kernel_option_errors_name_cpu():
    model = tiny_llama()
    with pytest.raises(ValueError, match="kernel must be one of auto, triton, torch, cpu"):
        ks.make_cache(model, "kivi", kernel="cuda")
    with pytest.raises(ValueError, match="kernel='cpu' cannot be used: make_cache was given a config"):
        ks.make_cache(model.config, "kivi", kernel="cpu", group=16)
    auto = ks.make_cache(model, "kivi", group=16)  # auto on the CPU: the CPU kernel
    assert all(layer.backend == "cpu" for layer in auto.layers)
    from_config = ks.make_cache(model.config, "kivi", group=16)  # a config cannot switch attention: PyTorch path
    assert not any(layer.backend != "torch" for layer in from_config.layers)


@pytest.fixture
def no_extension(monkeypatch):
    """The extension cannot be built or loaded; the one-warning flag is fresh."""
    def broken():
        raise RuntimeError("simulated: no C++ compiler")

    monkeypatch.setattr(cpu, "_load", broken)
    monkeypatch.setattr(cpu, "_warned", False)


def test_auto_without_the_extension_takes_the_pytorch_path_with_the_warning(no_extension):
    model = tiny_llama()
    with pytest.warns(UserWarning, match="CPU attention kernel is unavailable"):
        cache = ks.make_cache(model, "kivi", group=16)
    assert not any(layer.backend != "torch" for layer in cache.layers)


def test_unavailable_extension_falls_back_with_one_warning(no_extension):
    model = tiny_llama()
    ids = torch.randint(2, 90, (1, 40), generator=torch.Generator().manual_seed(4))
    opts = dict(bits=4, group=16, window=4, sinks=2)
    with pytest.warns(UserWarning, match=r"CPU attention kernel is unavailable \(simulated: no C\+\+ compiler\)"):
        cache = ks.make_cache(model, "tada", kernel="cpu", **opts)
    assert not any(layer.backend != "torch" for layer in cache.layers)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        again = ks.make_cache(model, "kivi", kernel="cpu", **opts)
        q, k, v, ek, ev, index, sinks, mask = _problem(1, 6, 2, 64, 64, 4, 1, GroupCodec(2, 32, "channel"),
                                                       GroupCodec(2, 32, "token"), True, torch.float32)
        direct = cpu.packed_attention(q, k, v, ek, ev, index, sinks, mask=mask)
    assert not [w for w in seen if "CPU attention kernel" in str(w.message)]  # warned once per process
    assert not any(layer.backend != "torch" for layer in again.layers)
    torch.testing.assert_close(direct, reference.packed_attention(q, k, v, ek, ev, index, sinks, mask=mask))
    want = greedy(model, ids, ks.make_cache(model, "tada", kernel="torch", **opts), n=8)
    assert torch.equal(greedy(model, ids, cache, n=8), want)


def test_environment_switch_disables_the_extension(monkeypatch):
    monkeypatch.setenv(cpu.ENV, "0")
    with pytest.raises(RuntimeError, match=f"disabled by {cpu.ENV}=0"):
        cpu._load.__wrapped__()


# -- integer key scores (qdot="int8") ---------------------------------------------------------------------------
INT8_PATHS = [p for p in ("int8-vnni", "int8-avx2", "int8-plain") if WHY is None and p in cpu.qdot_paths()]
INT8_CASES = [
    # bits, key center, key group, head dim, query heads, kv heads, stored, exact, query tokens
    (2, "none", 32, 128, 12, 2, 320, 36, 1),      # Qwen-shaped, GQA 6
    (2, "channel", 16, 64, 6, 2, 192, 9, 4),      # groups of 16: two groups per tile
    (3, "none", 32, 128, 3, 3, 128, 5, 1),        # GQA 1
    (3, "channel", 64, 64, 6, 2, 256, 3, 4),      # GQA 3, a group spans two tiles
    (4, "none", 32, 256, 6, 1, 96, 7, 1),
    (4, "channel", 48, 64, 9, 3, 288, 12, 4),     # groups of 48: tiles span groups
    (8, "none", 32, 128, 6, 2, 160, 4, 1),        # 8-bit codes: the AVX2 path widens to int16
    (8, "channel", 32, 64, 4, 4, 64, 11, 4),
    (2, "none", 32, 40, 6, 2, 96, 6, 4),          # head dim 40: the plain loops (the SIMD paths need 64s)
]


def _int8_problem(bits, center, group, d, hq, hkv, stored, exact, qn, masked, dtype):
    kspec = GroupCodec(bits, group, "channel", center)
    vspec = GroupCodec(bits, 8 if d % 32 else 32, "token", center)
    k, v = PagedStore(kspec, "keys", page_tokens=192), PagedStore(vspec, "values", page_tokens=192)
    g = torch.Generator().manual_seed(bits + d + stored)
    if stored:
        k.append(torch.randn(2, hkv, stored, d, generator=g) + torch.randn(1, 1, 1, d, generator=g) * 2)
        v.append(torch.randn(2, hkv, stored, d, generator=g))
    q, _, _, ek, ev, index, sinks, mask = _problem(2, hq, hkv, d, 0, exact, qn, kspec, vspec, False, dtype)
    index = torch.cat([torch.arange(sinks), torch.arange(sinks + stored, stored + exact)])
    if masked:
        mask = torch.rand(2, 1, qn, stored + exact, generator=g) > 0.2
        mask[-1, :, :, :7] = False
    return q, k, v, ek, ev, index, sinks, mask


@needs_kernel
@pytest.mark.parametrize("bits,center,group,d,hq,hkv,stored,exact,qn", INT8_CASES)
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8_key_scores_match_the_reference_emulation_on_every_path(bits, center, group, d, hq, hkv, stored, exact,
                                                                     qn, masked, dtype):
    """qdot="int8": every integer path (VNNI, AVX2, plain loops) gives the same bits, and they equal the reference's
    emulation of the int8 query (same rounding, exact integer sums) within the float kernel's tolerance."""
    q, k, v, ek, ev, index, sinks, mask = _int8_problem(bits, center, group, d, hq, hkv, stored, exact, qn, masked,
                                                        dtype)
    want = reference.packed_attention(q.float(), k, v, ek.float(), ev.float(), index, sinks, mask=mask, scaling=0.3,
                                      qdot="int8")
    outs = {p: cpu.packed_attention(q, k, v, ek, ev, index, sinks, mask=mask, scaling=0.3, block_tokens=96, qdot=p)
            for p in ["int8"] + INT8_PATHS}
    for p, out in outs.items():
        assert torch.equal(out, outs["int8"]), f"{p} differs from the int8 path {cpu.int8_path()}"
    tol = dict(atol=3e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(outs["int8"].float(), want, **tol)
    float_out = cpu.packed_attention(q, k, v, ek, ev, index, sinks, mask=mask, scaling=0.3, block_tokens=96)
    assert not torch.equal(float_out, outs["int8"])  # the option took effect


def int8_output_bound(q, k, v, ek, ev, scaling):
    """Worst-case difference between the int8 and the float kernels' outputs, per query row [B, HQ, QN, 1], from the
    int8 rounding of the query. A stored key's score changes by sum_d (a qi_d - q_d s_d) code_d, at most
    eps = a / 2 * sum_d code_d (a: the row's int8 scale in that key group; |a qi_d - q_d s_d| <= a / 2). Scores off
    by at most eps change each softmax weight by a factor within exp(+-2 eps), so the output (a weighted mean of
    value rows) moves by at most (exp(2 eps) - 1) * max |value|."""
    b, hq, qn, d = q.shape
    hkv = ek.shape[1]
    _, a, _, codes = reference.int8_query(q.float(), k, scaling)  # a [B, HQ, QN, NG]; codes [B, HKV, NG, G, D]
    codesum = codes.sum(-1).amax(-1).repeat_interleave(hq // hkv, 1)  # [B, HQ, NG]: the largest code sum per group
    eps = (a.double() / 2 * codesum[:, :, None]).amax(-1) * (1 + 1e-5)  # + the float roundings of qs * inv
    vmax = torch.cat([v.decode(torch.float32), ev.float()], 2).abs().amax((2, 3)).repeat_interleave(hq // hkv, 1)
    return ((torch.exp(2 * eps) - 1) * vmax[:, :, None])[..., None]


@needs_kernel
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("scaling", [0.3, 0.02])
def test_int8_key_scores_stay_within_the_rounding_bound_of_the_float_reference(bits, scaling):
    q, k, v, ek, ev, index, sinks, mask = _int8_problem(bits, "none", 32, 128, 12, 2, 320, 36, 1, True,
                                                        torch.float32)
    want = reference.packed_attention(q, k, v, ek, ev, index, sinks, mask=mask, scaling=scaling)
    got = cpu.packed_attention(q, k, v, ek, ev, index, sinks, mask=mask, scaling=scaling, qdot="int8")
    bound = int8_output_bound(q, k, v, ek, ev, scaling) + 3e-5 + 1e-4 * want.abs()  # + the float tolerance
    err = (got - want).abs()
    assert (err <= bound).all(), f"largest excess {(err - bound).max():.3g}"
    assert err.max() > 0


@needs_kernel
def test_int8_option_reaches_the_layers_and_decodes_a_tiny_model_like_the_emulation(monkeypatch):
    """kivi with qdot=int8 through a tiny Llama (head dim 64, so the SIMD path runs): the same logits and tokens as
    the layers answered by the reference's int8 emulation, and not the float kernel's."""
    from kvshrink.layers import composed

    model = tiny_llama(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    ids = torch.randint(2, 90, (2, 70), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    opts = dict(bits=2, group=16, window=8, sinks=2)
    cache = ks.make_cache(model, "kivi", kernel="cpu", qdot="int8", **opts)
    assert all(layer.qdot == "int8" for layer in cache.layers)
    got, got_tok = logits_through(model, ids, cache, 10, 1, mask)
    assert all(row.key_store.tokens > 0 for row in cache.layers[0].rows)
    flt, _ = logits_through(model, ids, ks.make_cache(model, "kivi", kernel="cpu", **opts), 10, 1, mask)
    real = cpu.packed_attention

    def emulated(*args, qdot="float", **kwargs):
        assert qdot == "int8"
        return reference.packed_attention(*args, qdot=qdot, **{k: v for k, v in kwargs.items()
                                                               if k != "block_tokens"})

    monkeypatch.setattr(composed.cpu_kernel, "packed_attention", emulated)
    want, want_tok = logits_through(model, ids, ks.make_cache(model, "kivi", kernel="cpu", qdot="int8", **opts), 10,
                                    1, mask)
    monkeypatch.setattr(composed.cpu_kernel, "packed_attention", real)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got_tok, want_tok)
    assert not torch.equal(got, flt)  # int8 scores, not the float kernel's


def test_qdot_option_errors_and_warnings():
    model = tiny_llama()
    with pytest.raises(ValueError, match="qdot must be one of float, int8, got 'int4'"):
        ks.make_cache(model, "kivi", qdot="int4")
    with pytest.raises(ValueError, match="qdot='int8' is an option of the CPU kernel, but kernel='torch'"):
        ks.make_cache(model, "kivi", qdot="int8", kernel="torch")
    with pytest.raises(ValueError, match="a config cannot switch on"):
        ks.make_cache(model.config, "kivi", qdot="int8", group=16)
    with pytest.raises(ValueError, match="qdot must be one of"):
        cpu.packed_attention(*_problem(1, 2, 1, 64, 32, 2, 1, GroupCodec(2, 32, "channel"),
                                       GroupCodec(2, 32, "token"), False, torch.float32)[:7], qdot="int4")
    if WHY is None:
        with pytest.warns(UserWarning, match="qdot='int8' changes no layer"):
            ks.make_cache(model, "tada", qdot="int8", group=16)  # mean=head keys: scored in float
    default = ks.make_cache(model, "kivi", group=16)
    assert all(getattr(layer, "qdot", "float") == "float" for layer in default.layers)


_VARIANT = """
import sys, torch
sys.path.insert(0, "tests")
from kvshrink.kernels import cpu
from test_cpu_decode import INT8_CASES, _int8_problem
assert cpu.unavailable() is None, cpu.unavailable()
outs = []
for case in INT8_CASES:
    q, k, v, ek, ev, index, sinks, mask = _int8_problem(*case, True, torch.float32)
    run = lambda path: cpu.packed_attention(q, k, v, ek, ev, index, sinks, mask=mask, scaling=0.3,  # noqa: E731
                                            block_tokens=96, qdot=path)
    outs.append(run("int8"))
    assert torch.equal(outs[-1], run("int8-plain")), case
torch.save({"path": cpu.int8_path(), "paths": cpu.qdot_paths(), "outs": outs}, sys.argv[1])
"""


@needs_kernel
@pytest.mark.skipif(os.environ.get("KVSHRINK_TEST_AVX2_BUILD") != "1",
                    reason="compiles a second copy of the kernel without AVX-512 (1-3 minutes): set "
                           "KVSHRINK_TEST_AVX2_BUILD=1")
def test_an_avx2_build_without_avx512_scores_int8_like_this_one(tmp_path):
    """A build with the AVX-512 (and AVX-VNNI) features turned off, as on CPUs with AVX2 only: its int8 path is
    maddubs/madd, gives its plain loops' bits, and matches this build's int8 output within the float tolerance (the
    integer sums are exact; the float loops around them vectorize differently without AVX-512)."""
    import subprocess
    import sys

    env = dict(os.environ, KVSHRINK_CACHE=str(tmp_path / "cache"),
               KVSHRINK_CPU_KERNEL_CFLAGS="-mno-avx512f -mno-avxvnni")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(cpu.__file__).parents[2])] +
                                        [p for p in [env.get("PYTHONPATH")] if p])
    out = tmp_path / "variant.pt"
    subprocess.run([sys.executable, "-c", _VARIANT, str(out)], check=True, env=env,
                   cwd=Path(__file__).parents[1], timeout=600)
    variant = torch.load(out)
    assert variant["path"] == "avx2" and "int8-vnni" not in variant["paths"]
    for case, got in zip(INT8_CASES, variant["outs"]):
        q, k, v, ek, ev, index, sinks, mask = _int8_problem(*case, True, torch.float32)
        want = cpu.packed_attention(q, k, v, ek, ev, index, sinks, mask=mask, scaling=0.3, block_tokens=96,
                                    qdot="int8")
        torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4, msg=f"case {case}")


# -- the decode step's flush of rotated codes (native encode) ------------------------------------------------------
@needs_kernel
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rotate,norm_correction", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("norm", ["float16", "float32"])
def test_native_rotated_encode_gives_the_pytorch_steps_bits(bits, rotate, norm_correction, norm):
    """The compiled encode that a loaded kernel registers for small calls gives the same codes and norms, bit for
    bit, as the PyTorch steps, over shapes, magnitudes from 1e-3 to 1e3, zero channels and both input dtypes."""
    from kvshrink.codecs import rotation
    cpu._load()
    ops = rotation._native
    assert ops is not None  # registered by the kernel's load
    codec = RotationCodec(bits=bits, rotate=rotate, norm_correction=norm_correction, norm=norm, layer=5)
    g = torch.Generator().manual_seed(bits)
    try:
        for trial in range(12):
            shape = (1 + trial % 2, 3, 1 + trial % 4, 128 if trial % 3 else 64)
            x = torch.randn(*shape, generator=g) * 10.0 ** (trial % 7 - 3)
            if trial % 5 == 4:
                x[..., :5] = 0
            x = x.bfloat16() if trial % 2 else x
            store = PagedStore(codec, "keys")
            rotation.set_native_ops(ops)
            got = codec.encode(x, store)
            rotation.set_native_ops(None)
            want = codec.encode(x, store)
            assert got.keys() == want.keys()
            for name in want:
                assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), (trial, name)
        rotation.set_native_ops(ops)
        with pytest.raises(ValueError, match="non-finite values cannot be stored"):
            codec.encode(torch.full((1, 3, 1, 64), float("nan")), PagedStore(codec, "keys"))
    finally:
        rotation.set_native_ops(ops)


@needs_kernel
def test_native_rotate_gives_the_butterflies_bits():
    """`codecs.rotation.rotate` on a few CPU rows (the native op) equals the PyTorch butterflies bit for bit, for head
    dims of one and of several Hadamard blocks, and for query rows whose heads repeat a KV head's signs."""
    from kvshrink.codecs import rotation
    cpu._load()
    ops = rotation._native
    calls = []

    class Counting:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(ops, name)

    g = torch.Generator().manual_seed(7)
    try:
        for b, h, t, d in [(1, 2, 1, 128), (2, 12, 1, 128), (1, 3, 5, 64), (1, 2, 3, 96)]:
            x = torch.randn(b, h, t, d, generator=g) * 3
            s = rotation.signs(11, 2, h, d)
            rotation.set_native_ops(Counting())
            got = rotation.rotate(x, s)
            assert calls.pop() == "rotate_tokens"
            rotation.set_native_ops(None)
            want = rotation.rotate(x, s)
            assert torch.equal(got, want), (b, h, t, d)
    finally:
        rotation.set_native_ops(ops)


@needs_kernel
def test_a_rotated_cache_decodes_the_same_tokens_with_the_native_encode():
    """turboquant through a tiny Llama on the kernel (head dim 64; each step flushes one token per layer into the
    store): the same logits with the native encode as with the PyTorch steps, and the native one did the flushing."""
    from kvshrink.codecs import rotation
    cpu._load()
    ops = rotation._native
    calls = []

    class Counting:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(ops, name)

    model = tiny_llama(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    ids = torch.randint(2, 90, (1, 70), generator=torch.Generator().manual_seed(3))
    spec = "turboquant:bits=3,window=8,sinks=2"
    try:
        rotation.set_native_ops(None)
        want, want_tok = logits_through(model, ids, ks.make_cache(model, spec), 12)
        rotation.set_native_ops(Counting())
        got, got_tok = logits_through(model, ids, ks.make_cache(model, spec), 12)
    finally:
        rotation.set_native_ops(ops)
    assert "lloydmax_tokens" in calls
    assert torch.equal(got, want) and torch.equal(got_tok, want_tok)


def test_cpu_decode_step_refuses_non_finite_states_and_takes_large_finite_ones():
    """The CPU path checks a decoding step's states as it joins them to the window (`append_finite`): an inf or NaN
    is refused with the elementwise error before anything is written; finite values whose sum overflows float32
    are still taken."""
    model = tiny_llama()
    cache = ks.make_cache(model, "kivi", kernel="cpu", bits=4, group=16, window=4, sinks=0)
    layer = cache.layers[0]
    k = torch.randn(1, 2, 20, 16)
    layer.update(k, k)  # a prefill: the PyTorch path
    held = layer.held()
    q = torch.randn(1, 4, 1, 16)
    for pos, value in (((0, 1, 0, 3), float("nan")), ((0, 0, 0, 0), float("-inf"))):
        bad = torch.randn(1, 2, 1, 16)
        bad[pos] = value
        with pytest.raises(ValueError, match=r"layer 0: key_states contain NaN or Inf \(first at .* = \[" +
                           ", ".join(map(str, pos)) + r"\]\)"):
            layer.update(bad, torch.randn(1, 2, 1, 16))
        with pytest.raises(ValueError, match=r"layer 0: value_states contain NaN or Inf"):
            layer.update(torch.randn(1, 2, 1, 16), bad)
        assert layer.held() == held  # nothing half-written
    big = torch.full((1, 2, 1, 16), 3e38)  # each finite; their sum is inf in float32
    assert not torch.isfinite(big.sum())
    layer.update(big, torch.randn(1, 2, 1, 16))
    layer.attend(q, None, 0.25)
    assert layer.held() == held + 1


@needs_kernel
@pytest.mark.parametrize("window", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("states", [torch.float32, torch.bfloat16], ids=["fp32-states", "bf16-states"])
def test_append_finite_joins_a_step_to_the_window_as_cat_and_to_do(window, states):
    """The native join gives torch.cat([window, x.to(window's dtype)]) bit for bit (rounding and fp16 overflow
    included), for keys and values; any inf or NaN gives None and leaves the window as it was."""
    g = torch.Generator().manual_seed(3)
    wk, wv = (torch.randn(2, 3, 5, 16, generator=g).to(window) for _ in range(2))
    k, v = (torch.randn(2, 3, 2, 16, generator=g).mul(3).to(states) for _ in range(2))
    k[1, 2, 1, 7] = 1e5  # finite; beyond float16's range
    got = cpu.append_finite(wk, wv, k, v)
    assert got is not None
    for joined, w, x in zip(got, (wk, wv), (k, v)):
        want = torch.cat([w, x.to(w.dtype)], -2)
        assert joined.dtype == window and joined.shape == want.shape
        assert torch.equal(joined.view(torch.int16 if window != torch.float32 else torch.int32),
                           want.view(torch.int16 if window != torch.float32 else torch.int32))
    before = wk.clone()
    for bad in (float("nan"), float("inf")):
        v2 = v.clone()
        v2[0, 1, 0, 3] = bad
        assert cpu.append_finite(wk, wv, k, v2) is None
    assert torch.equal(wk, before)
    assert cpu.append_finite(wk, wv, k.double(), v) is None  # a dtype the op does not take: the caller joins


ENCODE_CASES = [  # bits, axis, group, head dim, heads, tokens
    (2, "channel", 32, 64, 3, 32), (3, "channel", 32, 128, 2, 64), (4, "channel", 16, 64, 3, 32),
    (8, "channel", 32, 36, 2, 32), (3, "channel", 32, 36, 3, 32),   # 36 channels: 3-bit rows end in a part word
    (2, "token", 32, 64, 3, 32), (3, "token", 32, 64, 3, 33), (4, "token", 16, 128, 2, 7),
    (8, "token", 64, 64, 1, 5), (3, "token", 12, 36, 2, 9), (2, "token", 12, 36, 4, 3),  # groups of 12: padding
    (2, "channel", 32, 128, 2, 2048), (4, "token", 32, 128, 2, 2048),  # a prefill's block: split over threads
]


@needs_kernel
@pytest.mark.parametrize("bits,axis,group,d,heads,tokens", ENCODE_CASES)
@pytest.mark.parametrize("center", ["none", "head", "channel"])
@pytest.mark.parametrize("kind", ["normal", "ties", "large"])
def test_native_grouped_encode_gives_the_pytorch_steps_bits(monkeypatch, bits, axis, group, d, heads, tokens,
                                                            center, kind):
    """The decode step's flush of grouped codes through the compiled op: the same codes, scales, zero points and
    head means, bit for bit, as `quantize` and `pack` in PyTorch (ties on .5, constant groups with scale 0 and
    values near fp16's range included)."""
    from kvshrink.codecs import quant

    cpu.available()  # loads the extension, which registers the native encoder
    assert quant._native is not None
    g = torch.Generator().manual_seed(bits * 31 + d + tokens)
    x = torch.randn(2, heads, tokens, d, generator=g) * 3
    if kind == "ties":  # a coarse grid: many codes land on .5; constant groups (scale 0)
        x = torch.round(x * 2) / 4
        x[..., : min(8, tokens), :] = 1.25
    elif kind == "large":
        x = x * 2000
    spec = GroupCodec(bits, group, axis, center)
    cm = x.mean(2, keepdim=True).half() if center == "channel" else None
    got = quant.encode_block(x, spec, cm)
    monkeypatch.setattr(quant, "_native", None)
    want = quant.encode_block(x, spec, cm)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape and a.dtype == b.dtype
            assert torch.equal(a.view(torch.int16) if a.dtype == torch.float16 else a,
                               b.view(torch.int16) if b.dtype == torch.float16 else b)


@needs_kernel
def test_native_grouped_encode_refuses_fp16_overflow_like_the_pytorch_steps():
    from kvshrink.codecs import quant

    cpu.available()
    x = torch.full((1, 2, 32, 64), 1e5)
    x[:, :, :, 0] = -1e5
    for axis in ("token", "channel"):
        with pytest.raises(ValueError, match="fp16 range"):
            quant.encode_block(x, GroupCodec(4, 32, axis))


@needs_kernel
def test_a_cpu_decode_step_joins_and_encodes_natively_and_stores_the_pytorch_steps_bits(monkeypatch):
    """Decoding through the CPU kernel, each step's tokens join the window through `append_finite` and each block
    leaving it is encoded by `grouped_encode`; the stores end up holding exactly what the PyTorch steps store."""
    from kvshrink.codecs import quant

    model = tiny_llama()
    ids = torch.randint(2, 90, (1, 40), generator=torch.Generator().manual_seed(2))
    opts = dict(bits=3, group=16, window=8, sinks=2)
    calls = {"append_finite": 0, "grouped_encode": 0}
    real_append, native = cpu.append_finite, (cpu.available() and quant._native)

    def counted_append(*a):
        calls["append_finite"] += 1
        return real_append(*a)

    class CountedEncode:
        def grouped_encode(self, *a):
            calls["grouped_encode"] += 1
            return native.grouped_encode(*a)

    monkeypatch.setattr(cpu, "append_finite", counted_append)
    monkeypatch.setattr(quant, "_native", CountedEncode())
    cache = ks.make_cache(model, "kivi", kernel="cpu", **opts)
    tokens = greedy(model, ids, cache, n=20)
    assert calls["append_finite"] >= 19 * len(cache.layers) and calls["grouped_encode"] > 0
    monkeypatch.setattr(quant, "_native", None)
    monkeypatch.setattr(cpu, "append_finite", lambda *a: None)
    plain = ks.make_cache(model, "kivi", kernel="cpu", **opts)
    assert torch.equal(greedy(model, ids, plain, n=20), tokens)
    for a, b in zip(cache.layers, plain.layers):
        assert a.key_store.tokens == b.key_store.tokens > 32
        for name in ("codes", "scale", "zero"):
            for x, y in zip(a.key_store.page_list(name) + a.value_store.page_list(name),
                            b.key_store.page_list(name) + b.value_store.page_list(name)):
                assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
