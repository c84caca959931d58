"""Which committed profiles were calibrated on text that a committed evaluation prompt also holds.

    .venv/bin/python benchmarks/calibration_overlap.py --json benchmarks/results/calibration-overlap.json

Until the corpus split, `kvshrink calibrate` read its windows from the pydoc corpus's first 80%
(`eval.corpus.legacy_calibration_text()`), and the RULER-style essay haystack (anywhere in that corpus) and the
passkey filler (from its first half on) draw from the same corpus. For every committed tada profile this rebuilds
its calibration windows (the model's tokenizer, the samples / context / scored / seed its record names, the legacy
text), rebuilds every committed record's prompt that holds corpus prose (the five essay-haystack RULER tasks and
passkey, at each recorded context and seed, for the profile's model), and reports the prompts that share a passage
of at least 64 characters (whitespace collapsed) with a window. Only the tokenizers are loaded, from
`--tokenizer NAME=DIR` or the model's resolved directory. The ppl / kl / match, chat20 and benchmark prompts come
from the held-out last 20% and cannot overlap.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from kvshrink.calibrate import calibration_windows
from kvshrink.eval.corpus import legacy_calibration_text
from kvshrink.eval.passkey import passkey_prompt
from kvshrink.eval.ruler import ruler_sample

ROOT = Path(__file__).resolve().parent.parent
ESSAY_TASKS = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery")
PASSAGE = 64
PROFILE_GLOBS = ("benchmarks/profiles/*.json", "src/kvshrink/profiles/*.json", "benchmarks/results/profile-*.json")


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def shared_chars(window: str, prompt: str) -> int:
    """Characters of `window` (collapsed) covered by PASSAGE-character pieces, at a step of PASSAGE / 2, that occur
    in `prompt` (collapsed): 0 when they share no run of 2 x PASSAGE characters."""
    covered = set()
    for i in range(0, max(len(window) - PASSAGE, 0) + 1, PASSAGE // 2):
        if window[i:i + PASSAGE] in prompt:
            covered.update(range(i, i + PASSAGE))
    return len(covered)


def model_of(profile_path: Path) -> str:
    name = profile_path.name
    return "qwen2.5-coder-1.5b" if name.startswith("qwen2.5-coder-1.5b") else "smollm2-135m"


def evaluation_prompts(model: str) -> dict[tuple, int | None]:
    """(task, context, seed, depth) -> the prompt's token count where a record gives it, for the committed records
    of `model` whose prompts hold corpus prose."""
    cells: dict[tuple, int | None] = {}
    for path in sorted((ROOT / "benchmarks/results").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("model") != model or "task" not in r:  # not an evaluation record (e.g. a generation's memory)
                continue
            if r["task"] in ESSAY_TASKS:
                cells[(r["task"], r["context"], r["seed"], None)] = r["metrics"].get("prompt_tokens")
            elif r["task"] == "passkey":
                for d in r["settings"].get("depths", (0.1, 0.5, 0.9)):
                    cells.setdefault(("passkey", r["context"], r["seed"], d), None)
    return dict(sorted(cells.items(), key=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", action="append", default=[], metavar="MODEL=DIR",
                    help="where a model's tokenizer is (default: the model's resolved directory)")
    ap.add_argument("--json", type=Path, help="write the findings here")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from kvshrink.models import resolve_model

    dirs = dict(item.split("=", 1) for item in args.tokenizer)
    profiles = defaultdict(list)  # (model, samples, context, scored, seed) -> profile paths
    for pattern in PROFILE_GLOBS:
        for path in sorted(ROOT.glob(pattern)):
            cal = json.loads(path.read_text())["calibration"]
            if cal.get("text_sha256"):
                continue  # calibrated after the split: its text is recorded
            key = (model_of(path), cal["samples"], cal["context"], cal["scored"], cal["seed"])
            profiles[key].append(str(path.relative_to(ROOT)))
    findings = []
    for (model, samples, context, scored, seed), paths in profiles.items():
        tok = AutoTokenizer.from_pretrained(dirs.get(model) or resolve_model(model))
        ids = tok(legacy_calibration_text(), return_tensors="pt", add_special_tokens=False).input_ids
        windows = [flat(tok.decode(c[0].tolist() + s[0].tolist()))
                   for c, s in calibration_windows(ids, samples, context, scored, seed)]
        overlaps = []
        prompts = evaluation_prompts(model)
        for (task, ctx, s, depth), recorded in prompts.items():
            if task == "passkey":
                text = tok.decode(passkey_prompt(tok, ctx, depth, s).input_ids[0])
            else:
                sample = ruler_sample(task, tok, ctx, s)
                if recorded is not None and sample.prompt_tokens != recorded:
                    raise SystemExit(f"{task} at {ctx}, seed {s}: {sample.prompt_tokens} prompt tokens, the record "
                                     f"says {recorded}: not the prompt the record was measured on")
                text = sample.text
            text = flat(text)
            shared = [shared_chars(w, text) for w in windows]
            if any(shared):
                overlaps.append({"task": task, "context": ctx, "seed": s, "depth": depth,
                                 "shared_chars_per_window": shared})
        findings.append({"model": model, "samples": samples, "context": context, "scored": scored, "seed": seed,
                         "window_chars": [len(w) for w in windows], "profiles": paths,
                         "prompts_checked": len(prompts), "overlapping_prompts": overlaps})
        print(f"{model}: windows {samples} x ({context} + {scored}) tokens, seed {seed}; "
              f"{len(prompts)} committed prompts checked, {len(overlaps)} share text with them")
        for o in overlaps:
            print(f"  {o['task']} at {o['context']}, seed {o['seed']}"
                  + (f", depth {o['depth']}" if o["depth"] is not None else "")
                  + f": {o['shared_chars_per_window']} characters shared per window")
        print("  profiles: " + ", ".join(paths))
    if args.json:
        args.json.write_text(json.dumps({"passage_chars": PASSAGE, "findings": findings}, indent=1) + "\n")
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()
