"""NVIDIA kvpress's scorers ("presses") as a kvshrink token policy: the press scores the prompt, kvshrink keeps the
budget of best-scored tokens and stores them with any codec (`kvpress:press=SnapKVPress,budget=0.25 + kivi:bits=2`).

kvpress (PyPI `kvpress`, `pip install 'kvshrink[kvpress]'`) is imported only when a press is built. A
`ScorerPress`'s `score(module, hidden_states, keys, values, attentions, kwargs)` gets, at the prefill (kvpress
compresses the prompt only; so does this policy), what kvpress's own forward hook gives it: the attention module
(with the model's `rotary_emb` attached, as kvpress attaches it), the module's input hidden states and keyword
arguments (captured by `attention.capture_inputs`), the prompt's keys and values as the model computed them, and the
prompt's attention weights only for the presses that require them (kvpress asks for eager attention there; here
they are computed from the same queries and keys). The scores replace kvshrink's for ranking; which tokens and how
many stay is then kvshrink's: `budget` of the tokens seen (rounded up), protected sinks and window.
"""
from __future__ import annotations

import dataclasses
import importlib
import typing
from typing import Any, ClassVar

import torch

from .. import attention
from .scoring import Policy, ScoreContext

INSTALL = ("install it in an environment of its own, as kvpress 0.5.5 pins transformers<5.3: "
           "pip install torch 'kvshrink[kvpress]' (in this repository `make test-kvpress` builds one); docs/kvpress.md")
#: presses that assert they are given the attention weights (kvpress runs them under eager attention)
NEEDS_ATTENTIONS = ("ObservedAttentionPress",)


def kvpress_module() -> Any:
    """The `kvpress` package, or an error saying how to install it."""
    try:
        return importlib.import_module("kvpress")
    except ImportError as e:
        raise ImportError(f"the kvpress policy needs NVIDIA's kvpress, which is not importable ({e}): {INSTALL}") \
            from None


def scorer_presses() -> dict[str, type]:
    """Every `ScorerPress` class kvpress exports, by class name (the values `press=` accepts)."""
    kp = kvpress_module()
    return {name: cls for name in dir(kp) if isinstance(cls := getattr(kp, name), type)
            and issubclass(cls, kp.ScorerPress) and cls is not kp.ScorerPress}


def press_options(cls: type) -> dict[str, Any]:
    """The options of a press class a spec may set (name -> type): its dataclass fields of plain types, less
    `compression_ratio` (the policy's `budget` sets it) and private ones."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name == "compression_ratio" or f.name.startswith("_"):
            continue
        t = f.type
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if typing.get_origin(t) is typing.Union and len(args) == 1:  # Optional[int]
            t = args[0]
        if t in (int, float, bool, str) or typing.get_origin(t) is typing.Literal:
            out[f.name] = t
    return out


def _convert(press: str, key: str, raw: str, t: Any) -> Any:
    bad = ValueError(f"kvpress press {press}: option {key}={raw!r} is not a valid "
                     f"{getattr(t, '__name__', None) or ' or '.join(map(repr, typing.get_args(t)))}")
    if typing.get_origin(t) is typing.Literal:
        if raw not in typing.get_args(t):
            raise bad
        return raw
    if t is bool:
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise bad
        return raw.lower() in ("1", "true", "yes")
    try:
        return t(raw)
    except ValueError:
        raise bad from None


def parse_args(press: str, text: str) -> dict[str, Any]:
    """'window_size=64/kernel_size=7' -> {'window_size': 64, 'kernel_size': 7}, typed by the press's fields; an
    unknown press or option is an error listing the allowed ones."""
    presses = scorer_presses()
    if press not in presses:
        kp = kvpress_module()
        other = [n for n in dir(kp) if isinstance(getattr(kp, n), type) and issubclass(getattr(kp, n), kp.BasePress)
                 and n not in presses and n != "ScorerPress"]
        why = (f" ({press} is a kvpress press but not a ScorerPress: it compresses by itself rather than scoring "
               "tokens, so kvshrink cannot store its choice)") if press in other else ""
        raise ValueError(f"unknown kvpress press {press!r}{why}; the ScorerPress classes: {', '.join(sorted(presses))}")
    allowed = press_options(presses[press])
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split("/"))):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"kvpress press {press}: args item {item!r} must be key=value (several joined by '/')")
        if key == "compression_ratio":
            raise ValueError(f"kvpress press {press}: compression_ratio is set from the policy's budget "
                             "(compression_ratio = 1 - budget); give budget instead")
        if key not in allowed:
            raise ValueError(f"kvpress press {press} has no option {key!r} a spec can set; its options: "
                             f"{', '.join(allowed) or 'none'}")
        out[key] = _convert(press, key, raw.strip(), allowed[key])
    return out


def build_press(press: str, args: str, budget: float) -> Any:
    """An instance of kvpress's `press` with the options in `args` and `compression_ratio = 1 - budget`."""
    options = parse_args(press, args)
    try:
        return scorer_presses()[press](compression_ratio=max(0.0, 1.0 - budget), **options)
    except Exception as e:  # kvpress checks its options with asserts and its own errors
        raise ValueError(f"kvpress could not build {press}({', '.join(f'{k}={v!r}' for k, v in options.items())}): "
                         f"{type(e).__name__}: {e}") from None


