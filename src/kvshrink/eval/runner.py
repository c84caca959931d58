"""`kvshrink.evaluate`: quality against bytes for a list of methods, tasks, context lengths and seeds.

One JSON record per (method, task, context, seed), appended to a JSONL file as soon as it is measured, so an
interrupted run resumes without recomputing finished records. The reference for KL and greedy match is
transformers' `DynamicCache` on the same inputs.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import random
import subprocess
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from transformers import DynamicCache

from ..methods import build_method, canonical_spec, make_cache
from ..spec import split_specs
from ..io import atomic_write_text
from ..models import last_logits_only, load_model
from ..version import __version__
from .baselines import baseline_memory, is_baseline, make_baseline_cache, parse_baseline
from .corpus import heldout_text
from .ruler import TASKS as RULER_TASKS
from .prefill import PrefillRecord, record_prefill, replay, replayable
from .scoring import continue_greedy, continue_scores, stop_tokens
from .tasks import get_task

DEFAULT_METHODS = ("full", "kivi:bits=4", "kivi:bits=2", "tada:bits=2", "tada:bits=2,mean=channel")
DEFAULT_TASKS = ("ppl", "kl", "match", "passkey")
DEFAULT_CONTEXTS = (2048,)
DEFAULT_SEEDS = (0,)
RECORD_VERSION = 1


def expand_tasks(tasks: Iterable[str] | str) -> list[str]:
    """Task names from a list or 'a,b,c'; 'ruler' stands for the eleven RULER-style tasks; duplicates dropped."""
    out: list[str] = []
    for name in (t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)):
        for n in (RULER_TASKS if name == "ruler" else (name,) if name else ()):
            if n not in out:
                out.append(n)
    if not out:
        raise ValueError("the task list is empty")
    return out


def check_spec(spec: str) -> str:
    """Validate a method or baseline spec early (unknown names and options fail before any model runs); the
    canonical spelling of a kvshrink spec, which records key on."""
    if is_baseline(spec):
        parse_baseline(spec)
        return spec.strip()
    build_method(spec)
    return canonical_spec(spec)


@functools.lru_cache(maxsize=None)
def _canonical(spec: str) -> str:
    """A record's spec spelled canonically (records written before canonical spelling, or by baselines, as they are
    when they no longer parse)."""
    try:
        return canonical_spec(spec)
    except (ValueError, TypeError):
        return spec


def cache_memory(cache, config) -> dict[str, Any]:
    """The figures of a cache's memory report that records keep (any kvshrink, plain or baseline cache)."""
    if hasattr(cache, "memory_report"):
        r = cache.memory_report()
    elif isinstance(cache, DynamicCache):
        n = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        fp16 = sum(t.numel() * 2 for layer in cache.layers for t in (layer.keys, layer.values))
        r = {"nbytes": n, "fp16_nbytes": fp16, "ratio": n / fp16, "tokens": cache.get_seq_length(), "by_part": {}}
    else:
        r = baseline_memory(cache, config)
    keep = {k: r[k] for k in ("nbytes", "fp16_nbytes", "ratio", "tokens")}
    keep["by_part"] = dict(r.get("by_part", {}))
    keep["bytes_per_token"] = r["nbytes"] / r["tokens"] if r["tokens"] else None
    if "by_layer" in r:
        bits = {row.get("bits") for row in r["by_layer"]}
        keep["layer_bits"] = [row.get("bits") for row in r["by_layer"]] if len(bits) > 1 else None
    return keep


