"""Low-rank bases fitted on calibration text, stored in a profile (`kvshrink calibrate --method tale|dynakv|lowrank`).

Keys are taken as the cache receives them, after the rotary embedding: in that space a query scores a token from its
coefficients alone (q . U c = (U^T q) . c), which is what lets attention skip reconstruction; a basis fitted
before the rotation (`key_space="pre_rope"`, offered for comparison) needs each token's rotation applied after
reconstructing it, so it attends by reconstruction only. Values have no rotation. Per layer, one basis per KV head (TALE) or one over all heads of the layer jointly (DynaKV, Palu's
joint-head decomposition), fitted by uncentred PCA of every position of the calibration windows.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from transformers import DynamicCache

from .codecs.lowrank import energy, fit_basis
from .distributed import refuse_sharded
from .models import last_logits_only
from .profile import Profile, ProfileError, fingerprint
from .rope import Rope

KINDS = {"lowrank": False, "tale": False, "dynakv": True}  # method -> joint basis
KEY_SPACES = ("post_rope", "pre_rope")


def _rows(x: torch.Tensor, joint: bool) -> torch.Tensor:
    """[1, H, T, d] -> [G, T, D]: one row per head (G = H) or the heads side by side (G = 1)."""
    x = x[0].float()
    return x.permute(1, 0, 2).reshape(1, x.shape[1], -1) if joint else x


def fit_bases(model, ids: torch.Tensor, *, joint: bool, samples: int = 4, context: int = 1024,
              key_space: str = "post_rope", progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Bases and coefficient RMS of every layer from `samples` windows of `context` tokens of `ids` [1, N];
    `key_space="pre_rope"` fits the keys with the rotary embedding undone. Returns (tensors, record)."""
    from tqdm.auto import tqdm

    if key_space not in KEY_SPACES:
        raise ValueError(f"key_space must be one of {KEY_SPACES}, got {key_space!r}")

    refuse_sharded(model, "fitting bases")
    if ids.shape[1] < samples * context:
        raise ValueError(f"the calibration text has {ids.shape[1]} tokens; {samples} windows of {context} need "
                         f"{samples * context}")
    stride = ids.shape[1] // samples
    grams: dict[tuple[int, str], torch.Tensor] = {}
    count = 0
    start = time.perf_counter()
    for s in tqdm(range(samples), desc="fitting bases", unit="window", disable=not progress):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids[:, s * stride:s * stride + context], past_key_values=cache, use_cache=True,
                  **last_logits_only(model))
        for i, layer in enumerate(cache.layers):
            keys = layer.keys
            if key_space == "pre_rope":
                keys = Rope(model, i)(keys, torch.arange(keys.shape[-2]), inverse=True)
            for kind, x in (("key", keys), ("value", layer.values)):
                r = _rows(x, joint).double()
                g = r.transpose(-1, -2) @ r
                grams[(i, kind)] = g if (i, kind) not in grams else grams[(i, kind)] + g
        count += context
    tensors: dict[str, torch.Tensor] = {}
    record: dict[str, Any] = {"samples": samples, "context": context, "joint": joint, "key_space": key_space,
                              "energy": {}}
    for (i, kind), g in sorted(grams.items()):
        basis, sigma = fit_basis(g, count)
        tensors[f"layer{i}.{kind}_basis"], tensors[f"layer{i}.{kind}_sigma"] = basis, sigma
        e = energy(sigma).mean(0)
        d = e.shape[0]
        record["energy"][f"{i}/{kind[0]}"] = {f"r{r}": round(float(e[r - 1]), 4) for r in (d // 8, d // 4, d // 2)
                                              if r >= 1}
    record["seconds"] = round(time.perf_counter() - start, 1)
    return tensors, record


def bases_profile(model, ids: torch.Tensor, *, method: str = "tale", samples: int = 4, context: int = 1024,
                  key_space: str = "post_rope", progress: bool = True) -> Profile:
    """A profile holding the bases `method` needs (per-head for tale/lowrank, joint for dynakv), fitted on token
    ids [1, N] of calibration text."""
    if method not in KINDS:
        raise ValueError(f"low-rank bases are for methods {', '.join(KINDS)}, got {method!r}")
    tensors, record = fit_bases(model, ids, joint=KINDS[method], samples=samples, context=context,
                                key_space=key_space, progress=progress)
    return Profile(fingerprint(model), "lowrank", {"joint": KINDS[method], "key_space": key_space}, [], None, record,
                   tensors)


RECIPE_METHODS = ("tale", "dynakv", "lowrank")  # methods a low-rank recipe profile may name


def layer_bases(profile: Profile, layer_idx: int, joint: bool, where: str,
                key_space: str = "post_rope") -> tuple[torch.Tensor, ...]:
    """(key basis, key sigma, value basis, value sigma) of one layer from a bases profile or a low-rank recipe,
    checked. A basis is [groups, row, rank], rank <= row (a recipe cuts its columns to the rank its levels use)."""
    if profile.method not in RECIPE_METHODS or "joint" not in profile.options:
        raise ProfileError(f"{where} holds no low-rank bases (method {profile.method!r}); make one with "
                           "`kvshrink calibrate --method tale` (or dynakv)")
    if bool(profile.options["joint"]) != joint:
        need = "joint (dynakv)" if joint else "per-head (tale, lowrank)"
        raise ProfileError(f"{where} holds {'joint' if profile.options['joint'] else 'per-head'} bases; this method "
                           f"needs {need} bases: calibrate with the matching --method")
    fitted = profile.options.get("key_space", "post_rope")
    if fitted != key_space:
        raise ProfileError(f"{where} holds keys fitted {fitted.replace('_', '-')}; key_space={key_space!r} was asked "
                           f"for: calibrate with --key-space {key_space}")
    out = []
    for name in ("key_basis", "key_sigma", "value_basis", "value_sigma"):
        t = profile.tensors.get(f"layer{layer_idx}.{name}")
        if t is None:
            raise ProfileError(f"{where} lacks layer{layer_idx}.{name}")
        out.append(t)
    kb, ks, vb, vs = out
    if kb.dim() != 3 or kb.shape[2] > kb.shape[1] or vb.shape != kb.shape or ks.shape != (kb.shape[0], kb.shape[2]) \
            or vs.shape != ks.shape:
        raise ProfileError(f"{where}: layer {layer_idx} bases have inconsistent shapes {tuple(kb.shape)}, "
                           f"{tuple(ks.shape)}, {tuple(vb.shape)}, {tuple(vs.shape)}")
    return kb, ks, vb, vs


def lowrank_recipe(bases: Profile, method: str, **options: Any) -> Profile:
    """A profile that `make_cache(model, profile=PATH)` builds as `method` with `options`: the bases of `bases` (a
    `kvshrink calibrate --method tale|dynakv` profile) cut to the largest rank the method's levels use and held in
    float16 (what the cache holds with the default `basis_dtype`), and the options. Loading it as that method with
    a different explicit option is an error, as for a TaDA profile."""
    from .methods.build import build_method

    if method not in RECIPE_METHODS:
        raise ValueError(f"a low-rank recipe is for methods {', '.join(RECIPE_METHODS)}, got {method!r}")
    if bases.method != "lowrank" or "joint" not in bases.options:
        raise ProfileError(f"a low-rank recipe starts from a bases profile (method 'lowrank'), got {bases.method!r}")
    for key in ("profile", "joint"):
        if key in options:
            raise ValueError(f"{key!r} is not a recipe option (the bases come from the bases profile)")
    fitted = bases.options.get("key_space", "post_rope")
    if options.get("key_space", fitted) != fitted:
        raise ValueError(f"the bases were fitted {fitted.replace('_', '-')}; key_space={options['key_space']!r} "
                         "cannot be given to them")
    if options.get("basis_dtype", "float16") != "float16":
        raise ValueError("a recipe holds its bases in float16; basis_dtype must stay float16")
    built = build_method(method, **options)
    if built.joint != bool(bases.options["joint"]):
        raise ProfileError(f"{method} needs {'joint' if built.joint else 'per-head'} bases; the bases profile holds "
                           f"{'joint' if bases.options['joint'] else 'per-head'} ones")
    first = bases.tensors["layer0.key_basis"]
    levels, _ = built.level_plan(first.shape[1])
    rank = max(lv.rank for lv in levels)
    tensors = {name: (t[..., :rank] if name.endswith(("_basis", "_sigma")) else t).to(torch.float16).contiguous()
               for name, t in bases.tensors.items()}
    calibration = {**bases.calibration, "recipe": {"method": method, "rank": rank, "from_rank": int(first.shape[2])}}
    return Profile(bases.model, method, {**bases.options, **options}, [], None, calibration, tensors)


def rank_bases(bases: tuple[torch.Tensor, ...], shard, joint: bool) -> tuple[torch.Tensor, ...]:
    """The part of a layer's (key basis, key sigma, value basis, value sigma) that a tensor-parallel rank needs for
    its global KV heads [shard.start, shard.stop): its heads' bases (per-head), or its heads' rows of the joint
    basis (the sigmas, one per coefficient, whole). Unchanged without a shard."""
    if shard is None:
        return bases
    kb, ks, vb, vs = bases
    if joint:
        if kb.shape[1] % shard.total:
            raise ProfileError(f"a joint basis of {kb.shape[1]} rows does not split over {shard.total} KV heads")
        d = kb.shape[1] // shard.total
        rows = slice(shard.start * d, shard.stop * d)
        return kb[:, rows], ks, vb[:, rows], vs
    if kb.shape[0] != shard.total:
        raise ProfileError(f"bases for {kb.shape[0]} KV heads; the model has {shard.total}")
    heads = slice(shard.start, shard.stop)
    return kb[heads], ks[heads], vb[heads], vs[heads]
