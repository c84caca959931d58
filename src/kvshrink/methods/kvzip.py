"""`kvzip`: KVzip (Kim et al. 2025) - the prompt compressed once, by what the model attends to while repeating it
(query-agnostic), with budgets from one ranking across layers. The pass costs about one more prefill
(`policies/kvzip.py`, docs/kvzip.md)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

from ..policies.kvzip import PROMPTS, install_hook
from .base import option, register
from .eviction import EvictionMethod


@functools.lru_cache(maxsize=8)
def _tokenizer_at(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@register
@dataclass
class KVzip(EvictionMethod):
    name = "kvzip"
    summary = ("compress the prompt by the attention of a pass that repeats it (query-agnostic, one ranking across "
               "layers: non-uniform layer budgets, and per-head ones with heads=adaptive); decoding keeps all; the "
               "pass costs about one more prefill (KVzip)")
    policy_name = "kvzip"

    prompt: str = option("repeat", "what the pass reads before the prompt's tokens: 'repeat' (the instruction "
                                   "'Repeat the previous context exactly.', tokenized by the model's tokenizer) or "
                                   "'none' (the tokens alone)")
    chunk: int = option(2048, "prompt tokens per forward of the reconstruction pass (bounds its memory)")
    ratio: float = option(0.0, "a byte budget too (0 = none): the ranking's best tokens are kept while the layers "
                               "hold at most this share of their 16-bit bytes for the prompt, everything counted "
                               "(codes, scales, positions, sinks, window), and at most `budget` of the tokens")

    #: the tokenizer of the repeat instruction; None: the one saved beside the model (its `name_or_path`)
    tokenizer: ClassVar[Any] = None

    def validate(self) -> None:
        super().validate()
        if self.prompt not in PROMPTS:
            raise ValueError(f"kvzip: prompt must be one of {', '.join(PROMPTS)}, got {self.prompt!r}")
        if self.chunk < 1:
            raise ValueError(f"kvzip: chunk must be >= 1 token, got {self.chunk}")
        if not 0 <= self.ratio < 1:
            raise ValueError(f"kvzip: ratio must be in [0, 1) (0: no byte budget), got {self.ratio}")

    def prepare(self, model_or_config: Any) -> None:
        if getattr(self, "_shard", None) is not None:
            raise ValueError("kvzip: tensor parallelism is not supported (the ranking across layers would need every "
                             "rank's scores)")
        super().prepare(model_or_config)
        self._instruction = None
        if hasattr(model_or_config, "register_forward_hook"):
            self._instruction = self._tokenize(model_or_config)
            install_hook(model_or_config)

    def _tokenize(self, model: Any) -> list[int]:
        text = PROMPTS[self.prompt]
        if not text:
            return []
        tok = self.tokenizer
        if tok is None:
            path = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
            try:
                tok = _tokenizer_at(str(path)) if path else None
            except (OSError, ValueError) as e:
                raise ValueError(f"kvzip: prompt={self.prompt} needs the model's tokenizer, and none loads from "
                                 f"{path!r} ({e}); set KVzip.tokenizer, or use prompt=none") from None
            if tok is None:
                raise ValueError(f"kvzip: prompt={self.prompt} needs the model's tokenizer, and the model names no "
                                 "path to load it from; set KVzip.tokenizer, or use prompt=none")
        ids = list(tok.encode(text, add_special_tokens=False))
        vocab = getattr(getattr(model.config, "get_text_config", lambda: model.config)(), "vocab_size", None)
        if vocab is not None and any(not 0 <= i < vocab for i in ids):
            raise ValueError(f"kvzip: the tokenizer gave ids outside the model's vocabulary ({vocab}): it is not "
                             "this model's tokenizer")
        return ids

    def scored_layer(self, *args: Any, **kwargs: Any):
        layer = super().scored_layer(*args, **kwargs)
        for x in getattr(layer, "heads", [layer]):  # heads=adaptive: one layer per KV head, each ranked globally
            x.defer_eviction = True  # held whole until the pass, then `policies.kvzip.reconstruct` evicts
        # a recorded prefill replays into it (the prefill is SDPA over the exact prompt), but only where the model is
        # at hand to run the pass afterwards (eval.prefill.replay with model=)
        layer.replay_needs_model = True
        return layer

    def head_floor(self) -> None:
        return None  # the heads' counts come from the one ranking over every layer's heads (KVzip), not AdaKV's

    def head_label(self) -> str:
        return "heads ranked with every layer's heads"

    def make_policy(self):
        policy = super().make_policy()
        policy.instruction, policy.chunk = getattr(self, "_instruction", None), self.chunk
        policy.ratio = self.ratio
        return policy
