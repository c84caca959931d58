"""Compile kvshrink's Triton kernels for a GPU target (NVIDIA Hopper, sm_90) ahead of time, on any machine: Triton's
NVIDIA backend carries its own ptxas, so no GPU is needed. Run by tests/test_kernel_compile.py in a process of its
own, without TRITON_INTERPRET (the interpreter accepts code the compiler refuses: a constexpr defined again in an
unrolled loop passed every interpreter test and failed on an H200). Prints one line per kernel variant compiled."""
from __future__ import annotations

import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET"
from kvshrink.kernels import triton_kernels as tk  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
I32 = "i32"


def compile_one(fn, pointers: dict[str, str], scalars: dict[str, str], constexprs: dict) -> None:
    signature = {name: pointers.get(name) or scalars.get(name) or "constexpr" for name in fn.arg_names}
    missing = [n for n, t in signature.items() if t == "constexpr" and n not in constexprs]
    if missing:
        raise SystemExit(f"{fn.__name__}: no type or value for {missing}")
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    triton.compile(src, target=TARGET)
    print("compiled", fn.__name__, constexprs, flush=True)


def quantize_variants():
    ptrs = {"CODES": "*u8", "SCALE": "*fp16", "ZERO": "*fp16", "HEAD_MEAN": "*fp16", "CHANNEL_MEAN": "*fp16"}
    for bits, token_axis, center, x in [(2, True, 1, "*fp32"), (3, False, 2, "*fp16"), (4, True, 0, "*bf16"),
                                        (8, False, 1, "*fp32"), (16, True, 1, "*fp16")]:
        group = 32
        tb = group if (bits != 16 and not token_axis) else 16
        compile_one(tk._quantize_pack_kernel, {"X": x, **ptrs}, {"T": I32},
                    dict(H=3, D=64, TB=tb, BITS=bits, GROUP=group, TOKEN_AXIS=token_axis, CENTER=center))


def attention_variants():
    common = dict(HKV=2, D=64, N_REP=3, BQ=16)
    scalars = {n: I32 for n in ("T", "k_scale_rows", "v_scale_rows", "HQ", "QN", "TK", "mask_q_stride",
                                "mask_b_stride", "key0", "per_split", "n_slots", "TE", "slot")}
    scalars["qscale"] = "fp32"
    out = {"M": "*fp32", "L": "*fp32", "ACC": "*fp32"}
    # (query dtype, key (bits, GT, GD, center, kind, scale dtype), value (...), mask, causal)
    grouped = lambda bits, gt, gd, center: (bits, gt, gd, center, 0, "*fp16")  # noqa: E731
    for q, k, v, mask, causal in [
        ("*fp16", grouped(2, 32, 1, 2), grouped(2, 1, 32, 2), True, False),
        ("*bf16", grouped(4, 32, 1, 1), grouped(4, 1, 32, 1), False, True),
        ("*fp32", grouped(3, 16, 1, 0), grouped(8, 1, 16, 0), False, False),
        ("*bf16", (3, 1, 64, 0, 1, "*fp32"), (4, 1, 64, 0, 1, "*fp16"), True, False),  # Lloyd-Max rows
        ("*fp16", (8, 1, 64, 0, 2, "*fp32"), (16, 1, 64, 0, 0, "*fp16"), False, False),  # fp8 keys, 16-bit values
    ]:
        ptrs = {"Q": q, "MASK": "*i1" if mask else "*i32", **out}
        for side, (bits, gt, gd, center, kind, scale) in (("K", k), ("V", v)):
            ptrs.update({f"{side}C": "*fp16" if bits == 16 else "*u8", f"{side}S": scale, f"{side}Z": "*fp16",
                         f"{side}HM": "*fp16", f"{side}CM": "*fp16", f"{side}CB": "*fp32"})
        compile_one(tk._packed_split_kernel, ptrs, scalars,
                    dict(common, BT=64, K_BITS=k[0], K_GT=k[1], K_GD=k[2], K_CENTER=k[3], K_KIND=k[4],
                         V_BITS=v[0], V_GT=v[1], V_GD=v[2], V_CENTER=v[3], V_KIND=v[4], HAS_MASK=mask,
                         CAUSAL=causal, DOT_IEEE=q == "*fp32"))
    for q, mask in (("*fp16", True), ("*fp32", False)):
        compile_one(tk._exact_split_kernel,
                    {"Q": q, "K": q, "V": q, "KEY_INDEX": "*i32", "MASK": "*i1" if mask else "*i32", **out},
                    scalars, dict(common, BT=16, HAS_MASK=mask, CAUSAL=not mask, DOT_IEEE=q == "*fp32"))
    compile_one(tk._reduce_kernel, {**out, "OUT": "*bf16"}, scalars, dict(common, BS=8))


if __name__ == "__main__":
    quantize_variants()
    attention_variants()
    print("all compiled", file=sys.stderr)
