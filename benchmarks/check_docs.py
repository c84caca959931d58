"""Recompute the README's and the docs' headline tables from the committed records; exit 1 on any difference.

    .venv/bin/python benchmarks/check_docs.py                       # README.md and docs/ of this checkout
    .venv/bin/python benchmarks/check_docs.py --readme /tmp/README.md --docs /tmp/docs

A checked table is the markdown table right after a line `<!-- check_docs: NAME -->`; NAME says in TABLES below
which records it comes from and how its rows map to records. Every cell whose column this script knows is
recomputed and compared as text (the figures as the docs print them); cells of other columns (notes, labels) are
not. Differing cells are printed one per line, with the document, table, row and column.

Independent of the code that made the tables: it imports no kvshrink code (nor ruler_table.py) and reads the
records with `json` alone. Everything is recomputed here: which records count (at a context, the last record of a
cell wins), the prompts a table's rows share, shares, per-task means and averages, the bootstrap intervals
(splitmix64 from seed 0, 2,000 resamples of the prompts, the 51st and 1,950th sorted means: ruler_table.py's
documented procedure, reimplemented), RULER's string_match_all for the kvpress peer's answers, and the held-out
metrics (Δppl as the mean of the per-seed changes, KL as the mean over seeds, passkeys found over asked).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
         "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
SHORT = dict(zip(("s1", "s2", "s3", "mk1", "mk2", "mk3", "mv", "mq", "vt", "cwe", "fwe"), TASKS))
QWEN_RULER = "benchmarks/results/eval-ruler-qwen.jsonl"
KVPRESS = ("benchmarks/peers/kvpress/results-ruler-qwen2.5-coder-1.5b.jsonl",
           "benchmarks/peers/kvpress/ruler-qwen2.5-coder-1.5b.json")
P = "benchmarks/profiles/qwen2.5-coder-1.5b"
T = "benchmarks/results/bases-qwen-tale-4k.json"
D = "benchmarks/results/bases-qwen-dynakv-4k.json"
ROT_SMOL = "benchmarks/results/eval-rotation-smollm2.jsonl"
LOWRANK_1K = "benchmarks/results/eval-lowrank-qwen-1k.jsonl"

#: docs/seed-claims.md's 1k low-rank perplexities: row label -> (records, method)
_LOWRANK_1K = {
    "`full`": "full",
    "`tale:levels=r128b16,target_ratio=1.01` (full rank, fp16 coefficients)":
        "tale:profile=$T,levels=r128b16,target_ratio=1.01",
    "`tale:levels=r64b16,target_ratio=0.51` (rank cut only)": "tale:profile=$T,levels=r64b16,target_ratio=0.51",
    "`tale:levels=r16b16,target_ratio=0.2`": "tale:profile=$T,levels=r16b16,target_ratio=0.2",
    "`tale:levels=r64b8,target_ratio=0.3`": "tale:profile=$T,levels=r64b8,target_ratio=0.3",
    "`tale:levels=r64b4,target_ratio=0.2`": "tale:profile=$T,levels=r64b4,target_ratio=0.2",
    "`tale:target_ratio=0.082,levels=r64b4/r32b4/r16b4/r8b4`":
        "tale:profile=$T,target_ratio=0.082,levels=r64b4/r32b4/r16b4/r8b4",
    "the same, `mean=channel`": "tale:profile=$T,target_ratio=0.082,levels=r64b4/r32b4/r16b4/r8b4,mean=channel",
    "the same, `exact_layers=0/1`":
        "tale:profile=$T,target_ratio=0.082,levels=r64b4/r32b4/r16b4/r8b4,exact_layers=0/1",
    "`dynakv:target_ratio=0.063,levels=r128b4/r64b4/r32b4/r16b4,exact_layers=0/1`":
        "dynakv:profile=$D,target_ratio=0.063,levels=r128b4/r64b4/r32b4/r16b4,exact_layers=0/1"}
LOWRANK_1K_ROWS = {label: (LOWRANK_1K, m.replace("$T", T).replace("$D", D)) for label, m in _LOWRANK_1K.items()}

#: name -> what the table holds. kind "ruler": rows of RULER records (`rows`: row label -> method, or None when
#: each label is the method's short label); kind "heldout": rows of ppl / kl / passkey records
#: the committed 0.10 pairing: KVzip's ranking under a byte budget, freed scores, the rotation-aware 0.20 codes
KVZIP_010 = f"kvzip:budget=0.6,scores=free,ratio=0.096 + tada:profile={P}-tada-rotate-0.20.json"
#: the committed pairing file's spec (benchmarks/profiles/...-kvzip-rotate-0.10.json): KVzip's ranking at 45%, scores
#: freed and positions packed after the prompt, the rotation-aware 0.20 codes
KVZIP_PAIRING = f"kvzip:budget=0.45,scores=free,positions=bits + tada:profile={P}-tada-rotate-0.20.json"
#: Qwen RULER records computed in float32 (a CPU without native bf16): rows apart from the bf16 ones
QWEN_RULER_FP32 = "benchmarks/results/eval-ruler-qwen-fp32.jsonl"
#: KVzip's ranking under a byte cap of 0.058 with the rotation-aware 0.20 codes (uniform and per-head budgets), and
#: with the 0.15 codes
KVZIP_006 = f"kvzip:budget=0.6,scores=free,positions=bits,ratio=0.058 + tada:profile={P}-tada-rotate-0.20.json"
KVZIP_006_HEADS = (f"kvzip:budget=0.6,heads=adaptive,scores=free,positions=bits,ratio=0.058 + "
                   f"tada:profile={P}-tada-rotate-0.20.json")
KVZIP_006_015 = f"kvzip:budget=0.6,scores=free,positions=bits,ratio=0.058 + tada:profile={P}-tada-rotate-0.15.json"
TABLES: dict[str, dict] = {
    "readme-qwen-headline": {"doc": "README.md", "kind": "ruler", "records": QWEN_RULER, "context": 4096, "rows": {
        "`full`": "full",
        "`kivi:bits=4`": "kivi:bits=4",
        "`kivi:bits=2`": "kivi:bits=2",
        "`tada`, calibrated at 0.20 with rotation allowed": f"tada:profile={P}-tada-rotate-0.20.json",
        "`tada`, calibrated at 0.20, groups of 64, no rotation": f"tada:profile={P}-tada-g64-0.20.json",
        "`snapkv:budget=0.25`": "snapkv:budget=0.25",
        "transformers `QuantizedCache` (quanto, 4-bit)": "hf-quanto:bits=4",
        "joint profile at 0.10 (`layered`)": f"layered:profile={P}-layered-0.10.json",
        "joint profile at 0.06 (`layered`)": f"layered:profile={P}-layered-0.06.json",
        "KVzip's tokens, rotation-aware 0.20 codes (`pairing` profile)": KVZIP_PAIRING}},
    "readme-qwen-16k": {"doc": "README.md", "kind": "ruler", "records": QWEN_RULER, "context": 16384, "rows": {
        "`full`": "full",
        "`tada`, calibrated at 0.20 with rotation allowed": f"tada:profile={P}-tada-rotate-0.20.json",
        "joint profile at 0.10 (`layered`)": f"layered:profile={P}-layered-0.10.json",
        "joint profile at 0.06 (`layered`)": f"layered:profile={P}-layered-0.06.json",
        "KVzip's tokens, rotation-aware 0.20 codes (`pairing` profile)":
            f"kvzip:budget=0.45 + tada:profile={P}-tada-rotate-0.20.json"}},
    "readme-smollm2": {"doc": "README.md", "kind": "heldout", "context": 2048, "rows": {
        "`full`": ("benchmarks/results/eval-rotation-smollm2.jsonl", "full"),
        "`tada`, calibrated profile at 0.27 (the default of `kvshrink run`)":
            ("benchmarks/results/eval-rotation-smollm2.jsonl", "tada:profile=smollm2-135m-tada-0.27"),
        "`tada`, calibrated at 0.27 with rotation allowed":
            ("benchmarks/results/eval-rotation-smollm2.jsonl",
             "tada:profile=/work/main/benchmarks/profiles/smollm2-135m-tada-rotate-0.27.json"),
        "`tada`, calibrated at 0.20 with rotation allowed":
            ("benchmarks/results/eval-rotation-smollm2.jsonl",
             "tada:profile=/work/main/benchmarks/profiles/smollm2-135m-tada-rotate-0.20.json"),
        "`kivi:bits=4`": ("benchmarks/results/eval-smollm2.jsonl", "kivi:bits=4"),
        "`kivi:bits=2`": ("benchmarks/results/eval-rotation-smollm2.jsonl", "kivi:bits=2"),
        "`snapkv:budget=0.25` (KL at 2k, 3 passkeys)": ("benchmarks/results/eval-eviction.jsonl", "snapkv:budget=0.25"),
        "kvpress's SnapKV at the same budget (its own environment)":
            ("benchmarks/peers/kvpress/results-kvpress.jsonl", "kvpress:snapkv:0.25"),
    }},
    "seed-claims-4k": {"doc": "docs/seed-claims.md", "kind": "ruler", "records": QWEN_RULER, "context": 4096},
    "seed-claims-16k": {"doc": "docs/seed-claims.md", "kind": "ruler", "records": QWEN_RULER, "context": 16384},
    "seed-claims-16k-22": {"doc": "docs/seed-claims.md", "kind": "ruler", "records": QWEN_RULER, "context": 16384},
    "seed-claims-tale": {"doc": "docs/seed-claims.md", "kind": "ruler", "records": QWEN_RULER, "context": 4096},
    "seed-claims-dynakv": {"doc": "docs/seed-claims.md", "kind": "ruler", "records": QWEN_RULER, "context": 4096},
    "seed-claims-kvdirect-44": {"doc": "docs/seed-claims.md", "kind": "ruler", "records": QWEN_RULER,
                                "context": 4096},
    "seed-claims-mikv-44": {"doc": "docs/seed-claims.md", "kind": "ruler", "records": QWEN_RULER, "context": 4096},
    "seed-claims-peers": {"doc": "docs/seed-claims.md", "kind": "ruler", "records": QWEN_RULER, "context": 4096,
                          "rows": {"kvpress full": "kvpress:full:1",
                                   "kvpress expected_attention (keeps 0.25)": "kvpress:expected_attention:0.25",
                                   "kvpress h2o (keeps 0.125)": "kvpress:h2o:0.125",
                                   "kvpress h2o (keeps 0.25)": "kvpress:h2o:0.25",
                                   "kvpress snapkv (keeps 0.125)": "kvpress:snapkv:0.125",
                                   "kvpress snapkv (keeps 0.25)": "kvpress:snapkv:0.25"}},
    "seed-claims-peers-010": {"doc": "docs/seed-claims.md", "kind": "ruler", "records": QWEN_RULER, "context": 4096,
                               "seeds": [0],
                               "rows": {"kvpress full": "kvpress:full:1",
                                        "kvpress adakv_snapkv (keeps 0.1)": "kvpress:adakv_snapkv:0.1",
                                        "kvpress kvzip (keeps 0.1)": "kvpress:kvzip:0.1",
                                        "`full`": "full",
                                        "joint profile at 0.10 (`layered`)": f"layered:profile={P}-layered-0.10.json",
                                        "`snapkv:budget=0.45 + tada:profile=<rotation-aware 0.20>`":
                                            f"snapkv:budget=0.45 + tada:profile={P}-tada-rotate-0.20.json",
                                        "`kvzip:budget=0.45 + tada:profile=<rotation-aware 0.20>`":
                                            f"kvzip:budget=0.45 + tada:profile={P}-tada-rotate-0.20.json"}},
    "kvzip-codes-010": {"doc": "docs/kvzip.md", "kind": "ruler", "records": QWEN_RULER, "context": 4096,
                         "rows": {"`full`": "full",
                                  "`kvzip:budget=0.45 + tada:profile=<rotation-aware 0.20>`":
                                      f"kvzip:budget=0.45 + tada:profile={P}-tada-rotate-0.20.json",
                                  "`kvzip:budget=0.45,scores=free,positions=bits + tada:profile=<rotation-aware "
                                  "0.20>`": KVZIP_PAIRING,
                                  "`snapkv:budget=0.45 + tada:profile=<rotation-aware 0.20>`":
                                      f"snapkv:budget=0.45 + tada:profile={P}-tada-rotate-0.20.json",
                                  "joint profile at 0.10 (`layered`)": f"layered:profile={P}-layered-0.10.json"}},
    "kvzip-006-fp32": {"doc": "docs/kvzip.md", "kind": "ruler", "records": QWEN_RULER_FP32, "context": 4096,
                       "rows": {"`full` (float32)": "full",
                                "`kvzip:budget=0.6,ratio=0.058,scores=free,positions=bits + tada:profile=<rotation-"
                                "aware 0.20>`": KVZIP_006,
                                "the same, `heads=adaptive`": KVZIP_006_HEADS}},
    "kvzip-006-fp32-three": {"doc": "docs/kvzip.md", "kind": "ruler", "records": QWEN_RULER_FP32, "context": 4096,
                             "rows": {"`full` (float32)": "full", "uniform budgets, 0.20 codes": KVZIP_006,
                                      "`heads=adaptive`, 0.20 codes": KVZIP_006_HEADS,
                                      "uniform budgets, 0.15 codes": KVZIP_006_015}},
    "kvzip-006-fp32-44": {"doc": "docs/kvzip.md", "kind": "ruler", "records": QWEN_RULER_FP32, "context": 4096,
                          "rows": {"`full` (float32)": "full",
                                   "`kvzip:budget=0.6,ratio=0.058,heads=adaptive,scores=free,positions=bits + "
                                   "tada:profile=<rotation-aware 0.20>` (the 0.06 pairing profile)": KVZIP_006_HEADS}},
    "kvzip-006-bf16-seed0": {"doc": "docs/kvzip.md", "kind": "ruler", "records": QWEN_RULER, "context": 4096,
                             "seeds": [0],
                             "rows": {"`full` (bf16)": "full",
                                      "`snapkv:budget=0.26 + tada:profile=<rotation-aware 0.20>`":
                                          f"snapkv:budget=0.26 + tada:profile={P}-tada-rotate-0.20.json",
                                      "joint profile at 0.06 (`layered`)": f"layered:profile={P}-layered-0.06.json",
                                      "the 0.10 pairing (`kvzip:budget=0.45,...`)": KVZIP_PAIRING}},
    "rotation-44": {"doc": "docs/rotation.md", "kind": "ruler", "records": QWEN_RULER, "context": 4096},
    "rotation-22": {"doc": "docs/rotation.md", "kind": "ruler", "records": QWEN_RULER, "context": 4096},
    "rotation-16k": {"doc": "docs/rotation.md", "kind": "ruler", "records": QWEN_RULER, "context": 16384},
    "seed-claims-lowrank-1k": {"doc": "docs/seed-claims.md", "kind": "heldout", "context": 1024,
                               "ppl_format": "short", "rows": LOWRANK_1K_ROWS},
    "rotation-smollm2": {"doc": "docs/rotation.md", "kind": "heldout", "context": 2048, "rows": {
        "`full` (fp32)": (ROT_SMOL, "full"),
        "`tada`, rotation allowed, calibrated at 0.27":
            (ROT_SMOL, "tada:profile=/work/main/benchmarks/profiles/smollm2-135m-tada-rotate-0.27.json"),
        "`tada`, shipped 0.27 profile (no rotation)": (ROT_SMOL, "tada:profile=smollm2-135m-tada-0.27"),
        "`turboquant:bits=3` (Lloyd-Max both, 32-token window, 4 sinks)": (ROT_SMOL, "turboquant:bits=3"),
        "`kivi:bits=2`": (ROT_SMOL, "kivi:bits=2"),
        "`tada`, group 64 (no rotation), calibrated at 0.20":
            (ROT_SMOL, "tada:profile=/work/main/benchmarks/profiles/smollm2-135m-tada-g64-0.20.json"),
        "`tada`, rotation allowed, calibrated at 0.20":
            (ROT_SMOL, "tada:profile=/work/main/benchmarks/profiles/smollm2-135m-tada-rotate-0.20.json"),
        **{f"`{m}`": (ROT_SMOL, m) for m in ("turboquant:bits=2", "turboquant:preset=turboquant_k8v4",
                                             "turboquant:preset=turboquant_4bit_nc",
                                             "turboquant:preset=turboquant_k3v4_nc",
                                             "turboquant:preset=turboquant_3bit_nc")}}},
    "rotation-qwen-heldout": {"doc": "docs/rotation.md", "kind": "heldout", "context": 4096,
                              "records": "benchmarks/results/eval-rotation-qwen.jsonl"},
    "kvzip-heldout": {"doc": "docs/kvzip.md", "kind": "heldout", "context": 4096, "rows": {
        "`full`": ("benchmarks/results/eval-rotation-qwen.jsonl", "full"),
        "`tada:profile=<rotation-aware 0.20>`": ("benchmarks/results/eval-rotation-qwen.jsonl",
                                                 f"tada:profile={P}-tada-rotate-0.20.json"),
        "`kvzip:budget=0.45 + tada:profile=<rotation-aware 0.20>`": ("benchmarks/results/eval-rotation-qwen.jsonl",
                                                                     f"kvzip:budget=0.45 + tada:profile={P}-tada-rotate-0.20.json"),
        "`kvzip:budget=0.6,ratio=0.096,scores=free + tada:profile=<rotation-aware 0.20>`":
            ("benchmarks/results/eval-rotation-qwen.jsonl", KVZIP_010)}},
    "gear-kivi-4k-fp32": {"doc": "docs/low-rank.md", "kind": "ruler",
                          "records": "benchmarks/results/eval-gear-qwen-fp32.jsonl", "context": 4096},
    "kvzip-heldout-fp32": {"doc": "docs/kvzip.md", "kind": "heldout", "context": 4096, "rows": {
        "`full` (float32)": ("benchmarks/results/eval-heldout-qwen-fp32.jsonl", "full"),
        "the 0.10 pairing profile": ("benchmarks/results/eval-heldout-qwen-fp32.jsonl",
                                     f"pairing:profile={P}-kvzip-rotate-0.10.json"),
        "the 0.06 pairing profile": ("benchmarks/results/eval-heldout-qwen-fp32.jsonl",
                                     f"pairing:profile={P}-kvzip-rotate-0.06.json")}},
}
MARK = re.compile(r"<!--\s*check_docs:\s*([\w-]+)\s*-->")


# -- records -----------------------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    """Every parseable line of a JSONL file (a line cut by an interrupted write is left out)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def short_label(method: str) -> str:
    """A method spec as ruler_table.py labels it: each `profile=` path cut to its file name without `.json`."""
    name, sep, opts = method.partition(":")
    items = []
    for item in opts.split(",") if opts else []:
        key, eq, value = item.partition("=")
        if key == "profile" and eq:
            value = value.rsplit("/", 1)[-1]
            value = value[:-5] if value.endswith(".json") else value
        items.append(key + eq + value)
    return name + sep + ",".join(items)


