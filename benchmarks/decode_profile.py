"""Where a decode step's time goes: `DynamicCache` against a kvshrink method, one process, the same tokens.

    python benchmarks/decode_profile.py --model qwen2.5-coder-1.5b --context 4096 --steps 16 \
        --method "tada:profile=benchmarks/profiles/qwen2.5-coder-1.5b-tada-rotate-0.20.json" \
        -o benchmarks/results/decode-profile-qwen-4k.json

For each cache it prefills the first `--context` tokens of the held-out text (as `kvshrink bench` does), decodes two
untimed steps, then `--steps` greedy steps under cProfile, and records the wall time per step and, per step, the
time of its main parts: the own time of the model's matmuls, SDPA, kvshrink's packed-attention op and `torch.cat`,
and the cumulative time of kvshrink's attention wrapper, its layer update and the flush of the tokens leaving its
window. cProfile adds a little time to every Python call; compare the parts, not the totals with `kvshrink bench`'s.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import kvshrink as ks
from kvshrink.eval.bench import context_ids
from kvshrink.eval.corpus import heldout_text
from kvshrink.io import atomic_write_text
from kvshrink.models import load_model

# Built-in operations whose own time (cProfile's tottime) is recorded, by the name cProfile gives them
OWN = {
    "matmuls (torch linear)": "torch._C._nn.linear",
    "SDPA": "scaled_dot_product_attention",
    "kvshrink kernel (packed_attention op)": "kvshrink_cpu.packed_attention",
    "torch.cat": "torch.cat",
}
# kvshrink's Python functions whose cumulative time (everything they call) is recorded
CUMULATIVE = {
    "kvshrink attention (kernels/cpu.py packed_attention, the op included)": ("kernels/cpu.py", "packed_attention"),
    "kvshrink flush (layers/composed.py _flush: tokens leaving the window encoded)": ("layers/composed.py", "_flush"),
    "kvshrink update (layers/composed.py update)": ("layers/composed.py", "update"),
}


def parts(stats: pstats.Stats, steps: int) -> dict[str, dict[str, float]]:
    """Milliseconds per step: own time of OWN's operations, cumulative time of CUMULATIVE's functions (these
    overlap: the flush runs inside the update)."""
    own = {k: 0.0 for k in OWN}
    cum = {k: 0.0 for k in CUMULATIVE}
    for (path, _line, name), (_, _, tottime, cumtime, _) in stats.stats.items():
        for part, key in OWN.items():
            if key in name:
                own[part] += tottime
        for part, (file, func) in CUMULATIVE.items():
            if path.endswith(file) and name == func:
                cum[part] += cumtime
    per = lambda d: {k: round(1000 * v / steps, 2) for k, v in d.items()}  # noqa: E731
    return {"own": per(own), "cumulative": per(cum)}


@torch.no_grad()
def profile_one(model, make_cache, ids: torch.Tensor, steps: int) -> dict:
    cache = make_cache()
    out = model(ids, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(2):
        out = model(nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        out = model(nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    prof.disable()
    ms = 1000 * (time.perf_counter() - t0) / steps
    return {"ms_per_step": round(ms, 1), "parts_ms_per_step": parts(pstats.Stats(prof), steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--method", required=True, help="a kvshrink method spec")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("-o", "--output", help="JSON record (default: print only)")
    args = ap.parse_args()
    if args.context < 1 or args.steps < 1:
        ap.error(f"--context and --steps must be >= 1, got {args.context} and {args.steps}")
    model, tok = load_model(args.model)
    ids = context_ids(tok(heldout_text(), return_tensors="pt", add_special_tokens=False).input_ids, args.context)
    result = {"model": args.model, "dtype": str(model.dtype), "context": args.context, "steps": args.steps,
              "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": {}}
    for name, make in (("DynamicCache", DynamicCache), (args.method, lambda: ks.make_cache(model, args.method))):
        result["runs"][name] = r = profile_one(model, make, ids, args.steps)
        print(f"{name}: {r['ms_per_step']} ms/step", json.dumps(r["parts_ms_per_step"]), flush=True)
    if args.output:
        atomic_write_text(Path(args.output), json.dumps(result, indent=1) + "\n")
        print("wrote", args.output)


if __name__ == "__main__":
    main()