@dataclass
class Env:
    """What tasks share: the model, the held-out text, cache construction and memoised results per cell."""

    model: Any
    tokenizer: Any
    text: str
    continuation: int = 128
    match_tokens: int = 64
    answer_tokens: int = 12
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    cache_options: dict[str, Any] = field(default_factory=dict)
    share_prefill: bool = True  # prefill each prompt once and replay it into every replayable method's cache
    record_budget: int = 2 << 30  # bytes of recorded prefills kept at once (the most recent; always one)
    _ids: torch.Tensor | None = None
    _memo: dict = field(default_factory=dict)
    _records: "OrderedDict[bytes, PrefillRecord]" = field(default_factory=OrderedDict)
    prefill_log: list = field(default_factory=list)  # (prompt tokens, seconds, shared) of every prefill run
    pass_log: list = field(default_factory=list)  # (seconds, reused) of every KVzip reconstruction pass

    def make_cache(self, spec: str | None):
        """A fresh cache for `spec`; None is the reference (`DynamicCache`)."""
        if spec is None:
            return DynamicCache(config=self.model.config)
        if is_baseline(spec):
            return make_baseline_cache(self.model, spec)
        return make_cache(self.model, spec, **self.cache_options)

    def prefilled(self, spec: str | None, ids: torch.Tensor):
        """(cache of `spec` holding the prompt `ids` [1, N], the prefill's last logits [1, V], how it was built).

        With `share_prefill`, the prompt runs through the model once (recorded) and every replayable cache is
        built from that record; other caches, and every cache without `share_prefill`, run their own prefill."""
        cache = self.make_cache(spec)
        if self.share_prefill and replayable(cache, ids.shape[1], self.model):
            key = ids.numpy().tobytes()
            record = self._records.get(key)
            if record is None:
                record = record_prefill(self.model, ids)
                self.prefill_log.append((ids.shape[1], record.seconds, True))
                self._records[key] = record
                while len(self._records) > 1 and sum(r.nbytes() for r in self._records.values()) > self.record_budget:
                    self._records.popitem(last=False)
            else:
                self._records.move_to_end(key)
            logits = replay(record, cache, self.model)
            self._log_pass(cache)
            return cache, logits, {"shared": True, "seconds": round(record.seconds, 3)}
        start = time.perf_counter()
        with torch.no_grad():
            logits = self.model(ids.to(self.model.device), past_key_values=cache, use_cache=True,
                                **last_logits_only(self.model)).logits[:, -1]
        seconds = time.perf_counter() - start
        self.prefill_log.append((ids.shape[1], seconds, False))
        self._log_pass(cache)
        return cache, logits, {"shared": False, "seconds": round(seconds, 3)}

    def _log_pass(self, cache) -> None:
        """Note a KVzip reconstruction pass of this prefill: (its own seconds, whether its scores were reused)."""
        stats = getattr(cache, "reconstruction", None)
        if stats:
            self.pass_log.append((stats["pass_seconds"], stats["reused"]))

    def stop_ids(self) -> list[int]:
        return stop_tokens(self.model, self.tokenizer)

    def memory(self, cache) -> dict[str, Any]:
        return cache_memory(cache, self.model.config)

    def token_ids(self) -> torch.Tensor:
        if self._ids is None:
            self._ids = self.tokenizer(self.text, return_tensors="pt", add_special_tokens=False).input_ids
        return self._ids

    def text_sample(self, context: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(context ids [1, N], continuation ids [1, T]) from a seed-chosen place in the held-out text."""
        ids = self.token_ids()
        need = context + self.continuation
        if ids.shape[1] < need:
            raise ValueError(f"the evaluation text has {ids.shape[1]} tokens; context {context} + continuation "
                             f"{self.continuation} needs {need}: give a longer --text-file or a shorter context")
        start = random.Random(f"text:{seed}:{context}").randrange(0, ids.shape[1] - need + 1)
        window = ids[:, start:start + need]
        bos = self.tokenizer.bos_token_id
        if bos is not None:
            window = torch.cat([torch.tensor([[bos]]), window[:, 1:]], 1)
        return window[:, :context], window[:, context:]

    def _cached(self, key, compute: Callable[[], Any]):
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def logprobs(self, spec: str | None, context: int, seed: int):
        """(next-token log-probs over the continuation [T, vocab], memory report), through `spec`'s cache."""
        def compute():
            ctx, cont = self.text_sample(context, seed)
            cache, logits, _ = self.prefilled(spec, ctx)
            return continue_scores(self.model, cache, logits, cont), self.memory(cache)
        return self._cached(("logprobs", spec, context, seed), compute)

    def greedy(self, spec: str | None, context: int, seed: int):
        """(greedy tokens after the text context, memory report), through `spec`'s cache."""
        def compute():
            ctx, _ = self.text_sample(context, seed)
            cache, logits, _ = self.prefilled(spec, ctx)
            return continue_greedy(self.model, cache, logits, self.match_tokens), self.memory(cache)
        return self._cached(("greedy", spec, context, seed), compute)

    def forget(self, keep_reference: bool = True) -> None:
        """Drop memoised results (all, or all but the reference's) and recorded prefills, to bound memory."""
        self._memo = {k: v for k, v in self._memo.items() if keep_reference and k[1] is None}
        if not keep_reference:
            self._records.clear()


@functools.lru_cache(maxsize=1)
def source_commit() -> str | None:
    """The git commit of the kvshrink source this process runs ("+dirty" when tracked files differ from it), or
    None outside a git checkout (an installed wheel): which code made a record."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                               cwd=here.parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment() -> dict[str, Any]:
    """Library versions, the source commit and the machine, recorded with every result."""
    import transformers

    return {
        "kvshrink": __version__, "commit": source_commit(), "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor(),
        "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def record_key(r: dict[str, Any]) -> tuple:
    return (r["model"], r["corpus"], _canonical(r["method"]), r["task"], r["context"], r["seed"],
            _freeze(r["settings"]))


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a results file; a line cut short by an interrupted write is dropped (and said)."""
    path = Path(path)
    if not path.exists():
        return []
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(r, dict) and r.get("version") == RECORD_VERSION:
            records.append(r)
    if bad:
        import warnings

        warnings.warn(f"{path}: skipped {bad} unreadable line(s) (an interrupted write); they will be recomputed")
    return records


def _rewrite(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace a results file by its readable records (after an interrupted write), atomically."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def _freeze(x) -> str:
    return json.dumps(x, sort_keys=True)


def _append(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def evaluate(
    model: Any = "smollm2-135m",
    methods: Iterable[str] | str = DEFAULT_METHODS,
    tasks: Iterable[str] | str = DEFAULT_TASKS,
    contexts: Iterable[int] = DEFAULT_CONTEXTS,
    seeds: Iterable[int] = DEFAULT_SEEDS,
    *,
    tokenizer: Any = None,
    text: str | None = None,
    corpus: str | None = None,
    output: str | Path | None = None,
    resume: bool = True,
    continuation: int = 128,
    match_tokens: int = 64,
    depths: Sequence[float] = (0.1, 0.5, 0.9),
    cache_options: dict[str, Any] | None = None,
    model_name: str | None = None,
    progress: bool = True,
    share_prefill: bool = True,
    dtype: Any = None,
) -> list[dict[str, Any]]:
    """Measure every (method, task, context, seed) cell; return its records (resumed ones included).

    model: an embedded name, path or hub id (loaded with `load_model`), or a loaded model (then pass `tokenizer`).
    methods: specs such as 'tada:bits=2,group=32', or baselines 'hf-quanto:bits=4'. text: the held-out text
    (default: the part of the embedded corpus calibration never uses). output: JSONL file to append records to.
    tasks: names, or 'ruler' for the eleven RULER-style tasks. share_prefill: prefill each prompt once and build
    every replayable method's cache from it (exact; see `eval.prefill`). dtype: the model's, when loading by name.
    """
    from tqdm.auto import tqdm

    specs = [check_spec(s) for s in (split_specs(methods) if isinstance(methods, str) else methods)]
    task_names = expand_tasks(tasks)
    task_objs = {name: get_task(name) for name in task_names}
    contexts = [int(c) for c in contexts]
    seeds = [int(s) for s in seeds]
    for c in contexts:
        if c < 64:
            raise ValueError(f"context lengths must be at least 64 tokens, got {c}")
    if continuation < 2 or match_tokens < 1:
        raise ValueError(f"continuation must be >= 2 and match_tokens >= 1, got {continuation} and {match_tokens}")
    if isinstance(model, str):
        model_name = model_name or model
        model, tokenizer = load_model(model, dtype=dtype)
    elif tokenizer is None:
        raise ValueError("a loaded model needs its tokenizer: evaluate(model, tokenizer=tok, ...)")
    model_name = model_name or getattr(model.config, "name_or_path", "") or type(model).__name__
    if text is None:
        text = heldout_text()
        corpus = corpus or "pydoc_data.topics (held-out last 20%)"
    corpus = corpus or "user text"
    settings = {"continuation": continuation, "match_tokens": match_tokens, "depths": list(depths),
                "cache_options": cache_options or {}}
    frozen = _freeze(settings)
    env = Env(model, tokenizer, text, continuation, match_tokens, depths=tuple(depths),
              cache_options=dict(cache_options or {}), share_prefill=share_prefill)

    output = Path(output) if output is not None else None
    done: dict[tuple, dict] = {}
    if output is not None and resume:
        kept = load_records(output)
        if output.exists() and len(kept) != sum(1 for line in output.read_text(encoding="utf-8").splitlines()
                                                if line.strip()):
            _rewrite(output, kept)
        for r in kept:
            done[record_key(r)] = r
    # without resume the cells asked for are measured again and appended: readers take a cell's last record, and the
    # file's other records (other methods, seeds, contexts) stay
    meta = environment()
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    # task-major inside a (context, seed): every method meets a prompt while its recorded prefill is at hand
    cells = [(c, s, m, t) for c in contexts for s in seeds for t in task_names for m in specs]
    # a row's records share one dtype: resuming bfloat16 records in float32 (the default on a CPU without native
    # bf16) would mix the two in one table row without a word
    other = {}
    for context, seed, spec, task in cells:
        kept_dtype = done.get((model_name, corpus, spec, task, context, seed, frozen), {}).get("dtype", dtype)
        if kept_dtype != dtype:
            other[kept_dtype] = other.get(kept_dtype, 0) + 1
    if other:
        held = ", ".join(f"{n} in {d}" for d, n in sorted(other.items()))
        first = sorted(other)[0]
        raise ValueError(f"{output} holds cells of this run computed in another dtype ({held}) and this run computes "
                         f"in {dtype}: a row's records must share one; pass dtype={first!r} (--dtype {first}) to "
                         f"continue them, resume=False (--no-resume) to measure them again, or another output file")
    results = []
    bar = tqdm(cells, desc="eval", unit="cell", disable=not progress)
    last = None
    for context, seed, spec, task in bar:
        if last != (context, seed):
            env.forget(keep_reference=False)
            last = (context, seed)
        key = (model_name, corpus, spec, task, context, seed, frozen)
        if key in done:
            results.append(done[key])
            continue
        bar.set_postfix_str(f"{spec} {task} ctx={context} seed={seed}")
        start = time.perf_counter()
        shared_before = sum(sec for _, sec, shared in env.prefill_log if shared)
        passes_before = len(env.pass_log)
        metrics, memory = task_objs[task].run(env, spec, context, seed)
        shared = sum(sec for _, sec, shared in env.prefill_log if shared) - shared_before
        passes = env.pass_log[passes_before:]
        record = {
            "version": RECORD_VERSION, "model": model_name, "dtype": dtype, "corpus": corpus, "method": spec,
            "task": task, "context": context, "seed": seed, "settings": settings, "metrics": metrics,
            "memory": memory, "seconds": round(time.perf_counter() - start, 3),
            "shared_prefill_seconds": round(shared, 3), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "environment": meta,
        }
        if passes:  # KVzip: the pass's own seconds, and whether this cell reused another cell's (not in `seconds`)
            record["reconstruction"] = {"seconds": round(sum(sec for sec, _ in passes), 3),
                                        "reused": any(reused for _, reused in passes)}
        if output is not None:
            _append(output, record)
        results.append(record)
        # drop this method's memoised results once its last task has run (the reference stays for the cell)
        if task == task_names[-1]:
            env._memo = {k: v for k, v in env._memo.items() if k[1] != spec}
    return results