def ruler_cells(path: str, context: int) -> dict[str, dict[tuple[str, int], dict]]:
    """method -> (task, seed) -> {score, share, seconds}: the last record of each cell at `context`."""
    cells: dict[str, dict[tuple[str, int], dict]] = {}
    for r in read_jsonl(ROOT / path):
        if r.get("context") != context or r.get("task") not in TASKS:
            continue
        passed = r.get("reconstruction") or {}  # a KVzip pass reused from another cell is still the method's cost
        cells.setdefault(r["method"], {})[(r["task"], r["seed"])] = {
            "score": r["metrics"][r["task"]], "share": r["memory"]["ratio"],
            "seconds": r["seconds"] - (r.get("shared_prefill_seconds") or 0.0)
            + (passed.get("seconds", 0.0) if passed.get("reused") else 0.0)}
    return cells


def match_all(answer: str, references: list[str]) -> float:
    """RULER's string_match_all: the share of references found, case-insensitively, in the cleaned answer."""
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", answer or "").strip().lower()
    return sum(ref.lower() in text for ref in references) / len(references)


def kvpress_cells(context: int) -> dict[str, dict[tuple[str, int], dict]]:
    """'kvpress:<press>:<budget>' -> (task, seed) -> {score, share}: kvpress's answers scored here."""
    answers, inputs = KVPRESS
    refs = {(p["task"], p["context"], p["seed"]): p["references"]
            for p in json.loads((ROOT / inputs).read_text())["prompts"]}
    cells: dict[str, dict[tuple[str, int], dict]] = {}
    for r in read_jsonl(ROOT / answers):
        key = (r["task"], r["context"], r["seed"])
        if r["context"] == context and key in refs:
            cells.setdefault(f"kvpress:{r['press']}:{r['budget']:g}", {})[(r["task"], r["seed"])] = {
                "score": match_all(r["answer"], refs[key]), "share": r["budget"], "seconds": None}
    return cells


