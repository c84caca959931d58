"""A multi-turn conversation benchmark (KV-Direct's 20-turn experiment), generated offline.

User turns come from templates over the embedded corpus (a passage and an instruction). The reference replies are
the model's own greedy replies with the uncompressed cache. Each method then replays the same conversation with its
own cache: at every turn the user's message is fed to the cache, the method's reply is generated greedily and
compared token by token with the reference reply, and then the reference reply is fed (teacher forcing), so every
method sees the same conversation. Per turn it records the cache's bytes, the process's peak resident memory during
the turn (the kernel's high-water mark, see `kvshrink.eval.memory`; also above the process's resident memory before
the conversation, which is what the cache and its working memory add), the token match and the time per decoding step.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..models import last_logits_only
from .corpus import heldout_text
from .memory import PeakMemory, rss, trim

INSTRUCTIONS = (
    "Summarize this passage in one sentence.",
    "What is the main topic of this passage?",
    "Name two technical terms used in this passage.",
    "Rewrite the first sentence of this passage in simpler words.",
    "Is this passage about syntax or about behaviour? Answer briefly.",
    "What would a beginner find hardest in this passage?",
    "Give one example related to this passage.",
    "Which Python feature does this passage describe?",
)


@dataclass
class Conversation:
    user_turns: list[str]
    seed: int


def make_conversation(turns: int = 20, passage_chars: int = 400, seed: int = 0) -> Conversation:
    """`turns` user messages: a passage of the embedded corpus's held-out part and an instruction each."""
    if turns < 1 or passage_chars < 20:
        raise ValueError(f"turns must be >= 1 and passage_chars >= 20, got {turns} and {passage_chars}")
    text = heldout_text()
    rng = random.Random(f"conversation:{seed}")
    out = []
    for i in range(turns):
        start = rng.randrange(0, len(text) - passage_chars)
        start = text.find(" ", start) + 1
        passage = text[start:start + passage_chars].rsplit(" ", 1)[0]
        out.append(f"Passage {i + 1}:\n{passage}\n\n{rng.choice(INSTRUCTIONS)}")
    return Conversation(out, seed)


PLAIN_USER = "User: "
PLAIN_ASSISTANT = "\nAssistant:"


def turn_format(tokenizer) -> str:
    """How user turns are written: `chat template` (the tokenizer's own), or `plain transcript` for a base model
    whose tokenizer has none (Gemma 3 270M as shipped here): "User: ...\nAssistant:" turns, a BOS first."""
    return "chat template" if getattr(tokenizer, "chat_template", None) else "plain transcript"


def _turn_ids(tokenizer, message: str, first: bool) -> torch.Tensor:
    """The formatted user turn plus the assistant header (with the system prompt / BOS on the first turn only)."""
    if turn_format(tokenizer) == "plain transcript":
        text = ("" if first else "\n\n") + PLAIN_USER + message + PLAIN_ASSISTANT
        return tokenizer(text, return_tensors="pt", add_special_tokens=first).input_ids
    msgs = [{"role": "user", "content": message}]
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    if not first:  # later turns continue the conversation: drop a leading system prompt / BOS the template adds
        marker = text.rfind(message)
        head = text[:marker]
        user_start = head.rfind("<|im_start|>user") if "<|im_start|>user" in head else \
            head.rfind("<start_of_turn>user") if "<start_of_turn>user" in head else 0
        text = text[user_start:]
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


@torch.no_grad()
def play(model, tokenizer, cache, conversation: Conversation, reference: list[list[int]] | None = None,
         max_reply: int = 48, stop_ids: tuple[int, ...] = ()) -> tuple[list[list[int]], list[dict[str, Any]]]:
    """Run the conversation through `cache`: (replies, one record per turn).

    Without `reference` the replies are generated greedily (how the reference itself is made, with `full`). With
    it, each turn is teacher-forced: the reference reply is fed one token per decoding step, and `match` is the
    share of steps where the method's greedy choice equals the reference's token, so every method sees the same
    conversation whatever it would have said."""
    device = model.device
    last_only = last_logits_only(model)
    stop = set(stop_ids)
    replies, records = [], []
    trim()
    start_rss = rss()  # the process before the conversation: what each turn's peak is measured above
    for i, message in enumerate(conversation.user_turns):
        ids = _turn_ids(tokenizer, message, first=(i == 0))
        hits = 0
        with PeakMemory() as peak:
            start = time.perf_counter()
            # only the last position's logits, as generate() does: the whole turn's logits (151 tokens x 262k
            # vocabulary = 158 MB on Gemma 3) would otherwise set the peak that this benchmark attributes to the cache
            logits = model(ids.to(device), past_key_values=cache, use_cache=True, **last_only).logits[:, -1]
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            reply: list[int] = []
            while True:
                choice = int(logits.argmax(-1))
                token = choice if reference is None else reference[i][len(reply)]
                hits += choice == token
                reply.append(token)
                logits = model(torch.tensor([[token]], device=device), past_key_values=cache,
                               use_cache=True).logits[:, -1]  # the reply's every token enters the cache
                done = len(reply) == (max_reply if reference is None else len(reference[i]))
                if done or (reference is None and token in stop):
                    break
            decode = time.perf_counter() - start
        report = cache.memory_report() if hasattr(cache, "memory_report") else None
        records.append({
            "turn": i + 1, "prompt_tokens": int(ids.shape[1]), "reply_tokens": len(reply),
            "prefill_seconds": round(prefill, 4), "seconds_per_step": round(decode / len(reply), 5),
            "peak_rss": peak.peak, "peak_above_start": peak.peak - start_rss, "tokens": cache.get_seq_length(),
            "cache_bytes": report["nbytes"] if report else sum(
                t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)),
            "match": hits / len(reply)})
        replies.append(reply)
    return replies, records
