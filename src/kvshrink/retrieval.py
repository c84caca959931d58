"""Retrieval heads (RazorAttention, Tang et al. 2024), found training-free: feed random token ids repeated twice and
measure, per KV head, how much attention a query of the second copy pays to the earlier occurrence of its own token
("echo") and to the token that followed it ("induction"). Heads that score high carry long-range retrieval and keep
every token under `razor`; the others keep sinks, a window and a compensation token.

The scores are measured once per model and saved in a profile (method "razor"; the model's fingerprint; per layer
and KV head the echo and induction scores, each the mean over the query heads sharing the KV head, over the second
copy's queries and over the samples). `make_cache(model, profile=PATH)` builds `razor` from it.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .profile import Profile, ProfileError, fingerprint
from .models import text_config

METHOD = "razor"


def _random_ids(vocab: int, n: int, avoid: set[int], generator: torch.Generator) -> torch.Tensor:
    """`n` token ids drawn uniformly from the vocabulary, special ids excluded."""
    allowed = torch.tensor([i for i in range(vocab) if i not in avoid])
    return allowed[torch.randint(len(allowed), (n,), generator=generator)]


def head_scores(model: Any, *, length: int = 256, samples: int = 4, seed: int = 0,
                progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(echo, induction) scores [layers, KV heads] of `model` on `samples` sequences of `length` random ids repeated
    twice (after the BOS token when the model has one); attention read from the eager implementation."""
    from tqdm.auto import tqdm

    from .distributed import refuse_sharded

    if length < 2 or samples < 1:
        raise ValueError(f"retrieval head scores need length >= 2 and samples >= 1, got {length} and {samples}")
    refuse_sharded(model, "measuring retrieval heads")
    text = text_config(model)
    kv, hq = text.num_key_value_heads, text.num_attention_heads
    special = {getattr(text, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    special = {int(i) for s in special if s is not None for i in (s if isinstance(s, (list, tuple)) else [s])}
    bos = getattr(text, "bos_token_id", None)
    head = [int(bos)] if isinstance(bos, int) else []
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    echo = torch.zeros(text.num_hidden_layers, kv, dtype=torch.float64)
    induction = torch.zeros_like(echo)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        for _ in tqdm(range(samples), desc="retrieval heads", unit="sample", disable=not progress):
            r = _random_ids(text.vocab_size, length, special, gen)
            ids = torch.cat([torch.tensor(head, dtype=torch.long), r, r])[None].to(device)
            start = len(head) + length  # the second copy's first position
            q = torch.arange(start, start + length, device=device)
            with torch.no_grad():
                attn = model(ids, output_attentions=True, use_cache=False).attentions
            for layer, a in enumerate(attn):  # [1, Hq, T, T]
                a = a[0].float()
                e = a[:, q, q - length].mean(-1)  # [Hq]: to the earlier occurrence of the query's own token
                i = a[:, q[:-1], q[:-1] - length + 1].mean(-1)  # to the token that followed it
                echo[layer] += e.reshape(kv, hq // kv).mean(-1).double().cpu()
                induction[layer] += i.reshape(kv, hq // kv).mean(-1).double().cpu()
    finally:
        model.set_attn_implementation(previous)
    return (echo / samples).float(), (induction / samples).float()


def retrieval_profile(model: Any, *, length: int = 256, samples: int = 4, seed: int = 0,
                      progress: bool = True) -> Profile:
    """A `razor` profile of `model`: its per-head echo and induction scores (`head_scores`)."""
    echo, induction = head_scores(model, length=length, samples=samples, seed=seed, progress=progress)
    return Profile(fingerprint(model), METHOD, {}, [], None,
                   {"echo": echo.tolist(), "induction": induction.tolist(), "length": length, "samples": samples,
                    "seed": seed})


def scores_of(profile: Profile, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(echo, induction) [layers, KV heads] of a razor profile, checked against its model's shape."""
    if profile.method != METHOD:
        raise ProfileError(f"{where}: a {profile.method!r} profile, not a retrieval-head ({METHOD!r}) one: make it "
                           "with `kvshrink calibrate --method razor`")
    shape = (profile.model.get("layers"), profile.model.get("kv_heads"))
    out = []
    for name in ("echo", "induction"):
        try:
            t = torch.tensor(profile.calibration[name], dtype=torch.float32)
        except (KeyError, TypeError, ValueError):
            raise ProfileError(f"{where}: calibration.{name} is missing or not a table of numbers") from None
        if tuple(t.shape) != shape or not torch.isfinite(t).all():
            raise ProfileError(f"{where}: calibration.{name} must be finite, [layers, kv_heads] = {list(shape)}, "
                               f"got shape {list(t.shape)}")
        out.append(t)
    return out[0], out[1]


def retrieval_heads(echo: torch.Tensor, induction: torch.Tensor, share: float,
                    layers: list[int] | None = None) -> set[tuple[int, int]]:
    """The (layer, KV head) pairs with the highest echo + induction score: `share` of the heads of `layers` (all
    layers by default), rounded up; ties go to the earlier layer and head."""
    if not 0 <= share <= 1:
        raise ValueError(f"share must be a fraction in [0, 1], got {share}")
    layers = list(range(echo.shape[0])) if layers is None else layers
    pairs = [(layer, h) for layer in layers for h in range(echo.shape[1])]
    if not pairs:
        return set()
    combined = torch.stack([echo[layer, h] + induction[layer, h] for layer, h in pairs])
    n = math.ceil(share * len(pairs) - 1e-9)
    order = torch.sort(combined, descending=True, stable=True).indices[:n].tolist()
    return {pairs[i] for i in order}
