"""`lowrank`: every token that leaves the recent window kept as its first `rank` coefficients in a fitted basis, at
`bits` bits: the fixed-rank baseline that `tale` and `dynakv` adapt per token.

The bases come from a profile (`kvshrink calibrate --method tale`); attention runs in the latent space through
kvshrink's attention function, which `make_cache(model, ...)` switches the model to (SDPA for every other layer).
Sliding-window layers (Gemma 3's local layers) stay exact: they never hold more than their window.
Under tensor parallelism each rank holds the bases of its KV heads (per-head), or its heads' rows of the joint basis
(`dynakv`, whose coefficients and level choices the ranks then share: see `layers/latent.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import attention
from ..bases import layer_bases, rank_bases
from ..rope import Rope
from ..codecs.lowrank import CENTERS, Level, check_coeff_codes, level_token_bytes
from ..layers.full import FullLayer, FullSlidingLayer
from ..layers.latent import MODES, LatentLayer
from ..models import text_config
from ..profile import Profile, load_profile
from .base import Method, option, register, take_profile_options

_DTYPES = {"model": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _layer_list(text: str, name: str) -> frozenset[int]:
    """'0/1' -> {0, 1}; '' -> {} (the `exact_layers` option; '/' as in `levels`, since ',' separates options)."""
    try:
        out = [int(s) for s in str(text).split("/") if s.strip()]
    except ValueError:
        raise ValueError(f"{name}: exact_layers must be layer indices joined by '/' (e.g. '0/1'), got {text!r}") from None
    if any(i < 0 for i in out):
        raise ValueError(f"{name}: exact_layers must be >= 0, got {text!r}")
    return frozenset(out)


@dataclass
class LatentMethod(Method):
    """Options and cache building shared by the low-rank methods (not a method by itself)."""

    joint = False  # one basis over all KV heads of a layer (dynakv) instead of one per head

    profile: str = option("", "profile holding the fitted bases (`kvshrink calibrate --method tale`); required")
    window: int = option(32, "recent tokens kept exact (approximated in blocks when they leave)")
    sinks: int = option(4, "first tokens kept exact (attention sinks)")
    code_group: int = option(0, "coefficients sharing one fp16 scale and zero point (0 = all of a token's)")
    exact_dtype: str = option("float16", "dtype of the exact window and sinks: model, float16, bfloat16")
    basis_dtype: str = option("float16", "dtype the bases are held in: float16 or float32")
    attention: str = option("latent", "'latent': scores and values in the basis coordinates; 'reconstruct': "
                                      "rebuild keys and values, then attend (the reference)")
    key_space: str = option("post_rope", "keys projected after the rotary embedding ('post_rope') or with it undone "
                                         "('pre_rope': needs attention=reconstruct and a pre-RoPE profile)")
    exact_layers: str = option("", "layer indices joined by '/' kept as an uncompressed cache (bytes counted), "
                                   "e.g. '0/1' for Qwen2, whose first two layers' keys do not survive coefficient "
                                   "codes of 8 bits or fewer")
    mean: str = option("none", "subtracted from the coefficients before they are coded: 'none', or 'channel' (each "
                               "level's per-coefficient mean over the first block it stores, held in fp16; keeps a "
                               "code's range off a constant offset such as Qwen2's key bias)")
    coeff_axis: str = option("token", "what a coefficient code group runs along: 'token' (one fp16 scale and zero per "
                                      "token and code_group coefficients) or 'channel' (one per coefficient and "
                                      "coeff_group tokens, KIVI's key groups; a level's last, not yet full group "
                                      "stays exact fp16, reported as window)")
    coeff_group: int = option(32, "tokens sharing one fp16 scale and zero point per coefficient (coeff_axis=channel)")

    def validate(self) -> None:
        self._profile: Profile | None = load_profile(self.profile) if self.profile else None
        if self._profile is not None:
            self._apply_recipe(self._profile)
        if self.exact_dtype not in ("model", "float16", "bfloat16"):
            raise ValueError(f"{self.name}: exact_dtype must be model, float16 or bfloat16, got {self.exact_dtype!r}")
        if self.basis_dtype not in ("float16", "float32"):
            raise ValueError(f"{self.name}: basis_dtype must be float16 or float32, got {self.basis_dtype!r}")
        if self.attention not in MODES:
            raise ValueError(f"{self.name}: attention must be one of {', '.join(MODES)}, got {self.attention!r}")
        if self.key_space not in ("post_rope", "pre_rope"):
            raise ValueError(f"{self.name}: key_space must be post_rope or pre_rope, got {self.key_space!r}")
        if self.mean not in CENTERS:
            raise ValueError(f"{self.name}: mean must be one of {', '.join(CENTERS)}, got {self.mean!r}")
        if self.key_space == "pre_rope" and self.attention != "reconstruct":
            raise ValueError(f"{self.name}: key_space=pre_rope attends by reconstruction only (each token's rotation "
                             "is applied after rebuilding it): set attention=reconstruct")
        for arg in ("window", "sinks", "code_group"):
            if getattr(self, arg) < 0:
                raise ValueError(f"{self.name}: {arg} must be >= 0, got {getattr(self, arg)}")
        check_coeff_codes(self.coeff_axis, self.coeff_group, self.name)
        if self.coeff_axis == "channel" and self.code_group:
            raise ValueError(f"{self.name}: code_group groups a token's coefficients (coeff_axis=token); with "
                             "coeff_axis=channel each coefficient has its own scale per coeff_group tokens: leave "
                             "code_group=0")
        self._exact_layers = _layer_list(self.exact_layers, self.name)

    def _apply_recipe(self, profile: Profile) -> None:
        """A recipe profile (`bases.lowrank_recipe`) names this method and carries its options: take them; an
        explicit different value is an error. A bases profile (method `lowrank`, no method options) sets nothing."""
        recipe = {k: v for k, v in profile.options.items() if k != "joint"}
        if profile.method == "lowrank" and set(recipe) <= {"key_space"}:
            return
        if profile.method != self.name:
            raise ValueError(f"profile {self.profile or '(in memory)'} is a {profile.method!r} recipe; build it as "
                             f"{profile.method} (make_cache(model, profile=PATH)) or give {self.name} a bases profile")
        take_profile_options(self, recipe, ("profile",), f"profile {self.profile or '(in memory)'}", "is a recipe with",
                             "leave {key} out, or give the bases profile it was made from")

    def use_profile(self, profile: Profile) -> "LatentMethod":
        """Take the bases (and a recipe's options) from an in-memory profile (as the `profile` option does from a
        file)."""
        self._apply_recipe(profile)
        self.validate()  # the recipe's options checked as if given (the `profile` option stays as it was)
        self._profile = profile
        return self

    # what a subclass decides: the levels of a layer and the share of tokens at each
    def level_plan(self, row: int) -> tuple[tuple[Level, ...], tuple[float, ...]]:
        raise NotImplementedError

    def level_costs(self, levels: tuple[Level, ...], row: int) -> list[float]:
        """Bytes per token and basis row at each level, keys and values and the level byte, over fp16's."""
        group = self.code_group or row
        fp16 = 2 * 2 * row
        return [(2 * level_token_bytes(lv, group, self.coeff_axis, self.coeff_group) + 1) / fp16 for lv in levels]

    def prepare(self, model_or_config: Any) -> None:
        if self._profile is None:
            raise ValueError(f"{self.name}: needs bases: give profile=... (made by `kvshrink calibrate --method "
                             f"{'dynakv' if self.joint else 'tale'}`)")
        where = f"profile {self.profile or '(in memory)'}"
        self._profile.check_model(model_or_config, where)
        if hasattr(model_or_config, "set_attn_implementation"):
            attention.enable(model_or_config)
        text = text_config(model_or_config)
        beyond = sorted(i for i in self._exact_layers if i >= text.num_hidden_layers)
        if beyond:
            raise ValueError(f"{self.name}: exact_layers {beyond} are beyond the model's {text.num_hidden_layers} "
                             f"layers (0..{text.num_hidden_layers - 1})")
        self._kv_heads = text.num_key_value_heads
        self._bases = lambda i: layer_bases(self._profile, i, self.joint, where, self.key_space)  # noqa: E731
        if self.key_space == "pre_rope":
            if not hasattr(model_or_config, "set_attn_implementation"):
                raise TypeError(f"{self.name}: key_space=pre_rope needs the model (its rotary embedding), not a config")
            self._rope = lambda i: Rope(model_or_config, i)  # noqa: E731
        else:
            self._rope = lambda i: None  # noqa: E731

    def layer(self, layer_idx: int, sliding_window: int | None):
        if sliding_window is not None:
            return FullSlidingLayer(sliding_window, layer_idx)
        if layer_idx in self._exact_layers:
            return FullLayer(layer_idx)
        bases = self._bases(layer_idx)
        row = bases[0].shape[1]  # levels and costs are those of the whole basis, on every rank
        levels, fractions = self.level_plan(row)
        rank = max(lv.rank for lv in levels)
        shard = getattr(self, "_shard", None)
        kb, ks, vb, vs = rank_bases(bases, shard, self.joint)
        return LatentLayer(kb[..., :rank], ks[..., :rank], vb[..., :rank], vs[..., :rank], levels, fractions,
                           kv_heads=self._kv_heads if shard is None else shard.heads, window=self.window,
                           sinks=self.sinks, block=max(self.window, 1), code_group=self.code_group or row,
                           layer_idx=layer_idx, exact_dtype=_DTYPES[self.exact_dtype],
                           basis_dtype=_DTYPES[self.basis_dtype], mode=self.attention, rope=self._rope(layer_idx),
                           shard=shard if self.joint else None, center=self.mean, coeff_axis=self.coeff_axis,
                           coeff_group=self.coeff_group, **self.layer_options())

    def layer_options(self) -> dict[str, Any]:
        return {}


@register
@dataclass
class LowRank(LatentMethod):
    name = "lowrank"
    summary = "fixed-rank projection onto fitted per-head bases, quantized coefficients (non-adaptive baseline)"

    rank: int = option(16, "coefficients kept per token and head (<= head dim)")
    bits: int = option(4, "code width of the coefficients: 2, 3, 4, 8 or 16 (fp16)")

    def validate(self) -> None:
        super().validate()
        if self.rank < 1:
            raise ValueError(f"lowrank: rank must be >= 1, got {self.rank}")
        Level(self.rank, self.bits).spec(self.rank)  # checks bits

    def level_plan(self, row):
        if self.rank > row:
            raise ValueError(f"lowrank: rank {self.rank} exceeds the basis size {row}")
        return (Level(self.rank, self.bits),), (1.0,)
