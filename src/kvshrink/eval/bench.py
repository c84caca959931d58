"""`kvshrink bench`: prefill time, decode speed and memory of each method, paired with the plain cache.

For every context length the reference (transformers' `DynamicCache`) runs once (per repeat), then each method, in
the same process on the same token ids; the figures that matter are the ratios method / reference. Memory is the
cache's own bytes (from the tensors it holds) and the process's peak resident memory above what it held before the
run (the kernel's high-water mark, see `kvshrink.eval.memory`; freed memory is handed back to the system with
`malloc_trim` between runs), or the peak of `torch.cuda` allocations on a GPU.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from ..io import atomic_write_text
from ..models import last_logits_only, load_model
from ..spec import split_specs
from .corpus import heldout_text
from ..report import markdown_table
from .memory import PeakMemory
from .runner import Env, cache_memory, check_spec, environment


def parse_length(text: str | int) -> int:
    """'4k' -> 4096, '1500' -> 1500."""
    if isinstance(text, int):
        return text
    t = text.strip().lower()
    try:
        return int(float(t[:-1]) * 1024) if t.endswith("k") else int(t)
    except ValueError:
        raise ValueError(f"context length {text!r} is not a number of tokens (e.g. 1024, 1k, 4k)") from None


def context_ids(text_ids: torch.Tensor, context: int) -> torch.Tensor:
    """The first `context` tokens of `text_ids` [1, T], the text repeated when it is shorter."""
    if context > text_ids.shape[1]:
        text_ids = text_ids.repeat(1, -(-context // text_ids.shape[1]))
    return text_ids[:, :context]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def run_one(model, make_cache, ids: torch.Tensor, decode_tokens: int) -> dict[str, Any]:
    """Prefill `ids`, then decode `decode_tokens` greedy tokens one step at a time; times, memory, cache bytes."""
    device = model.device
    ids = ids.to(device)
    with PeakMemory(device) as mem:
        cache = make_cache()
        _sync(device)
        t0 = time.perf_counter()
        out = model(ids, past_key_values=cache, use_cache=True, **last_logits_only(model))
        _sync(device)
        t1 = time.perf_counter()
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(decode_tokens):
            out = model(nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        t2 = time.perf_counter()
    memory = cache_memory(cache, model.config)
    del cache, out
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_tokens_per_s": decode_tokens / (t2 - t1),
            "peak_memory": mem.growth, "cache_nbytes": memory["nbytes"], "ratio": memory["ratio"]}


def bench(
    model: Any = "smollm2-135m",
    methods: Iterable[str] | str = ("kivi:bits=4", "kivi:bits=2", "tada:bits=2", "tada:bits=2,mean=channel"),
    contexts: Iterable[int | str] = (1024, 4096),
    *,
    tokenizer: Any = None,
    decode_tokens: int = 32,
    repeats: int = 1,
    model_name: str | None = None,
    progress: bool = True,
    dtype: Any = None,
) -> dict[str, Any]:
    """Each method against `DynamicCache` at each context length; returns a JSON-ready dict of runs and ratios.
    `dtype` (a torch dtype or its name; None or "auto": the model's default) applies when `model` is a name."""
    from tqdm.auto import tqdm

    specs = [check_spec(s) for s in (split_specs(methods) if isinstance(methods, str) else methods)]
    contexts = [parse_length(c) for c in contexts]
    if decode_tokens < 1 or repeats < 1:
        raise ValueError(f"decode_tokens and repeats must be >= 1, got {decode_tokens} and {repeats}")
    if isinstance(model, str):
        model_name = model_name or model
        model, tokenizer = load_model(model, dtype=None if dtype == "auto" else dtype)
    model_name = model_name or getattr(model.config, "name_or_path", "")
    text_ids = tokenizer(heldout_text(), return_tensors="pt", add_special_tokens=False).input_ids
    env = Env(model, tokenizer, "")
    rows = []
    cells = [(c, r, s) for c in contexts for r in range(repeats) for s in specs]
    refs: dict[tuple[int, int], dict[str, Any]] = {}  # the plain cache runs once per context and repeat
    bar = tqdm(total=len(cells) + len(contexts) * repeats, desc="bench", unit="run", disable=not progress)
    for context, rep, spec in cells:
        ids = context_ids(text_ids, context)
        if (context, rep) not in refs:
            bar.set_postfix_str(f"DynamicCache @ {context}")
            refs[context, rep] = run_one(model, lambda: env.make_cache(None), ids, decode_tokens)
            bar.update()
        ref = refs[context, rep]
        bar.set_postfix_str(f"{spec} @ {context}")
        got = run_one(model, lambda: env.make_cache(spec), ids, decode_tokens)
        bar.update()
        rows.append({
            "method": spec, "context": context, "repeat": rep, "reference": ref, "method_run": got,
            "prefill_time_ratio": got["prefill_s"] / ref["prefill_s"],
            "decode_speed_ratio": got["decode_tokens_per_s"] / ref["decode_tokens_per_s"],
            "peak_memory_ratio": got["peak_memory"] / ref["peak_memory"] if ref["peak_memory"] > 0 else None,
            "cache_bytes_ratio": got["cache_nbytes"] / ref["cache_nbytes"],
        })
    bar.close()
    return {"model": model_name, "device": str(model.device), "dtype": str(model.dtype),
            "decode_tokens": decode_tokens, "environment": environment(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "runs": rows}


def bench_table(result: dict[str, Any]) -> str:
    def mib(n):
        return f"{n / 2**20:.1f}"

    body = []
    for r in result["runs"]:
        ref, got = r["reference"], r["method_run"]
        body.append([f"`{r['method']}`", r["context"], f"{got['prefill_s']:.2f} / {ref['prefill_s']:.2f}",
                     f"{got['decode_tokens_per_s']:.1f} / {ref['decode_tokens_per_s']:.1f}",
                     f"{r['decode_speed_ratio']:.2f}", f"{mib(got['cache_nbytes'])} / {mib(ref['cache_nbytes'])}",
                     f"{r['cache_bytes_ratio']:.3f}", f"{mib(got['peak_memory'])} / {mib(ref['peak_memory'])}"])
    return markdown_table(["method", "context", "prefill s (method / plain)", "decode tok/s (method / plain)",
                           "decode speed ratio", "cache MiB (method / plain)", "cache ratio",
                           "peak extra MiB (method / plain)"], body)


def write_bench(result: dict[str, Any], directory: str | Path = "benchmarks/results") -> tuple[Path, Path]:
    """Write `bench-<model>-<time>.json` and the markdown summary beside it, atomically; return both paths."""
    directory = Path(directory)
    stem = f"bench-{Path(str(result['model'])).name}-{result['time'].replace(':', '')}"
    js = atomic_write_text(directory / f"{stem}.json", json.dumps(result, indent=2, sort_keys=True))
    md_text = (f"# kvshrink bench: {result['model']} on {result['device']} ({result['dtype']}), "
               f"{result['decode_tokens']} decoded tokens, {result['time']}\n\n" + bench_table(result) + "\n")
    md = atomic_write_text(directory / f"{stem}.md", md_text)
    return js, md