def attach_model(press: Any, model: Any) -> None:
    """What kvpress's own context manager does before a press runs: `post_init_from_model`, and each attention
    module given the model's rotary embedding (as a plain attribute: the model's modules and state are unchanged)."""
    inner = getattr(model, "model", model)
    inner = getattr(inner, "language_model", inner)
    rotary = getattr(inner, "rotary_emb", None)
    for name, module in model.named_modules():
        if name.endswith("self_attn") and rotary is not None and not hasattr(module, "rotary_emb"):
            object.__setattr__(module, "rotary_emb", rotary)
    press.post_init_from_model(model)


def _prompt_attention(ctx: ScoreContext) -> torch.Tensor:
    """The prompt's attention weights [B, Hq, T, T] in the query's dtype (what eager attention returns)."""
    q, k = ctx.query.float(), ctx.given[0].float()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = (q @ k.transpose(-1, -2)) * ctx.scaling
    t = s.shape[-1]
    if ctx.mask is not None:
        m = ctx.mask[..., :t]
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
    else:
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch.softmax(s, -1).to(ctx.query.dtype)


class PressPolicy(Policy):
    """A kvpress `ScorerPress`'s scores of the prompt (made by `methods/kvpress.py`, not by name: it has a press)."""

    name = "kvpress"
    summary = "a kvpress ScorerPress's scores of the prompt; prompt only (kvpress)"
    evicts_while_decoding = False
    needs_attention = False
    needs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, press: Any):
        self.press = press
        self.attentions = type(press).__name__ in NEEDS_ATTENTIONS or any(
            c.__name__ in NEEDS_ATTENTIONS for c in type(press).__mro__)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        if not ctx.prefill:
            return ctx.old
        inputs = ctx.inputs
        keys, values = ctx.given
        hidden = inputs.hidden_states
        if hidden is None or hidden.shape[:2] != (keys.shape[0], keys.shape[2]):
            raise ValueError(f"layer {ctx.layer.layer_idx}: the attention module's hidden states "
                             f"{None if hidden is None else tuple(hidden.shape)} do not match the prompt's "
                             f"{keys.shape[0]} rows of {keys.shape[2]} tokens (a left-padded batch is split into "
                             "rows, which kvpress presses cannot score: give one prompt at a time)")
        weights = _prompt_attention(ctx) if self.attentions else None
        with torch.no_grad():
            scores = self.press.score(inputs.module, hidden, keys, values, weights,
                                      {"hidden_states": hidden, **inputs.kwargs})
        if tuple(scores.shape) != tuple(keys.shape[:3]):
            raise ValueError(f"layer {ctx.layer.layer_idx}: {type(self.press).__name__}.score returned shape "
                             f"{tuple(scores.shape)}, expected [batch, kv heads, tokens] = {tuple(keys.shape[:3])}")
        return scores.float()


def capture(model: Any, press: Any) -> None:
    """Set `model` up for `press`: its attention modules' inputs captured, and kvpress's model attachments."""
    attention.capture_inputs(model)
    attach_model(press, model)