# -- the bootstrap ------------------------------------------------------------------------------------------------
def draws(n: int, count: int = 2000, seed: int = 0) -> list[list[int]]:
    """`count` resamples of n indices, each index the next splitmix64 output modulo n."""
    mask = (1 << 64) - 1
    state, out = seed, []
    for _ in range(count):
        row = []
        for _ in range(n):
            state = (state + 0x9E3779B97F4A7C15) & mask
            z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & mask
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
            row.append((z ^ (z >> 31)) % n)
        out.append(row)
    return out


def percentile_interval(values: list[float], resampled: list[list[int]]) -> tuple[float, float]:
    means = sorted(sum(values[i] for i in row) / len(values) for row in resampled)
    k = len(means) // 40
    return means[k], means[-1 - k]


# -- expected cells ---------------------------------------------------------------------------------------------
class RulerTable:
    """The figures of a RULER table's rows: each row over the prompts every kvshrink row of the table has."""

    def __init__(self, records: str, context: int, methods: list[str], seeds: list[int] | None = None):
        ours, peers = ruler_cells(records, context), kvpress_cells(context)
        self.cells = {m: (peers if m.startswith("kvpress:") else ours).get(m) for m in methods}
        have = [set(c) for m, c in self.cells.items() if c and not m.startswith("kvpress:")]
        have = have or [set(c) for c in self.cells.values() if c]
        self.prompts = sorted(set.intersection(*have), key=lambda k: (TASKS.index(k[0]), k[1])) if have else []
        if seeds is not None:  # a table limited to some seeds (a peer answered only those)
            self.prompts = [k for k in self.prompts if k[1] in seeds]
        self.full = ours.get("full", {})
        self.peer_full = peers.get("kvpress:full:1", {})  # a peer's rows are compared with its own full cache
        self._draws: dict[int, list[list[int]]] = {}

    def _resampled(self, n: int) -> list[list[int]]:
        if n not in self._draws:
            self._draws[n] = draws(n)
        return self._draws[n]

    def row(self, method: str) -> dict | None:
        cells = self.cells.get(method)
        if not cells:
            return None
        keys = [k for k in self.prompts if k in cells]
        tasks: dict[str, list[float]] = {}
        for task, seed in keys:
            tasks.setdefault(task, []).append(cells[(task, seed)]["score"])
        means = {t: sum(v) / len(v) for t, v in tasks.items()}
        avg = sum(means.values()) / len(means)
        out = {"n": len(keys), "means": means, "avg": avg,
               "avg_ci": percentile_interval([cells[k]["score"] for k in keys], self._resampled(len(keys))),
               "share": sum(cells[k]["share"] for k in keys) / len(keys)}
        if all(cells[k]["seconds"] is not None for k in keys):
            out["seconds"] = sum(cells[k]["seconds"] for k in keys) / len(keys)
        full = self.peer_full if method.startswith("kvpress:") else self.full
        paired = [k for k in keys if k in full]
        if paired:
            ref: dict[str, list[float]] = {}
            for task, seed in paired:
                ref.setdefault(task, []).append(full[(task, seed)]["score"])
            ref_avg = sum(sum(v) / len(v) for v in ref.values()) / len(ref)
            diffs = [cells[k]["score"] - full[k]["score"] for k in paired]
            out["delta"] = avg - ref_avg
            out["delta_ci"] = percentile_interval(diffs, self._resampled(len(paired)))
        return out


