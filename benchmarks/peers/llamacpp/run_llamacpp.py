"""llama.cpp's decode speed with an f16, q8_0 and q4_0 KV cache (flash attention on), on Qwen2.5-Coder-1.5B's GGUF.

Run with this folder's own environment (setup.sh). For every context, the same prompt is prefilled once per cache
type, then `--decode` single-token steps are timed (greedy next token from the logits, as `kvshrink bench` does).
The figure to compare with kvshrink is the ratio "quantized cache tokens/s / f16 cache tokens/s" at the same
context, measured here in one process. The prompt is the same held-out corpus text `kvshrink bench` uses
(`pydoc_data.topics`, the part after the 80% split), cut to the context length with llama.cpp's own tokenizer.

    cd benchmarks/peers/llamacpp && .venv/bin/python run_llamacpp.py --contexts 4096,16384
Records are appended to results-llamacpp.jsonl as each cell finishes; cells already there are skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import llama_cpp
import numpy as np

HERE = Path(__file__).resolve().parent
GGUF = Path(os.environ.get("KVSHRINK_CACHE", Path.home() / ".cache" / "kvshrink")) / "gguf" / \
    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
CACHE_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}


def corpus_text() -> str:
    """kvshrink's held-out evaluation text (kvshrink.eval.corpus: pydoc_text, then split at 80%), rebuilt here
    because this environment does not install kvshrink."""
    import re

    from pydoc_data.topics import topics

    text = "\n\n".join(re.sub(r"[ \t]+", " ", topics[k]).strip() for k in sorted(topics))
    cut = text.rfind("\n\n", 0, int(len(text) * 0.8))
    return text[cut if cut > 0 else int(len(text) * 0.8):]


def prompt_tokens(llm: llama_cpp.Llama, n: int) -> list[int]:
    ids = llm.tokenize(corpus_text().encode(), add_bos=False, special=False)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def last_argmax(llm: llama_cpp.Llama) -> int:
    """Greedy next token from the last evaluated position's logits (the bindings keep no scores without
    logits_all, which would allocate n_ctx x vocabulary floats)."""
    logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
    return int(np.argmax(logits))


def run_cell(context: int, cache: str, decode: int, threads: int) -> dict:
    kwargs = dict(model_path=str(GGUF), n_ctx=context + decode + 8, n_batch=512, n_ubatch=512, n_threads=threads,
                  n_threads_batch=threads, type_k=CACHE_TYPES[cache], type_v=CACHE_TYPES[cache], verbose=False,
                  logits_all=False)
    try:
        llm = llama_cpp.Llama(flash_attn=True, **kwargs)
    except TypeError:  # newer bindings: flash_attn_type (1 = enabled)
        llm = llama_cpp.Llama(flash_attn_type=1, **kwargs)
    ids = prompt_tokens(llm, context)
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    nxt = last_argmax(llm)
    t2 = time.perf_counter()
    for _ in range(decode):
        llm.eval([nxt])
        nxt = last_argmax(llm)
    t3 = time.perf_counter()
    del llm
    return {"peer": "llama.cpp", "version": llama_cpp.__version__, "model": GGUF.name, "weights": "Q4_K_M",
            "context": context, "cache": cache, "flash_attn": True, "threads": threads, "decode_tokens": decode,
            "prefill_s": t1 - t0, "decode_s": t3 - t2, "decode_tokens_per_s": decode / (t3 - t2),
            "machine": platform.processor() or platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default="4096,16384")
    p.add_argument("--caches", default="f16,q8_0,q4_0")
    p.add_argument("--decode", type=int, default=32, help="timed single-token decode steps")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("-o", "--out", default=str(HERE / "results-llamacpp.jsonl"))
    args = p.parse_args()
    if not GGUF.exists():
        raise SystemExit(f"{GGUF} is missing: run `make setup-qwen` (it assembles the GGUF) first")
    out = Path(args.out)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["context"], r["cache"], r["decode_tokens"], r["threads"]))
    for context in (int(c) for c in args.contexts.split(",")):
        for cache in args.caches.split(","):
            if cache not in CACHE_TYPES:
                raise SystemExit(f"--caches: {cache!r} is not one of {', '.join(CACHE_TYPES)}")
            if (context, cache, args.decode, args.threads) in done:
                continue
            r = run_cell(context, cache, args.decode, args.threads)
            print(f"{context:>6} {cache:>5}: prefill {r['prefill_s']:.1f} s, decode {r['decode_tokens_per_s']:.2f} "
                  "tok/s", flush=True)
            with out.open("a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
