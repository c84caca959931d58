"""One cache layer's decode step as the model makes it: `update` with one token's keys and values, then `attend`
with its queries, timed per step with everything around the kernel (checks, the exact window, the flush of tokens
leaving it) and the kernel itself.

    python benchmarks/layer_step.py --model smollm2-135m --context 256 --threads 1 \
        -o benchmarks/results/layer-step-smollm2-256-<commit>.json

It prefills `--context` random tokens through the model, then feeds one layer (`--layer`) the same 64 random
steps over and over (so the flush runs once every `block` steps, as in decoding); each of `--repeats` rounds times
`--steps` steps, and the record keeps every round's microseconds per step and their median. Compare two commits by
running each in turn (paired, alternating), pinned to one core (`taskset -c 1`); the stores keep growing, so the
step count and context must match.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

import kvshrink as ks
from kvshrink.io import atomic_write_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default=None, help="spec (default: the model's best recipe, as `kvshrink run`)")
    ap.add_argument("--context", type=int, default=256, help="prompt tokens prefilled first (default 256)")
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=128, help="steps per timed round (default 128)")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (default 7)")
    ap.add_argument("-o", "--output", type=Path, default=None, help="JSON record to write")
    args = ap.parse_args()
    if args.context < 1 or args.steps < 1 or args.repeats < 1 or args.threads < 1:
        ap.error("--context, --steps, --repeats and --threads must be positive")
    torch.set_num_threads(args.threads)
    from kvshrink.defaults import best_spec

    method = args.method or best_spec(args.model)
    model, _ = ks.load_model(args.model)
    cache = ks.make_cache(model, method)
    if not 0 <= args.layer < len(cache.layers):
        ap.error(f"--layer must be in 0..{len(cache.layers) - 1}")
    ids = torch.randint(100, 20000, (1, args.context), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    layer = cache.layers[args.layer]
    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    g = torch.Generator().manual_seed(1)
    kv = [torch.randn(1, hkv, 1, d, generator=g) for _ in range(64)]
    qs = [torch.randn(1, hq, 1, d, generator=g) for _ in range(64)]

    def step(i: int) -> None:
        layer.update(kv[i % 64], kv[(i + 7) % 64])
        layer.attend(qs[i % 64], None, d ** -0.5)

    for i in range(64):
        step(i)
    rounds = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for i in range(args.steps):
            step(i)
        rounds.append(round(1e6 * (time.perf_counter() - t0) / args.steps, 1))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(ks.__file__).parent).stdout.strip()  # the kvshrink measured
    record = {"model": args.model, "method": method, "context": args.context, "layer": args.layer,
              "threads": args.threads, "steps": args.steps, "us_per_step": rounds,
              "median_us_per_step": statistics.median(rounds), "stored_after": layer.key_store.tokens,
              "commit": commit, "torch": torch.__version__}
    print(f"{args.model} layer {args.layer}: update + attend {record['median_us_per_step']:.1f} us per step "
          f"(median of {args.repeats}; {record['stored_after']} tokens stored at the end; commit {commit})")
    if args.output:
        atomic_write_text(args.output, json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
