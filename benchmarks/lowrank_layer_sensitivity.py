"""Why `tale`/`dynakv` break Qwen2 without `exact_layers`: per layer, how far coding the keys' low-rank coefficients
moves the attention of the model's own queries.

One window of held-out text is prefilled with the uncompressed cache; the queries of its last `--queries` positions
are captured. For each chosen layer, the keys are projected onto the fitted per-head basis (`kvshrink calibrate
--method tale`), kept at `--rank` coefficients and coded by the `LevelStore` the cache itself uses (4 and 8 bits, with
and without `mean=channel`, with per-token codes; and 2, 4 and 8 bits with per-channel codes, `coeff_axis=channel`:
a scale per coefficient over `--coeff-group` tokens, the last partial group exact as the cache keeps it), rebuilt,
and scored by those queries. Printed: KL(exact || coded) of the attention distributions, averaged over query heads
and positions, in nats; "fp16" keeps the coefficients unquantized, so it shows the rank cut alone. Every token is
coded, the first ones too (the cache keeps `sinks` exact), so a per-channel group holding token 0 is included.

    .venv/bin/kvshrink calibrate --model qwen2.5-coder-1.5b --method tale --context 4096 --samples 3 \
        -o benchmarks/results/bases-qwen-tale-4k.json
    .venv/bin/python benchmarks/lowrank_layer_sensitivity.py --bases benchmarks/results/bases-qwen-tale-4k.json \
        --json benchmarks/results/lowrank-layer-sensitivity-qwen.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvshrink.bases import layer_bases
from kvshrink.codecs.lowrank import Level, LevelStore
from kvshrink.eval.corpus import pydoc_text, split
from kvshrink.models import load_model
from kvshrink.profile import load_profile

_QUERIES: dict[int, torch.Tensor] = {}


def _capture(module, query, key, value, attention_mask, **kw):
    _QUERIES[module.layer_idx] = query.detach()
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)


def coded_keys(keys: torch.Tensor, basis: torch.Tensor, sigma: torch.Tensor, rank: int, bits: int,
               center: str, axis: str = "token", coeff_group: int = 32) -> torch.Tensor:
    """Keys [H, T, d] rebuilt from `rank` coefficients coded at `bits` by the cache's own LevelStore."""
    c = (keys @ basis[..., :rank]) / sigma[:, None, :rank]  # normalised coefficients, as the latent layer stores
    store = LevelStore((Level(rank, bits),), rank, "keys", center, axis, coeff_group)
    lmap = torch.zeros(1, keys.shape[0], keys.shape[1], dtype=torch.uint8)
    store.append(c[None], lmap)
    return store.reconstruct(lmap, basis[..., :rank], sigma[..., :rank])[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--bases", required=True, help="per-head bases (kvshrink calibrate --method tale)")
    ap.add_argument("--layers", default="0,1,2,5,14,27")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--coeff-group", type=int, default=32, help="tokens per scale of the per-channel codes")
    ap.add_argument("--json", type=Path, help="also write the table here, as the record behind the docs' figures")
    args = ap.parse_args()
    AttentionInterface.register("capture_queries", _capture)
    model, tok = load_model(args.model)
    model.set_attn_implementation("capture_queries")
    ids = tok(split(pydoc_text())[1], return_tensors="pt").input_ids[:, 5000:5000 + args.context]
    profile = load_profile(args.bases)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    cfg = model.config
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    scale = getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads) ** -0.5
    n, t = args.queries, ids.shape[1]
    mask = torch.ones(n, t, dtype=torch.bool).tril(t - n)
    settings = [("fp16", 16, "none", "token"), ("8 bits", 8, "none", "token"), ("8 bits, mean", 8, "channel", "token"),
                ("4 bits", 4, "none", "token"), ("4 bits, mean", 4, "channel", "token"),
                ("8 bits, per-channel", 8, "none", "channel"), ("4 bits, per-channel", 4, "none", "channel"),
                ("2 bits, per-channel", 2, "none", "channel")]
    print(f"{args.model}: KL(exact || coded keys) of the attention of the last {n} of {t} queries, rank {args.rank}")
    print("| layer | " + " | ".join(s[0] for s in settings) + " |")
    print("|---" * (len(settings) + 1) + "|")
    record = {"model": args.model, "bases": args.bases, "context": t, "queries": n, "rank": args.rank,
              "coeff_group": args.coeff_group, "layers": args.layers, "settings": [s[0] for s in settings],
              "kl_by_layer": {}}
    for i in (int(x) for x in args.layers.split(",")):
        kb, ks, _, _ = layer_bases(profile, i, False, args.bases)
        keys = cache.layers[i].keys[0].float()
        q = _QUERIES[i][0, :, -n:].float().reshape(keys.shape[0], groups, n, -1)

        def logp(k: torch.Tensor) -> torch.Tensor:
            s = torch.einsum("hgqd,htd->hgqt", q, k) * scale
            return s.masked_fill(~mask, float("-inf")).log_softmax(-1)

        ref = logp(keys)
        row = []
        for _, bits, center, axis in settings:
            got = logp(coded_keys(keys, kb, ks, args.rank, bits, center, axis, args.coeff_group))
            row.append((ref.exp() * (ref - got)).nan_to_num().sum(-1).mean().item())
        print(f"| {i} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
        record["kl_by_layer"][str(i)] = row
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
