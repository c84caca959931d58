"""Write the exact inputs kvshrink's eval uses (held-out text samples and passkey prompts) for the kvpress run.

Run with kvshrink's own environment: .venv/bin/python benchmarks/peers/kvpress/make_inputs.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import kvshrink as ks
from kvshrink.eval.corpus import pydoc_text, split
from kvshrink.eval.passkey import passkey_prompt
from kvshrink.eval.runner import Env
from kvshrink.io import atomic_write_text

CONTEXTS, SEEDS, DEPTHS, CONTINUATION = (2048, 4096), (0,), (0.1, 0.5, 0.9), 64


def main(out: str) -> None:
    model, tok = ks.load_model()
    env = Env(model, tok, split(pydoc_text())[1], continuation=CONTINUATION)
    samples, prompts = [], []
    for context in CONTEXTS:
        for seed in SEEDS:
            ctx, cont = env.text_sample(context, seed)
            samples.append({"context": context, "seed": seed, "context_ids": ctx[0].tolist(),
                            "continuation_ids": cont[0].tolist()})
            for depth in DEPTHS:
                p = passkey_prompt(tok, context, depth, seed)
                prompts.append({"context": context, "seed": seed, "depth": depth, "passkey": p.passkey,
                                "input_ids": p.input_ids[0].tolist()})
    atomic_write_text(out, json.dumps({"samples": samples, "passkey": prompts, "answer_tokens": env.answer_tokens}))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).with_name("inputs.json")))
