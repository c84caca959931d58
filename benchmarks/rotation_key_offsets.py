"""How far each layer's keys sit from the origin, and what a rotated Lloyd-Max code does to them.

    .venv/bin/python benchmarks/rotation_key_offsets.py --model qwen2.5-coder-1.5b --layers 0,1,2,14,26,27 --bits 3

Prefills the first `--tokens` tokens of the embedded corpus with `DynamicCache` and prints, per layer and KV head:
the norm of the keys' mean over the tokens against the mean norm of their token-to-token part (keys minus that
mean), and the mean error of the keys after the rotation codec itself (`RotationCodec` at `--bits`: seeded Hadamard
rotation, the fp16 norm kept, the direction Lloyd-Max coded with the norm corrected, as `turboquant` stores
them) relative to the same token-to-token part. An error near or above 1 means the code's noise is as large as
what tells the tokens apart: the code is spent on the offset.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvshrink.codecs.rotation import RotationCodec
from kvshrink.codecs.store import PagedStore
from kvshrink.eval.corpus import pydoc_text
from kvshrink.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--bits", type=int, default=3, choices=(2, 3, 4))
    ap.add_argument("--layers", default="0,1,2,14,26,27")
    ap.add_argument("--json", type=Path, help="also write the table here, as the record behind the docs' figures")
    args = ap.parse_args()
    from transformers import DynamicCache

    model, tok = load_model(args.model)
    ids = tok(pydoc_text()[: args.tokens * 8], return_tensors="pt").input_ids[:, : args.tokens]
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    print(f"{args.model}, {ids.shape[1]} tokens, {args.bits}-bit rotated codes")
    print("| layer | head | mean norm / token-to-token norm | code error / token-to-token norm |")
    print("|---|---|---|---|")
    record = {"model": args.model, "tokens": ids.shape[1], "bits": args.bits, "rows": []}
    for layer in (int(x) for x in args.layers.split(",")):
        k = cache.layers[layer].keys.float()[0]  # heads, tokens, head_dim
        spread = (k - k.mean(1, keepdim=True)).norm(dim=-1).mean(-1)
        offset = k.mean(1).norm(dim=-1) / spread
        store = PagedStore(RotationCodec(bits=args.bits, layer=layer), f"layer {layer} keys")  # turboquant's codes
        store.append(k[None])
        rec = store.decode(torch.float32)[0]
        error = (rec - k).norm(dim=-1).mean(-1) / spread
        for h in range(k.shape[0]):
            print(f"| {layer} | {h} | {offset[h]:.2f} | {error[h]:.3f} |")
            record["rows"].append({"layer": layer, "head": h, "offset": offset[h].item(), "error": error[h].item()})
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