def ruler_cell(column: str, row: dict | None, by_context: dict[int, dict | None], method: str) -> str | None:
    """The text a RULER table shows in `column` for a row (None: a column this script does not check)."""
    col = column.strip().strip("`")
    m = re.search(r"\b(\d+)k\b", col)
    if m:
        row = by_context.get(int(m.group(1)) * 1024)
        col = re.sub(r"\s*\b\d+k\b", "", col)
    if col.startswith("prompts") and "/" in col:
        return " / ".join(str(r["n"]) for r in by_context.values() if r)
    if row is None:
        return ""
    name = SHORT.get(col, col)
    if name in TASKS:
        return f"{row['means'][name]:.2f}" if name in row["means"] else ""
    if col == "share":
        return f"{row['share']:g}" if method.startswith("kvpress:") else f"{row['share']:.3f}"
    if col in ("RULER avg [95% interval]", "avg [95% interval]"):
        lo, hi = row["avg_ci"]
        return f"{row['avg']:.3f} [{lo:.3f}, {hi:.3f}]"
    if col in ("RULER avg", "avg"):
        return f"{row['avg']:.3f}"
    if col.startswith("vs full") and col.endswith("[95% interval]"):
        if "delta" not in row:
            return ""
        lo, hi = row["delta_ci"]
        return f"{100 * row['delta']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    if col.startswith("s/prompt"):
        return f"{row['seconds']:.1f}" if "seconds" in row else ""
    if col == "prompts":
        return str(row["n"])
    return None


