"""One layer's decode attention on the CPU: the CPU kernel over the packed store against today's PyTorch path.

Qwen2.5-Coder-1.5B shapes (12 query / 2 KV heads, head dim 128, bf16, batch 1, one query token), contexts 4k..64k;
`--shape smollm2-135m`: SmolLM2-135M's (9 query / 3 KV heads, head dim 64, fp32).
For each packed layout it times, per call:
- `kernel`: `kvshrink.kernels.cpu.packed_attention`, reading the packed codes (the `kernel=cpu` decode step);
- `kernel int8` (layouts whose keys are per-channel groups without a head mean): the same with `qdot="int8"`, key
  scores from the query rounded to int8 and integer dot products (VNNI or AVX2), and its largest difference from
  the float kernel's output;
- `decode+sdpa`: what `kernel=torch` does every step: decode the whole store to bf16, concatenate sinks, store and
  window, then transformers' SDPA attention;
- `sdpa-16bit` (once per context): SDPA over the same tokens held as a plain 16-bit cache (no decoding), the
  speed a `DynamicCache` attends at (its per-step concatenation not counted).
Bytes per second are the bytes each variant must read at least (the bytes held: packed store + exact sinks and
window, or the 16-bit cache), next to the machine's memory bandwidth measured in the same run (sum and copy of a
256 MiB tensor). The kernel's result is checked against the decode path.

    .venv/bin/python benchmarks/cpu_attention.py                      # 4k,16k,64k
    .venv/bin/python benchmarks/cpu_attention.py --contexts 4k --repeat 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from types import SimpleNamespace

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvshrink.codecs.quant import GroupCodec
from kvshrink.codecs.rotation import RotationCodec
from kvshrink.codecs.store import PagedStore
from kvshrink.kernels import cpu, reference

HQ, HKV, D = 12, 2, 128
DTYPE = torch.bfloat16
#: --shape: (query heads, KV heads, head dim, dtype) of one layer
SHAPES = {"qwen2.5-coder-1.5b": (12, 2, 128, torch.bfloat16), "smollm2-135m": (9, 3, 64, torch.float32)}
SINKS, WINDOW = 4, 32
LAYOUTS = {  # name: (key codec, value codec), as the methods build them (group 32)
    "kivi:bits=2": (GroupCodec(2, 32, "channel", "none"), GroupCodec(2, 32, "token", "none")),
    "kivi:bits=4": (GroupCodec(4, 32, "channel", "none"), GroupCodec(4, 32, "token", "none")),
    # SmolLM2's default profile (tada, calibrated) stores most layers in 2-4 bits of these layouts; 3 bits here
    "kivi:bits=3": (GroupCodec(3, 32, "channel", "none"), GroupCodec(3, 32, "token", "none")),
    "tada:bits=2": (GroupCodec(2, 32, "channel", "head"), GroupCodec(2, 32, "token", "head")),
    # the rotation-aware profiles' layers (tada rotate=both, turboquant): Lloyd-Max codes of rotated directions
    "rotated:bits=3": (RotationCodec(3), RotationCodec(3)),
}


def _tokens(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def _time(fn, repeat: int) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _time_pair(fa, fb, repeat: int) -> tuple[float, float, float, float]:
    """Median seconds per call of two variants timed in turn (a, b, a, b, ...), so that a busy machine's load
    falls on both alike: (wall a, wall b, CPU a, CPU b). The CPU seconds (the process's, all threads) are what the
    work costs when other jobs take turns on the cores; with one thread they are the one to compare on a shared
    machine (with more, threads waiting for each other count too)."""
    fa(), fb()
    ta, tb, ca, cb = [], [], [], []
    for _ in range(repeat):
        for fn, times, cpu_times in ((fa, ta, ca), (fb, tb, cb)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    return tuple(statistics.median(x) for x in (ta, tb, ca, cb))


def memory_bandwidth(mib: int = 256, repeat: int = 5) -> dict[str, float]:
    """GB/s of a large-tensor sum (read) and copy (read + write), the ceiling a memory-bound kernel can approach."""
    x = torch.ones(mib * 2 ** 20 // 4)
    y = torch.empty_like(x)
    nbytes = x.numel() * 4
    read = _time(lambda: x.sum(), repeat)
    copy = _time(lambda: y.copy_(x), repeat)
    return {"read_gbs": nbytes / read / 1e9, "copy_gbs": 2 * nbytes / copy / 1e9}


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _layer(tokens: int, kspec, vspec, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    stored = (tokens - SINKS - WINDOW) // 32 * 32
    keys = (torch.randn(1, HKV, tokens, D, generator=g) + 2 * torch.randn(1, HKV, 1, D, generator=g)).to(DTYPE)
    values = torch.randn(1, HKV, tokens, D, generator=g).to(DTYPE)
    ks, vs = PagedStore(kspec, "keys"), PagedStore(vspec, "values")
    step = 4096  # append in blocks, as the cache does (bounded temporary memory)
    for t0 in range(SINKS, SINKS + stored, step):
        t1 = min(t0 + step, SINKS + stored)
        ks.append(keys[:, :, t0:t1])
        vs.append(values[:, :, t0:t1])
    exact = torch.cat([torch.arange(SINKS), torch.arange(SINKS + stored, tokens)])
    ek, ev = keys[:, :, exact].contiguous(), values[:, :, exact].contiguous()
    q = torch.randn(1, HQ, 1, D, generator=g).to(DTYPE)
    return q, ks, vs, ek, ev, exact, keys, values


def run(contexts: list[int], repeat: int, layouts: list[str] | None = None, compare: bool = True) -> dict:
    load_start = list(os.getloadavg())
    bw = memory_bandwidth()
    module = SimpleNamespace(num_key_value_groups=HQ // HKV, is_causal=True, layer_idx=0, training=False)
    scaling = D ** -0.5
    rows = []
    for tokens in contexts:
        plain_k = plain_v = None
        for name, (kspec, vspec) in LAYOUTS.items():
            if layouts and name not in layouts:
                continue
            q, ks, vs, ek, ev, exact, keys, values = _layer(tokens, kspec, vspec)
            store_bytes = sum(_nbytes(t) for s in (ks, vs) for _, t in s.tensors())
            held = store_bytes + _nbytes(ek, ev)

            def kernel():
                return cpu.packed_attention(q, ks, vs, ek, ev, exact, SINKS, scaling=scaling)

            def decode_sdpa():
                k = torch.cat([ek[:, :, :SINKS], ks.decode(DTYPE), ek[:, :, SINKS:]], 2)
                v = torch.cat([ev[:, :, :SINKS], vs.decode(DTYPE), ev[:, :, SINKS:]], 2)
                return sdpa_attention_forward(module, q, k, v, None, scaling=scaling)[0].transpose(1, 2)

            def kernel_int8():
                return cpu.packed_attention(q, ks, vs, ek, ev, exact, SINKS, scaling=scaling, qdot="int8")

            diff = (kernel().float() - decode_sdpa().float()).abs().max().item() if compare else float("nan")
            int8 = reference.int8_keys(kspec)
            diff_int8 = (kernel_int8().float() - kernel().float()).abs().max().item() if int8 else None
            if int8:
                t_kernel, t_int8, c_kernel, c_int8 = _time_pair(kernel, kernel_int8, repeat)
            else:
                t_kernel, t_int8, c_kernel, c_int8 = _time(kernel, repeat), None, None, None
            t_decode = _time(decode_sdpa, repeat) if compare else float("nan")
            if plain_k is None and compare:
                plain_k, plain_v = keys.contiguous(), values.contiguous()
                t_plain = _time(lambda: sdpa_attention_forward(module, q, plain_k, plain_v, None, scaling=scaling),
                                repeat)
                plain_bytes = _nbytes(plain_k, plain_v)
            if not compare:
                t_plain, plain_bytes = float("nan"), _nbytes(keys, values)
            rows.append({
                "context": tokens, "layout": name, "held_bytes": held, "max_abs_diff": diff,
                "kernel_ms": t_kernel * 1e3, "kernel_gbs": held / t_kernel / 1e9,
                "decode_sdpa_ms": t_decode * 1e3, "decode_sdpa_gbs": held / t_decode / 1e9,
                "sdpa16_ms": t_plain * 1e3, "sdpa16_bytes": plain_bytes, "sdpa16_gbs": plain_bytes / t_plain / 1e9,
                "speedup_vs_decode": t_decode / t_kernel, "speed_vs_sdpa16": t_plain / t_kernel,
                "int8_ms": t_int8 * 1e3 if int8 else None, "int8_gbs": held / t_int8 / 1e9 if int8 else None,
                "int8_vs_float": t_kernel / t_int8 if int8 else None, "int8_max_abs_diff_vs_float": diff_int8,
                "int8_read_share": held / t_int8 / 1e9 / bw["read_gbs"] if int8 else None,
                "kernel_cpu_ms": c_kernel * 1e3 if int8 else None, "int8_cpu_ms": c_int8 * 1e3 if int8 else None,
                "float_read_share": held / t_kernel / 1e9 / bw["read_gbs"],
            })
            print(_row(rows[-1]), flush=True)
    from kvshrink.eval.runner import source_commit

    return {"commit": source_commit(), "threads": torch.get_num_threads(), "bandwidth": bw, "rows": rows, "int8_path": cpu.int8_path(),
            "load_average": {"start": load_start, "end": list(os.getloadavg())},  # other jobs on the machine
            "repeat": repeat,
            "shape": {"query_heads": HQ, "kv_heads": HKV, "head_dim": D, "dtype": str(DTYPE).removeprefix("torch."),
                      "sinks": SINKS,
                      "window": WINDOW}}


HEADER = ("| context | layout | held MiB | kernel ms (GB/s) [CPU ms] | kernel int8 ms (GB/s) [CPU ms] | decode+SDPA ms (GB/s) | "
          "16-bit SDPA ms (GB/s) | kernel vs decode | kernel vs 16-bit | max diff | int8 vs float kernel |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def _row(r: dict) -> str:
    int8 = (f"{r['int8_ms']:.2f} ({r['int8_gbs']:.1f})" if r["int8_ms"] is not None else "-")
    int8_diff = f"{r['int8_max_abs_diff_vs_float']:.1e}" if r["int8_ms"] is not None else "-"
    if r["int8_ms"] is not None:  # the CPU time per call beside each, in brackets
        int8 += f" [cpu {r['int8_cpu_ms']:.2f}]"
        kernel = f"{r['kernel_ms']:.2f} ({r['kernel_gbs']:.1f}) [cpu {r['kernel_cpu_ms']:.2f}]"
    else:
        kernel = f"{r['kernel_ms']:.2f} ({r['kernel_gbs']:.1f})"
    return (f"| {r['context']} | `{r['layout']}` | {r['held_bytes'] / 2 ** 20:.2f} | "
            f"{kernel} | {int8} | "
            f"{r['decode_sdpa_ms']:.2f} ({r['decode_sdpa_gbs']:.1f}) | "
            f"{r['sdpa16_ms']:.2f} ({r['sdpa16_gbs']:.1f}) | {r['speedup_vs_decode']:.1f}x | "
            f"{r['speed_vs_sdpa16']:.2f}x | {r['max_abs_diff']:.1e} | {int8_diff} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default="4k,16k,64k", help="comma-separated token counts (4k = 4096)")
    p.add_argument("--repeat", type=int, default=10, help="timed calls per variant (median reported)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    p.add_argument("--kernel-only", action="store_true",
                   help="time the kernel (float and int8) only, not the PyTorch decode path or 16-bit SDPA")
    p.add_argument("--layouts", default="", help=f"comma-separated subset of: {', '.join(LAYOUTS)} (default all)")
    p.add_argument("--shape", default="qwen2.5-coder-1.5b", choices=sorted(SHAPES),
                   help="the layer's heads, head dim and dtype: Qwen2.5-Coder-1.5B's (bf16) or SmolLM2-135M's (fp32)")
    args = p.parse_args(argv)
    global HQ, HKV, D, DTYPE
    HQ, HKV, D, DTYPE = SHAPES[args.shape]
    if args.threads:
        torch.set_num_threads(args.threads)
    why = cpu.unavailable()
    if why:
        raise SystemExit(f"the CPU kernel is unavailable: {why}")
    print(HEADER, flush=True)
    layouts = [x for x in args.layouts.split(",") if x]
    unknown = [x for x in layouts if x not in LAYOUTS]
    if unknown:
        raise SystemExit(f"unknown layout(s) {', '.join(unknown)}; choose from {', '.join(LAYOUTS)}")
    result = run([_tokens(c) for c in args.contexts.split(",")], args.repeat, layouts, not args.kernel_only)
    bw = result["bandwidth"]
    print(f"\nmemory bandwidth: sum {bw['read_gbs']:.1f} GB/s, copy {bw['copy_gbs']:.1f} GB/s "
          f"({result['threads']} threads); GB/s above = bytes held / time")
    if args.json:  # atomically: a killed run leaves no half-written record
        result["rows"] = [{k: None if isinstance(v, float) and v != v else v for k, v in r.items()}
                          for r in result["rows"]]  # NaN (not measured, --kernel-only) as null
        tmp = f"{args.json}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
