"""Bytes and greedy tokens of every method spec, recorded so that a change to the storage code can be checked
against what the specs gave before it (issue 24: "existing specs keep their bytes and tokens exactly").

    python benchmarks/spec_baseline.py --model tiny -o tests/data/spec-baseline-tiny.json
    python benchmarks/spec_baseline.py --model smollm2-135m -o tests/data/spec-baseline-smollm2.json
    python benchmarks/spec_baseline.py --model qwen2.5-coder-1.5b --context 4096 \
        -o benchmarks/results/spec-baseline-qwen-4k.json
    python benchmarks/spec_baseline.py --check tests/data/spec-baseline-smollm2.json   # compare, exit 1 on a change

Each record: the spec, the prompt length, the cache's total bytes, its bytes by part, the tokens it reports, and
the greedy token ids of `new` generated tokens. The low-rank methods get bases fitted on the model itself (a fixed
window of the embedded corpus), so no profile file is needed. Records are written after each spec (a stopped run
resumes); `--check` rebuilds every recorded spec and prints each difference.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

#: every family and the options that change how bytes are stored; "{bases}" is a fitted low-rank profile
SPECS = [
    "full",
    "kivi:bits=2", "kivi:bits=3", "kivi:bits=4", "kivi:bits=8", "kivi:bits=16", "kivi:bits=2,kernel=torch",
    "kivi:bits=2,key_axis=token,group=16", "kivi:bits=4,exact_dtype=float16",
    "tada:bits=2", "tada:bits=2,mean=channel", "tada:bits=3,rotate=both,mean=none", "tada:bits=2,kernel=torch",
    "turboquant", "turboquant:bits=3", "turboquant:preset=turboquant_k8v4", "turboquant:quantizer=uniform,bits=4",
    "turboquant:attention=decode",
    "streamingllm:budget=0.25", "window:budget=0.25", "h2o:budget=0.25", "h2o:budget=0.25,score=normalized",
    "snapkv:budget=0.25", "tova:budget=0.25",
    "mixed:budget=0.3", "mixed:budget=0.3,codec=rotated", "mixed:budget=0.3,policy=snapkv,mean=channel",
    "lowrank:profile={bases},rank=8,bits=4", "tale:profile={bases},target_ratio=0.3",
    "dynakv:profile={dynakv},target_ratio=0.3,keep=0.5",
    "kvdirect", "kvdirect:scheme=token,window=16",
]
SMOLLM2_ONLY = ["tada:profile=smollm2-135m-tada-0.27"]
QWEN_ONLY = ["tada:profile=benchmarks/profiles/qwen2.5-coder-1.5b-tada-rotate-0.20.json",
             "tada:profile=benchmarks/profiles/qwen2.5-coder-1.5b-tada-0.27.json"]


def tiny_model():
    """A 2-layer random-weight Llama like the test suite's (tests/conftest.py) with head dim 32, so every default
    group (32 channels) and rotation fits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                      initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=95)
    return LlamaForCausalLM(cfg).eval()


def load(model_name: str, context: int):
    """(model, prompt ids [1, T], calibration ids [1, N])."""
    import kvshrink as ks
    from kvshrink.eval.corpus import pydoc_text, split
    from kvshrink.eval.passkey import passkey_prompt

    if model_name == "tiny":
        model = tiny_model()
        g = torch.Generator().manual_seed(1)
        return model, torch.randint(2, 95, (1, context), generator=g), torch.randint(2, 95, (1, 600), generator=g)
    model, tok = ks.load_model(model_name)
    ids = passkey_prompt(tok, context, depth=0.5, seed=0).input_ids
    cal = tok(split(pydoc_text())[0][:20000], return_tensors="pt").input_ids
    return model, ids, cal


def bases_files(model, cal: torch.Tensor, folder: Path) -> dict[str, str]:
    from kvshrink.bases import bases_profile

    out = {}
    for key, method in (("bases", "tale"), ("dynakv", "dynakv")):
        prof = bases_profile(model, cal, method=method, samples=1, context=min(512, cal.shape[1]), progress=False)
        path = folder / f"{method}.json"
        prof.save(path)
        out[key] = str(path)
    return out


def measure(model, ids: torch.Tensor, spec: str, new: int) -> dict:
    import kvshrink as ks

    cache = ks.make_cache(model, spec)
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=0)
    report = cache.memory_report()
    return {"nbytes": report["nbytes"], "fp16_nbytes": report["fp16_nbytes"], "tokens": report["tokens"],
            "by_part": {k: v for k, v in report["by_part"].items() if v}, "ids": out[0, ids.shape[1]:].tolist()}


def specs_for(model_name: str) -> list[str]:
    extra = SMOLLM2_ONLY if model_name == "smollm2-135m" else QWEN_ONLY if model_name.startswith("qwen") else []
    return SPECS + extra


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--context", type=int, default=600)
    ap.add_argument("--new", type=int, default=12)
    ap.add_argument("-o", "--output")
    ap.add_argument("--check", help="a record file: rebuild its specs and compare (exit 1 on any difference)")
    ap.add_argument("--only", help="comma-free substring: only specs containing it")
    ap.add_argument("--skip", action="append", default=[], help="skip the specs containing this substring")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.check:
        old = json.loads(Path(args.check).read_text())
        args.model, args.context, args.new = old["model"], old.get("request", old["context"]), old["new"]
    model, ids, cal = load(args.model, args.context)
    with tempfile.TemporaryDirectory() as tmp:
        files = bases_files(model, cal, Path(tmp))
        if args.check:
            bad = 0
            for spec, want in old["records"].items():
                if (args.only and args.only not in spec) or any(x in spec for x in args.skip):
                    continue
                got = measure(model, ids, spec.format(**files), args.new)
                diff = {k: (want[k], got[k]) for k in ("nbytes", "tokens", "ids") if want[k] != got[k]}
                print(f"{'ok  ' if not diff else 'DIFF'} {spec} {diff if diff else ''}", flush=True)
                bad += bool(diff)
            print(f"{bad} of {len(old['records'])} specs differ")
            return 1 if bad else 0
        out = Path(args.output)
        data = json.loads(out.read_text()) if out.exists() else {
            "model": args.model, "request": args.context, "context": int(ids.shape[1]), "new": args.new, "records": {}}
        for spec in specs_for(args.model):
            if spec in data["records"] or (args.only and args.only not in spec):
                continue
            start = time.perf_counter()
            data["records"][spec] = measure(model, ids, spec.format(**files), args.new)
            write(out, data)
            print(f"{spec}: {data['records'][spec]['nbytes']} bytes, {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
