"""The best measured recipe per model: what `kvshrink run` and `kvshrink serve` use when no method is named."""
from __future__ import annotations

#: model name -> spec (the measurements behind each are in the README's headline tables)
BEST = {"smollm2-135m": "tada:profile=smollm2-135m-tada-0.27"}
#: for models without a measured best recipe
FALLBACK = "kivi:bits=4"


def best_spec(model: str) -> str:
    return BEST.get(model, FALLBACK)