def heldout_records(path: str, method: str, context: int) -> dict[str, list[dict]]:
    """task -> one {share, metrics} per seed (seed order) of a method's held-out records at `context`; a kvpress
    peer's records ('kvpress:<press>:<budget>') are read in their own format, which holds no bytes."""
    cells = {}
    for r in read_jsonl(ROOT / path):
        if r.get("context") != context or r.get("task") not in ("ppl", "kl", "passkey"):
            continue
        if method.startswith("kvpress:"):
            if f"kvpress:{r['press']}:{r['budget']:g}" == method:
                answers = [{"correct": i < r["correct"]} for i in range(r.get("prompts", 0))]
                cells[(r["task"], r.get("seed", 0))] = {"share": None, "metrics": {**r, "answers": answers}}
        elif r.get("method") == method:
            cells[(r["task"], r["seed"])] = {"share": r["memory"]["ratio"], "metrics": r["metrics"]}
    return {t: [v for (task, _), v in sorted(cells.items(), key=lambda kv: kv[0][1]) if task == t]
            for t in ("ppl", "kl", "passkey")}


def heldout_cell(column: str, path: str, method: str, context: int, ppl_format: str = "long") -> str | None:
    """Share (the mean over the method's records at `context`, as `kvshrink eval` tabulates it), Δppl, KL or
    passkeys found of one method at `context`."""
    by_task = heldout_records(path, method, context)
    col = column.strip()
    if col == "share":
        shares = [r["share"] for recs in by_task.values() for r in recs if r["share"] is not None]
        if not shares:
            return ""
        return f"{sum(shares) / len(shares):.3f}"
    if col == "Δppl":
        v = [r["metrics"]["ppl_change"] for r in by_task["ppl"]]
        return f"{100 * sum(v) / len(v):+.2f}%" if v else ""
    if col == "KL":
        v = [r["metrics"]["kl"] for r in by_task["kl"]]
        return f"{sum(v) / len(v):.4f}" if v else ""
    if col == "top-1":
        v = [r["metrics"]["top1"] for r in by_task["kl"]]
        return f"{sum(v) / len(v):.3f}" if v else ""
    if col == "ppl":  # "long": 3 decimals; "short": 2 decimals, thousands as whole numbers with commas
        v = [r["metrics"]["ppl"] for r in by_task["ppl"]]
        if not v:
            return ""
        ppl = sum(v) / len(v)
        return f"{ppl:.3f}" if ppl_format == "long" else f"{ppl:,.0f}" if ppl >= 1000 else f"{ppl:.2f}"
    if col == "passkey":
        found = sum(sum(bool(a["correct"]) for a in r["metrics"]["answers"]) for r in by_task["passkey"])
        asked = sum(len(r["metrics"]["answers"]) for r in by_task["passkey"])
        return f"{found}/{asked}" if asked else ""
    return None


