"""Answer kvshrink's RULER-style prompts with kvpress presses; append one record per answer.

Run with the kvpress environment (setup.sh), after make_ruler_inputs.py (kvshrink's environment):

    cd benchmarks/peers/kvpress
    .venv/bin/python run_kvpress_ruler.py --inputs ruler-qwen2.5-coder-1.5b.json --presses snapkv,h2o \
        --budgets 0.25,0.125

Each press compresses the prompt once, during its prefill (kvpress's way), keeping `budget` of the prompt's tokens
(`compression_ratio = 1 - budget`); the answer is then decoded greedily, every new token kept, until a stop id or
the task's generation budget. Records (`results-ruler-<model>.jsonl`) hold the answer text, not a score: scoring
happens in kvshrink's environment (`compare_ruler.py`) with the same function that scores kvshrink. A rerun skips
the answers already recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from jsonl import records
from run_kvpress import prefill
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

HERE = Path(__file__).parent


def presses() -> dict:
    """kvpress's presses by the names kvshrink uses for the same methods, each a function of the compression ratio
    (imported here: kvpress's env only). `adakv_snapkv` is AdaKV's head-adaptive budget over SnapKV's scores."""
    import kvpress

    out = {"snapkv": kvpress.SnapKVPress, "h2o": kvpress.ObservedAttentionPress,
           "streamingllm": kvpress.StreamingLLMPress, "tova": kvpress.TOVAPress}
    for name, attr in (("expected_attention", "ExpectedAttentionPress"), ("kvzip", "KVzipPress")):
        if hasattr(kvpress, attr):
            out[name] = getattr(kvpress, attr)
    if hasattr(kvpress, "AdaKVPress"):
        out["adakv_snapkv"] = lambda compression_ratio: kvpress.AdaKVPress(
            kvpress.SnapKVPress(compression_ratio=compression_ratio))
    return out


@torch.no_grad()
def answer(model, press, ids: torch.Tensor, budget: int, stops: set[int]) -> list[int]:
    cache = DynamicCache()
    out = prefill(model, press, ids, cache)
    tokens, pos = [], ids.shape[1]
    for _ in range(budget):
        t = int(out.logits[0, -1].argmax())
        if t in stops:
            break
        tokens.append(t)
        out = model(torch.tensor([[t]]), past_key_values=cache, use_cache=True, position_ids=torch.tensor([[pos]]))
        pos += 1
    return tokens


def main() -> None:
    from transformers.utils import logging as hf_logging

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", required=True, help="ruler-<model>.json from make_ruler_inputs.py")
    ap.add_argument("--presses", default="snapkv,h2o", help="comma-separated; 'full' is run first")
    ap.add_argument("--no-full", action="store_true", help="do not answer with the uncompressed cache first")
    ap.add_argument("--seeds", help="comma-separated seeds of the inputs to answer (default: all)")
    ap.add_argument("--budgets", default="0.25,0.125", help="shares of the prompt's tokens kept")
    ap.add_argument("-o", "--output", help="default: results-ruler-<model>.jsonl beside this script")
    args = ap.parse_args()
    known = presses()
    names = [p for p in args.presses.split(",") if p and p != "full"]
    unknown = [p for p in names if p not in known]
    if unknown:
        ap.error(f"unknown presses {unknown}; this kvpress has {', '.join(sorted(known))}")
    budgets = [float(b) for b in args.budgets.split(",")]
    if not all(0 < b < 1 for b in budgets):
        ap.error(f"budgets must be shares in (0, 1), got {budgets}")
    hf_logging.disable_progress_bar()
    inputs = json.loads(Path(args.inputs).read_text())
    prompts = inputs["prompts"]
    if args.seeds:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            ap.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
        have = sorted({p["seed"] for p in prompts})
        missing = [s for s in seeds if s not in have]
        if missing:
            ap.error(f"seeds {missing} are not in {args.inputs}; it holds seeds {have}")
        prompts = [p for p in prompts if p["seed"] in seeds]
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, inputs["dtype"])
    models = {}

    def model_for(name: str):
        attn = "eager" if name == "h2o" else "sdpa"  # ObservedAttentionPress reads the attention weights
        if attn not in models:
            models[attn] = AutoModelForCausalLM.from_pretrained(inputs["model_dir"], attn_implementation=attn,
                                                                dtype=dtype).eval()
        return models[attn]

    tok = AutoTokenizer.from_pretrained(inputs["model_dir"])
    out_path = Path(args.output) if args.output else HERE / f"results-ruler-{inputs['model']}.jsonl"
    done = {(r["press"], r["budget"], r["task"], r["context"], r["seed"]) for r in records(out_path)}
    import transformers

    env = {"transformers": transformers.__version__, "torch": torch.__version__,
           "kvpress": getattr(sys.modules["kvpress"], "__version__", "unknown"), "dtype": inputs["dtype"],
           "model": inputs["model"]}
    stops = set(inputs["stop_ids"])
    runs = ([] if args.no_full else [("full", 1.0)]) + [(n, b) for n in names for b in budgets]
    for name, budget in runs:
        press = None if name == "full" else known[name](compression_ratio=1.0 - budget)
        for p in prompts:
            key = (name, budget, p["task"], p["context"], p["seed"])
            if key in done:
                continue
            t0 = time.perf_counter()
            tokens = answer(model_for(name), press, torch.tensor([p["input_ids"]]), p["max_new_tokens"], stops)
            record = {"press": name, "budget": budget, "task": p["task"], "context": p["context"], "seed": p["seed"],
                      "answer": tok.decode(tokens, skip_special_tokens=True), "new_tokens": len(tokens),
                      "seconds": round(time.perf_counter() - t0, 1), **env}
            with out_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(name, budget, p["task"], p["context"], p["seed"], record["seconds"], "s", flush=True)
    print("records in", out_path)


if __name__ == "__main__":
    sys.exit(main())
