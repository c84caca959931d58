"""Running a model through a cache the way generation does: prefill the context, then one token per step.

Every quality metric is computed here, so no metric can see keys or values the cache would not have given to
`generate()`: the context is prefilled (attending in full precision, then stored as the method stores it) and each
continuation token is a decoding step over the stored past.
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers.cache_utils import Cache

from ..models import last_logits_only


@torch.no_grad()
def score_continuation(model, cache: Cache, context: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [T, vocab] (float32) predicting each of the T continuation tokens, through `cache`.

    context: [1, N] token ids prefilled in one forward pass. continuation: [1, T] ids fed one step at a time (the
    first is predicted from the prefill's last position, the last one is fed to no step).
    """
    _check_ids(context, "context")
    _check_ids(continuation, "continuation")
    device = model.device
    out = model(context.to(device), past_key_values=cache, use_cache=True, **last_logits_only(model))
    rows = [out.logits[:, -1].float().log_softmax(-1)]
    for i in range(continuation.shape[1] - 1):
        out = model(continuation[:, i:i + 1].to(device), past_key_values=cache, use_cache=True)
        rows.append(out.logits[:, -1].float().log_softmax(-1))
    return torch.cat(rows, 0).cpu()


@torch.no_grad()
def continue_scores(model, cache: Cache, first_logits: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """As `score_continuation` for a cache already holding the context, whose prefill gave `first_logits` [1, V]."""
    _check_ids(continuation, "continuation")
    device = model.device
    rows = [first_logits.float().log_softmax(-1)]
    for i in range(continuation.shape[1] - 1):
        out = model(continuation[:, i:i + 1].to(device), past_key_values=cache, use_cache=True)
        rows.append(out.logits[:, -1].float().log_softmax(-1))
    return torch.cat(rows, 0).cpu()


@torch.no_grad()
def continue_greedy(model, cache: Cache, first_logits: torch.Tensor, n: int,
                    stop_ids: Sequence[int] = ()) -> torch.Tensor:
    """Greedy tokens after a prefilled context (whose prefill gave `first_logits` [1, V]), as `generate()` picks
    them: at most n, ending early after a token of `stop_ids` (which is kept)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    stop = set(int(t) for t in stop_ids)
    token = first_logits.argmax(-1, keepdim=True)  # [1, 1]
    out = [int(token)]
    while len(out) < n and out[-1] not in stop:
        logits = model(token.to(model.device), past_key_values=cache, use_cache=True).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        out.append(int(token))
    return torch.tensor(out, dtype=torch.long)


def stop_tokens(model, tokenizer) -> list[int]:
    """End-of-sequence ids of a model: its generation config's and its tokenizer's."""
    ids = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                   getattr(tokenizer, "eos_token_id", None)):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else source)
    return sorted(ids)


@torch.no_grad()
def score_continuation_chunked(model, cache: Cache, context: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """As `score_continuation`, but the continuation is one forward pass after the prefill (a faster proxy).

    The continuation attends to the stored past exactly as decoding steps would, and to itself in full precision;
    it differs from step-by-step decoding only in when the exact window is flushed. Used by calibration, where
    hundreds of allocations are compared; evaluation always decodes step by step.
    """
    _check_ids(context, "context")
    _check_ids(continuation, "continuation")
    out = model(context.to(model.device), past_key_values=cache, use_cache=True, **last_logits_only(model))
    return score_continuation_after(model, cache, out.logits[:, -1], continuation)


@torch.no_grad()
def score_continuation_after(model, cache: Cache, first_logits: torch.Tensor,
                             continuation: torch.Tensor) -> torch.Tensor:
    """The chunked scoring of `continuation` [1, M] after a context already in `cache`, whose prefill gave
    `first_logits` [1, V] (run here, or replayed from a recorded prefill): log-probabilities [M, V]."""
    _check_ids(continuation, "continuation")
    first = first_logits[:, None].float()
    if continuation.shape[1] == 1:
        return first[0].log_softmax(-1).cpu()
    out = model(continuation[:, :-1].to(model.device), past_key_values=cache, use_cache=True)
    return torch.cat([first, out.logits.float()], 1)[0].log_softmax(-1).cpu()


@torch.no_grad()
def greedy(model, cache: Cache, context: torch.Tensor, n: int, pad_token_id: int | None = None) -> torch.Tensor:
    """The n greedy tokens `generate()` produces after `context` [1, N] with `cache` (exactly n: no early stop)."""
    _check_ids(context, "context")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out = model.generate(context.to(model.device), past_key_values=cache, max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=pad_token_id)
    return out[0, context.shape[1]:].cpu()


def _check_ids(ids: torch.Tensor, name: str) -> None:
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ValueError(f"{name} must be token ids shaped [1, length >= 1], got {tuple(ids.shape)}")