# -- documents --------------------------------------------------------------------------------------------------
def tables_in(text: str) -> dict[str, tuple[list[str], list[list[str]]]]:
    """name -> (header cells, body rows' cells) of every table after a check_docs marker."""
    lines = text.splitlines()
    out = {}
    for i, line in enumerate(lines):
        m = MARK.search(line)
        if not m:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("|"):
            j += 1
        block = []
        while j < len(lines) and lines[j].startswith("|"):
            block.append([c.strip() for c in lines[j].strip().strip("|").split("|")])
            j += 1
        out[m.group(1)] = (block[0], block[2:]) if len(block) > 2 else ([], [])
    return out


def check(readme: Path, docs: Path) -> list[str]:
    """Every difference between the checked tables and the records, as lines to print."""
    problems = []
    texts: dict[str, dict] = {}
    for name, spec in TABLES.items():
        doc = spec["doc"]
        path = readme if doc == "README.md" else docs / Path(doc).name
        if doc not in texts:
            texts[doc] = tables_in(path.read_text(encoding="utf-8"))
        if name not in texts[doc]:
            problems.append(f"{path}: no table marked <!-- check_docs: {name} -->")
            continue
        header, body = texts[doc][name]
        problems += [f"{path}: table {name}, {p}" for p in check_table(spec, header, body)]
    return problems


