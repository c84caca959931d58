"""EleutherAI lm-evaluation-harness with a kvshrink cache: the model `kvshrink` (`pip install 'kvshrink[lmeval]'`).

    kvshrink lm-eval --model_args pretrained=qwen2.5-coder-1.5b,method=kivi,bits=2 --tasks <task>
    python -c "import kvshrink.lmeval, lm_eval; lm_eval.simple_evaluate(model='kvshrink', model_args=..., ...)"

lm-eval 0.4 finds models only in its own registry (no plugin entry points), so the model is registered when this
module is imported; `kvshrink lm-eval ...` imports it and runs lm-eval's command line with `--model kvshrink`.

model_args: `pretrained` (an embedded name, path or hub id, loaded by `kvshrink.load_model`), `method` (a method
name; its options as further model_args, e.g. `method=tada,bits=2,mean=channel`, since lm-eval splits model_args
at commas; or `method=kivi:bits=2;group=32` with semicolons), `profile` (a tada profile file), `dtype` (auto,
float32, bfloat16, float16), plus lm-eval's own HF arguments (`batch_size`, `max_length`, ...).

Both request kinds go through the cache the way `generate()` does: a generation request prefills its context into
a fresh cache and decodes greedily (transformers' `generate` with `past_key_values`); a log-likelihood request
prefills its context into a fresh cache (exact attention, then stored compressed) and scores the continuation one
token per decoding step over the stored past. Requests run one at a time.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("kvshrink.lmeval needs lm-evaluation-harness: pip install 'kvshrink[lmeval]'") from e

from .eval.scoring import continue_scores
from .methods import build_method, with_options
from .models import last_logits_only, load_model


def method_spec(method: str, extra: dict[str, Any], profile: str | None = None) -> str:
    """The canonical spec of `method` ('kivi', 'kivi:bits=2;group=32', 'snapkv:budget=0.25 + tada' - `;` for `,`
    since lm-eval splits model_args at commas), with the further model_args that are options of its last part
    (the method, or the CODEC side of a composition) and `profile`; those args are taken out of `extra`."""
    spec = str(method).replace(";", ",")
    last = build_method(spec)
    last = getattr(last, "storing", last)  # a composition: options go to the codec side
    fields = {f.name for f in dataclasses.fields(getattr(last, "codec", last))}
    given = [(key, extra.pop(key)) for key in list(extra) if key in fields]
    if profile:
        given.append(("profile", str(profile)))
    return with_options(spec, given)


@register_model("kvshrink")
class KVShrinkLM(HFLM):
    """lm-eval's HF model with every request answered through a fresh kvshrink cache."""

    def __init__(self, pretrained: str = "smollm2-135m", method: str = "full", profile: str | None = None,
                 dtype: str = "auto", device: str = "cpu", **kwargs: Any):
        self.kv_spec = method_spec(method, kwargs, profile)
        self.kv_method = build_method(self.kv_spec)  # bad names and options fail before the model loads
        model, tokenizer = load_model(str(pretrained), dtype=None if dtype in (None, "auto") else dtype,
                                      device=device)
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", device=device, **kwargs)

    def make_cache(self):
        return self.kv_method.make_cache(self.model)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        generation_kwargs["past_key_values"] = self.make_cache()
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        from tqdm.auto import tqdm

        out = []
        for request, context_enc, continuation_enc in tqdm(requests, disable=disable_tqdm or self.rank != 0,
                                                           desc=f"loglikelihood ({self.kv_spec})"):
            if not context_enc or not continuation_enc:
                raise ValueError("a log-likelihood request needs a non-empty context and continuation")
            whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
            n = len(continuation_enc)
            context = torch.tensor([whole[:-n]], device=self.device)
            cont = torch.tensor([whole[-n:]], device=self.device)
            cache = self.make_cache()
            first = self.model(context, past_key_values=cache, use_cache=True,
                               **last_logits_only(self.model)).logits[:, -1]
            logprobs = continue_scores(self.model, cache, first, cont)  # [n, vocab], one decoding step per token
            picked = logprobs.gather(1, cont.cpu()[0, :, None])[:, 0]
            answer = (float(picked.sum()), bool((logprobs.argmax(-1) == cont.cpu()[0]).all()))
            out.append(answer)
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return out


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with `--model kvshrink` (the model registered above)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args and args[0] in ("run", "ls", "validate") else "run"
    if command == "run":
        if "--model" in args:
            i = args.index("--model")
            if i + 1 < len(args) and args[i + 1] != "kvshrink":
                raise SystemExit(f"kvshrink lm-eval runs the model 'kvshrink', not {args[i + 1]!r}")
        else:
            args = ["--model", "kvshrink", *args]
    sys.argv = ["lm_eval", command, *args]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
