"""What appending a block to a store costs as the store grows: the paged store (kvshrink's) against a store that
grows by concatenation (what kvshrink's stores did before the paged storage), one layer's keys of Qwen2.5's
geometry (2 KV heads, head dim 128), 2-bit KIVI keys (per-channel groups of 32 tokens), blocks of 32 tokens.

    python benchmarks/store_appends.py --tokens 32768 -o benchmarks/results/store-appends.json

Per store size it records the median time of one append and the bytes of already-stored tokens each append copied
(the paged store counts them in `PagedStore.copied`; the concatenating store copies all of itself by definition:
`torch.cat` allocates the whole new store and copies the old one into it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from kvshrink.codecs import GroupCodec, PagedStore


class ConcatStore:
    """The old way: every growing field is one tensor, extended by `torch.cat` at every append."""

    def __init__(self, codec):
        self.codec, self.fields, self.copied, self.head_dim = codec, {}, 0, 0
        self.state, self.shard, self.encoder, self.cache = {}, None, None, {}

    def append(self, x):
        self.head_dim = x.shape[-1]
        new = self.codec.encode(x, self)
        for k, v in new.items():
            old = self.fields.get(k)
            if old is not None:
                self.copied += old.numel() * old.element_size()
            self.fields[k] = v if old is None else torch.cat([old, v], 2)


def run(stores: dict, tokens: int, block: int, every: int) -> dict[str, list[dict]]:
    """Append the same blocks to every store in turn (so that both see the same machine load), timing each append;
    per `every` tokens, the median of the last 16 appends and what the last one copied."""
    torch.manual_seed(0)
    rows: dict[str, list[dict]] = {name: [] for name in stores}
    times: dict[str, list[float]] = {name: [] for name in stores}
    x = torch.randn(1, 2, block, 128)
    for done in range(block, tokens + 1, block):
        for name, store in stores.items():
            before = store.copied
            start = time.perf_counter()
            store.append(x)
            times[name].append(time.perf_counter() - start)
            if done % every == 0:
                rows[name].append({"tokens": done, "append_us": round(1e6 * statistics.median(times[name][-16:]), 1),
                                   "copied_bytes": store.copied - before})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--every", type=int, default=4096)
    ap.add_argument("-o", "--output")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one thread: an append is small, and the timing is the storing, not a thread pool
    codec = GroupCodec(2, 32, "channel")
    rows = run({"paged": PagedStore(codec, "keys"), "concatenating": ConcatStore(codec)}, args.tokens, args.block,
               args.every)
    out = {"codec": "grouped:bits=2,group=32,axis=channel", "heads": 2, "head_dim": 128, "block": args.block,
           "torch_threads": 1, **rows}
    for a, b in zip(out["paged"], out["concatenating"]):
        print(f"{a['tokens']:6d} tokens: paged {a['append_us']:7.1f} us, copies {a['copied_bytes']:7d} B | "
              f"concatenating {b['append_us']:7.1f} us, copies {b['copied_bytes']:8d} B")
    if args.output:
        path = Path(args.output)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        os.replace(tmp, path)


if __name__ == "__main__":
    main()