def row_label(cell: str) -> str:
    """A row's first cell without the links it carries ("... ([rotation](docs/rotation.md#...))")."""
    return re.sub(r"\s*\(\[[^\]]*\]\([^)]*\)\)", "", cell).strip()


def check_table(spec: dict, header: list[str], body: list[list[str]]) -> list[str]:
    problems = []
    body = [[row_label(row[0]), *row[1:]] for row in body]
    labels = [row[0] for row in body]
    if spec["kind"] == "heldout":
        rows = spec.get("rows") or {f"`{short_label(r['method'])}`": (spec["records"], r["method"])
                                    for r in read_jsonl(ROOT / spec["records"])}
        for row in body:
            if row[0] not in rows:
                problems.append(f"row {row[0]}: not a row this script knows")
                continue
            path, method = rows[row[0]]
            for col, got in zip(header[1:], row[1:]):
                want = heldout_cell(col, path, method, spec["context"], spec.get("ppl_format", "long"))
                got = re.sub(r"\s*\([^)]*\)$", "", got)  # a note after the figure: "2.000 (fp32)"
                if want is not None and want != got:
                    problems.append(f"row {row[0]}, column {col!r}: the doc says {got!r}, the records {want!r}")
        return problems
    if spec.get("rows"):
        unknown = [label for label in labels if label not in spec["rows"]]
        problems += [f"row {label}: not a row this script knows" for label in unknown]
        methods = {label: spec["rows"][label] for label in labels if label in spec["rows"]}
    else:
        known = set(ruler_cells(spec["records"], spec["context"]))
        methods = {}
        for label in labels:
            hits = [m for m in known if f"`{short_label(m)}`" == label]
            if len(hits) != 1:
                problems.append(f"row {label}: {len(hits)} recorded methods carry this label")
            else:
                methods[label] = hits[0]
    contexts = sorted({spec["context"]} | {int(m.group(1)) * 1024 for c in header
                                              for m in [re.search(r"\b(\d+)k\b", c)] if m})
    left_out = spec.get("left_out", {})
    by_ctx = {c: RulerTable(spec["records"], c, [m for m in methods.values() if m not in left_out.get(c, ())],
                            spec.get("seeds"))
              for c in contexts}
    for row in body:
        method = methods.get(row[0])
        if method is None:
            continue
        rows = {c: None if method in left_out.get(c, ()) else t.row(method) for c, t in by_ctx.items()}
        for col, got in zip(header[1:], row[1:]):
            want = ruler_cell(col, rows[spec["context"]], rows, method)
            if want is not None and want != got:
                problems.append(f"row {row[0]}, column {col!r}: the doc says {got!r}, the records {want!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs")
    args = ap.parse_args(argv)
    problems = check(args.readme, args.docs)
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} cell(s) differ from the records")
        return 1
    print(f"{len(TABLES)} tables equal to their records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
