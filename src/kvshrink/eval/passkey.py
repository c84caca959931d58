"""Passkey retrieval: a number hidden at a chosen depth in filler prose, asked for at the end."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .corpus import evaluation_text

QUESTION = "What is the pass key? Answer with the number only."


@dataclass
class PasskeyPrompt:
    input_ids: torch.Tensor  # [1, T]
    passkey: str
    depth: float
    seed: int

    def is_correct(self, answer: str) -> bool:
        return self.passkey in answer


def passkey_prompt(tokenizer, context_tokens: int = 2000, depth: float = 0.5, seed: int = 0) -> PasskeyPrompt:
    """A chat prompt of about `context_tokens` tokens with a 5-digit pass key at `depth` (0 = start, 1 = end)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if context_tokens < 64:
        raise ValueError(f"context_tokens must be at least 64, got {context_tokens}")
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = f"\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
    text = evaluation_text()
    filler_ids = tokenizer(text[rng.randint(0, len(text) // 2):][:context_tokens * 8], add_special_tokens=False).input_ids
    budget = context_tokens - len(tokenizer(needle + QUESTION, add_special_tokens=False).input_ids) - 16
    filler_ids = filler_ids[:max(budget, 0)]
    cut = int(len(filler_ids) * depth)
    before = tokenizer.decode(filler_ids[:cut])
    after = tokenizer.decode(filler_ids[cut:])
    content = f"{before}{needle}{after}\n\n{QUESTION}"
    messages = [{"role": "user", "content": content}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return PasskeyPrompt(ids["input_ids"], key, depth, seed)
