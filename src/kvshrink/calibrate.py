"""`kvshrink calibrate`: choose bits (centering, rotation) per layer for keys and values under a memory budget.

Score of an allocation: the mean KL divergence of next-token distributions against the uncompressed cache over
calibration text that no evaluation prompt is built from (standard-library docstrings,
`eval.corpus.calibration_text()`; before that split, the pydoc corpus's first 80%), measured through the cache:
the context is prefilled and stored compressed, then the scored tokens run as one forward pass over the stored
past (`score_continuation_chunked`; step-by-step decoding would make calibration ~10x slower for the same ranking).

Two searches on the same budget:
- `random`: TaDA's random search - random per-layer choices, repaired to fit (and spend) the budget, the best
  of `trials` kept;
- `greedy`: each layer's sensitivity is measured once (KL when only that layer's keys, or values, are lowered to 2
  bits), the KL at b bits is modelled as sensitivity x 4^-(b-2) (quantization noise power falls 4x per bit), and
  the budget is spent by repeatedly taking the upgrade with the largest predicted KL reduction per byte.
`both` (the default) runs the sensitivity allocation, then a random local search seeded with it, and keeps the
better-scoring allocation; both scores and times are written into the profile.

Bytes are real: the cost of every choice for every layer is read off cache layers that hold random keys and
values of the budget's context length, and the predicted ratio of a profile is measured the same way.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import DynamicCache

from .bases import KINDS, bases_profile
from .codecs.base import BIT_WIDTHS
from .distributed import refuse_sharded
from .eval.corpus import CALIBRATION_SOURCE, calibration_text, legacy_calibration_text, text_digest
from .eval.prefill import record_prefill, replay, replayable
from .eval.scoring import score_continuation_after, score_continuation_chunked
from .methods import build_method
from .models import head_dim_of, load_model
from .profile import ROTATABLE_BITS, LayerChoice, Profile, ProfileError, fingerprint, load_profile

BITS = BIT_WIDTHS["uniform"]
#: the widths calibration chooses among by default (16 bits is the fallback every budget allows)
CHOICES = tuple(b for b in BITS if b != 16)


@dataclass(frozen=True)
class Option:
    bits: int
    mean: str = "none"
    rotate: bool = False  # a rotation codec (Hadamard + Lloyd-Max) instead of grouped codes

    @property
    def variant(self) -> str:
        """What sensitivities are measured per: the centering, or 'rotate'."""
        return "rotate" if self.rotate else self.mean


def _options(kv_heads: int, bits: Sequence[int], rotation: bool = False) -> list[Option]:
    means = ("none", "head") if kv_heads > 1 else ("none",)  # with one KV head the head mean is the whole cache
    opts = [Option(b, m) for b in bits for m in means if not (b == 16 and m == "head")]
    if rotation:
        opts += [Option(b, "none", True) for b in bits if b in ROTATABLE_BITS]
    return opts


def _geometry(model) -> tuple[int, int, int]:
    text = model.config.get_text_config(decoder=True)
    head_dim = head_dim_of(text)
    return text.num_hidden_layers, text.num_key_value_heads, head_dim


def fill_random(cache, model, context: int):
    """Push `context` tokens of random keys and values (the model's dtype) through every layer of `cache`; a layer
    with a token policy (or split by KV head, with one) scores them with random queries and keeps its budget, as after
    a prefill."""
    _, kv_heads, head_dim = _geometry(model)
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, kv_heads, context, head_dim, generator=gen).to(dtype)
    queries = None
    for layer in cache.layers:
        layer.update(x, x)
        if getattr(layer, "scored", False) or any(getattr(h, "scored", False) for h in getattr(layer, "heads", ())):
            if queries is None:
                heads = model.config.get_text_config(decoder=True).num_attention_heads
                queries = torch.randn(1, heads, context, head_dim, generator=gen).to(dtype)
            layer.attend(queries, None, head_dim ** -0.5)
    return cache


def profile_ratio(model, profile: Profile, context: int) -> tuple[int, float]:
    """(bytes, ratio to 16-bit) of a cache built from `profile` holding `context` tokens: measured, not modelled."""
    method = build_method("tada", **{**profile.options, "profile": ""}).use_profile(profile)
    report = fill_random(method.make_cache(model), model, context).memory_report()
    return report["nbytes"], report["ratio"]


def _store_bytes(store) -> int:
    return sum(t.numel() * t.element_size() for ts in store.parts().values() for t in ts)


class ByteModel:
    """Real bytes of every (layer, keys|values, option) at `context` tokens, plus each layer's fixed bytes."""

    def __init__(self, model, base: dict[str, Any], options: list[Option], context: int):
        self.context = context
        n_layers, kv_heads, head_dim = _geometry(model)
        self.cost: dict[tuple[int, int, Option], int] = {}
        self.fixed = [0] * n_layers
        self.fp16 = 0
        for opt in options:
            method = build_method("tada", **{**base, "key_bits": opt.bits, "value_bits": opt.bits, "mean": opt.mean,
                                             "rotate": "both" if opt.rotate else "none", "profile": ""})
            cache = fill_random(method.make_cache(model), model, context)
            for i, layer in enumerate(cache.layers):
                self.cost[(i, 0, opt)] = _store_bytes(layer.key_store)
                self.cost[(i, 1, opt)] = _store_bytes(layer.value_store)
                # the exact window's length depends on the flush block, so take the largest (never under-count)
                fixed = layer.nbytes() - self.cost[(i, 0, opt)] - self.cost[(i, 1, opt)]
                self.fixed[i] = max(self.fixed[i], fixed)
            self.fp16 = cache.memory_report()["fp16_nbytes"]

    def total(self, alloc: dict[tuple[int, int], Option]) -> int:
        return sum(self.fixed) + sum(self.cost[(i, t, o)] for (i, t), o in alloc.items())


def calibration_windows(ids: torch.Tensor, samples: int, context: int, scored: int,
                        seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(context ids, scored ids) of each calibration window: one window of `context + scored` tokens at a
    seed-chosen place in each of `samples` equal stretches of the text's ids [1, N]."""
    need = context + scored
    if ids.shape[1] < need * samples:
        raise ValueError(f"the calibration text has {ids.shape[1]} tokens; {samples} samples of {need} need "
                         f"{need * samples}")
    rng = random.Random(seed)
    stride = ids.shape[1] // samples
    out = []
    for s in range(samples):
        start = s * stride + rng.randrange(0, stride - need + 1)
        window = ids[:, start:start + need]
        out.append((window[:, :context], window[:, context:]))
    return out


class Scorer:
    """Mean KL(reference || allocation) over calibration samples, through the cache."""

    def __init__(self, model, tokenizer, text: str, base: dict[str, Any], samples: int, context: int, scored: int,
                 seed: int, share_prefill: bool = True):
        self.model, self.base = model, base
        self._score = score_continuation_chunked
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        self.samples = calibration_windows(ids, samples, context, scored, seed)
        # Every allocation attends over the exact prompt during the prefill (tada stores its codes only after), so
        # the prefill is the same for all of them: run each sample's context once, record it, and build each
        # allocation's cache from the record (`eval.prefill.replay`); only the scored continuation runs per
        # allocation. `share_prefill=False` runs every prefill (the same KLs, slower: kept to measure the saving).
        self.records = [record_prefill(model, c) for c, _ in self.samples] if share_prefill else None
        self.refs = [self._continuation(DynamicCache(config=model.config), i) for i in range(samples)]
        self.evaluations = 0

    def _continuation(self, cache, i: int) -> torch.Tensor:
        """Log-probabilities [scored, vocab] of sample `i`'s continuation through `cache`."""
        ctx, cont = self.samples[i]
        if self.records is None:
            return self._score(self.model, cache, ctx, cont)
        if not replayable(cache, ctx.shape[1]):
            raise RuntimeError(f"calibration: a {type(cache).__name__} of this allocation cannot be built from the "
                               "recorded prefill; calibrate with share_prefill=False (--no-shared-prefill)")
        return score_continuation_after(self.model, cache, replay(self.records[i], cache), cont)

    def __call__(self, alloc: dict[tuple[int, int], Option]) -> float:
        n_layers = _geometry(self.model)[0]
        profile = _profile(self.model, self.base, alloc, n_layers)
        method = build_method("tada", **{**self.base, "profile": ""}).use_profile(profile)
        kls = []
        for i, ref in enumerate(self.refs):
            lp = self._continuation(method.make_cache(self.model), i)
            kls.append((ref.exp() * (ref - lp)).sum(-1).clamp_min(0).mean().item())
        self.evaluations += 1
        return sum(kls) / len(kls)


def _profile(model, base, alloc, n_layers, predicted_ratio=None, calibration=None) -> Profile:
    layers = [LayerChoice(alloc[(i, 0)].bits, alloc[(i, 1)].bits, alloc[(i, 0)].mean, alloc[(i, 1)].mean,
                          alloc[(i, 0)].rotate, alloc[(i, 1)].rotate) for i in range(n_layers)]
    return Profile(fingerprint(model), "tada", dict(base), layers, predicted_ratio, calibration or {})


def allocate(sensitivity: dict[tuple[int, int, str], float], costs: ByteModel, options: list[Option],
             budget: int) -> dict[tuple[int, int], Option]:
    """Greedy allocation: cheapest option everywhere, then the best predicted-KL-per-byte upgrade while it fits."""
    items = sorted({(i, t) for i, t, _ in sensitivity})

    def kl(item, opt):
        if opt.bits == 16:
            return 0.0
        return sensitivity[(*item, opt.variant)] * 4.0 ** -(opt.bits - 2)

    alloc = {item: min(options, key=lambda o: (costs.cost[(*item, o)], kl(item, o))) for item in items}
    spent = costs.total(alloc)
    if spent > budget:
        raise ValueError(f"the budget of {budget} bytes is below the cheapest allocation ({spent} bytes at 2 bits "
                         f"everywhere): raise the target")
    while True:
        best = None
        for item in items:
            cur = alloc[item]
            c0, k0 = costs.cost[(*item, cur)], kl(item, cur)
            for o in options:
                dc = costs.cost[(*item, o)] - c0
                dk = k0 - kl(item, o)
                if dc > 0 and dk > 0 and spent + dc <= budget:
                    gain = dk / dc
                    if best is None or gain > best[0]:
                        best = (gain, item, o, dc)
        if best is None:
            return alloc
        _, item, o, dc = best
        alloc[item] = o
        spent += dc


def _repair(alloc, costs: ByteModel, options: list[Option], budget: int, rng: random.Random):
    """Lower random choices until the allocation fits, then raise random ones while any raise still fits."""
    items = list(alloc)
    by_cost = lambda item: sorted(options, key=lambda o: costs.cost[(*item, o)])  # noqa: E731
    while costs.total(alloc) > budget:
        item = rng.choice(items)
        cheaper = [o for o in by_cost(item) if costs.cost[(*item, o)] < costs.cost[(*item, alloc[item])]]
        if cheaper:
            alloc[item] = rng.choice(cheaper)
    while True:
        slack = budget - costs.total(alloc)
        ups = [(item, o) for item in items for o in options
               if 0 < costs.cost[(*item, o)] - costs.cost[(*item, alloc[item])] <= slack and o.bits > alloc[item].bits]
        if not ups:
            return alloc
        item, o = rng.choice(ups)
        alloc[item] = o


_LEGACY = ("the pydoc corpus's first 80% (before the calibration/evaluation split; "
           "eval.corpus.legacy_calibration_text())")


def _text_source(text: str | None) -> dict[str, str]:
    """What a calibration record names as its text."""
    return {"text": CALIBRATION_SOURCE if text is None else "text given to calibrate()"}


def _calibrated_on(cal: dict[str, Any]) -> str:
    """The digest of the text a profile was calibrated on; profiles written before texts were recorded read the
    pydoc corpus's first 80%."""
    return cal.get("text_sha256") or text_digest(legacy_calibration_text())


def _reuse_sensitivity(path, model, report, base, means) -> dict[tuple[int, int, str], float]:
    """Sensitivities measured by an earlier calibration with the same model and settings."""
    old = load_profile(path)
    old.check_model(model, f"profile {path}")
    cal = old.calibration
    for key in ("samples", "context", "scored", "seed"):
        if cal.get(key) != report[key]:
            raise ProfileError(f"profile {path} was calibrated with {key}={cal.get(key)!r}, this run uses "
                               f"{report[key]!r}: its sensitivities do not apply")
    if _calibrated_on(cal) != report["text_sha256"]:
        raise ProfileError(f"profile {path} was calibrated on other text ({cal.get('text', _LEGACY)}) than this "
                           f"run ({report['text']}): its sensitivities do not apply")
    if old.options != base:
        raise ProfileError(f"profile {path} was calibrated with options {old.options}, this run uses {base}")
    raw = (cal.get("greedy") or {}).get("sensitivity")
    if not isinstance(raw, dict):
        raise ProfileError(f"profile {path} holds no measured sensitivities (it was not calibrated with greedy)")
    sens = {}
    for key, value in raw.items():
        i, t, m = key.split("/")
        sens[(int(i), "kv".index(t), m)] = float(value)
    n_layers = _geometry(model)[0]
    missing = [f"{i}/{t}/{m}" for i in range(n_layers) for t in "kv" for m in means if (i, "kv".index(t), m) not in sens]
    if missing:
        raise ProfileError(f"profile {path} lacks sensitivities for {', '.join(missing[:4])}...")
    return sens


def calibrate(
    model: Any = "smollm2-135m",
    *,
    method: str = "tada",
    tokenizer: Any = None,
    target_ratio: float | None = None,
    target_bytes: int | None = None,
    target_bits: float | None = None,
    budget_context: int = 2048,
    search: str = "both",
    trials: int = 16,
    samples: int | None = None,
    context: int | None = None,
    scored: int = 32,
    bits: Sequence[int] = CHOICES,
    options: dict[str, Any] | None = None,
    text: str | None = None,
    seed: int = 0,
    sensitivity_from: str | Path | None = None,
    output: str | Path | None = None,
    progress: bool = True,
    key_space: str = "post_rope",
    rotation: bool = False,
    share_prefill: bool = True,
) -> Profile:
    """Per-layer bits for keys and values of `tada` under a budget; returns (and writes) the profile.

    `method="tale"` / `"lowrank"` (per-head) or `"dynakv"` (joint) fits the low-rank bases those methods read
    instead, on `samples` windows (default 3) of `context` tokens (default 4096: post-RoPE keys are only
    well described at the positions the basis saw); their budget is the method's own
    `target_ratio` option, so no target is given here.

    Exactly one target: `target_ratio` (bytes / 16-bit bytes at `budget_context` tokens), `target_bytes` (at
    `budget_context` tokens) or `target_bits` (the bytes of uniform `target_bits`-bit `tada` without a mean, which
    must be one of `bits`). `options` are tada options kept fixed (the exact window defaults to float16 here).
    `rotation`: a layer's keys or values may also take a rotation codec (randomized Hadamard + Lloyd-Max codes at
    2-4 bits, `turboquant`'s) where that scores better for its bytes.
    `sensitivity_from`: a profile calibrated with the same settings on the same model
    whose measured sensitivities are reused (a new budget then costs seconds, not minutes).
    `share_prefill`: each calibration window's context is run through the model once and every allocation's cache
    is built from that record (exact: tada attends the prompt in full precision); False runs it per allocation.
    """
    from tqdm.auto import tqdm

    given = [t for t in (target_ratio, target_bytes, target_bits) if t is not None]
    if method in KINDS:
        return _calibrate_bases(model, tokenizer, method, given, samples or 3, context or 4096, text, output,
                                progress, key_space)
    if method != "tada":
        raise ValueError(f"calibrate: method must be tada or one of {', '.join(KINDS)}, got {method!r}")
    samples, context = samples or 2, context or 512
    if len(given) != 1:
        raise ValueError("give exactly one target: target_ratio, target_bytes or target_bits")
    if search not in ("greedy", "random", "both"):
        raise ValueError(f"search must be one of greedy, random, both; got {search!r}")
    for b in bits:
        if b not in BITS:
            raise ValueError(f"bits must be chosen from {BITS}, got {b!r}")
    if trials < 1 or samples < 1 or scored < 2 or context < 64:
        raise ValueError("trials and samples must be >= 1, scored >= 2 and context >= 64")
    # the window and sinks are held in 16 bits by default: the budget is a fraction of a 16-bit cache, and an fp32
    # window would spend ~0.045 of a 0.27 budget at 2k tokens on bytes no 16-bit deployment holds
    base = {"exact_dtype": "float16", **{k: v for k, v in (options or {}).items()
                                          if k not in ("bits", "key_bits", "value_bits", "mean", "profile",
                                                       "rotate")}}
    build_method("tada", **base)  # unknown options fail here
    if isinstance(model, str):
        model, tokenizer = load_model(model)
    elif tokenizer is None:
        raise ValueError("a loaded model needs its tokenizer: calibrate(model, tokenizer=tok, ...)")
    refuse_sharded(model, "calibration")
    n_layers, kv_heads, _ = _geometry(model)
    if target_ratio is not None and not 0 < target_ratio:
        raise ValueError(f"target_ratio must be > 0, got {target_ratio}")
    _refuse_lossless_target(model, base, n_layers, budget_context, target_ratio, target_bytes, target_bits)
    opts = _options(kv_heads, sorted(set(bits)), rotation)
    start = time.perf_counter()
    costs = ByteModel(model, base, opts, budget_context)
    if target_ratio is not None:
        budget = int(target_ratio * costs.fp16)
    elif target_bytes is not None:
        budget = int(target_bytes)
    else:
        if target_bits not in bits:
            raise ValueError(f"target_bits must be one of the allowed bits {tuple(bits)}, got {target_bits}")
        budget = costs.total({(i, t): Option(int(target_bits)) for i in range(n_layers) for t in (0, 1)})
    source = _text_source(text)
    text = text if text is not None else calibration_text()
    scorer = Scorer(model, tokenizer, text, base, samples, context, scored, seed, share_prefill)
    items = [(i, t) for i in range(n_layers) for t in (0, 1)]
    rng = random.Random(seed)
    report: dict[str, Any] = {"budget_bytes": budget, "budget_context": budget_context, "fp16_bytes": costs.fp16,
                              "samples": samples, "context": context, "scored": scored, "seed": seed,
                              "shared_prefill": share_prefill, **source, "text_sha256": text_digest(text)}
    results = []

    if search in ("greedy", "both"):
        t0 = time.perf_counter()
        variants = sorted({o.variant for o in opts})
        if sensitivity_from is not None:
            sens = _reuse_sensitivity(sensitivity_from, model, report, base, variants)
        else:
            sens = {}
            full = {item: Option(16) for item in items}
            bar = tqdm(total=len(items) * len(variants), desc="sensitivity", unit="eval", disable=not progress)
            for item in items:
                for variant in variants:
                    trial = dict(full)
                    trial[item] = Option(2, "none", True) if variant == "rotate" else Option(2, variant)
                    sens[(*item, variant)] = max(scorer(trial), 1e-9)
                    bar.update()
            bar.close()
        alloc = allocate(sens, costs, opts, budget)
        score = scorer(alloc)
        results.append(("greedy", alloc, score))
        report["greedy"] = {"kl": score, "seconds": round(time.perf_counter() - t0, 1),
                            "sensitivity": {f"{i}/{'kv'[t]}/{m}": s for (i, t, m), s in sens.items()},
                            "sensitivity_from": str(sensitivity_from) if sensitivity_from else None}
    if search in ("random", "both"):
        t0 = time.perf_counter()
        seeded = results[0][1] if results else None
        best = None
        for trial_no in tqdm(range(trials), desc="random search", unit="trial", disable=not progress):
            if seeded is not None:  # local search around the sensitivity allocation: move a few choices
                alloc = dict(seeded if best is None else best[0])
                for item in rng.sample(items, k=min(4, len(items))):
                    alloc[item] = rng.choice(opts)
            else:
                alloc = {item: rng.choice(opts) for item in items}
            alloc = _repair(alloc, costs, opts, budget, rng)
            score = scorer(alloc)
            if best is None or score < best[1]:
                best = (alloc, score)
        results.append(("random" if seeded is None else "greedy+random", best[0], best[1]))
        report["random"] = {"kl": best[1], "seconds": round(time.perf_counter() - t0, 1), "trials": trials,
                            "seeded_with_greedy": seeded is not None}
    name, alloc, score = min(results, key=lambda r: r[2])
    profile = _profile(model, base, alloc, n_layers)
    spent, ratio = profile_ratio(model, profile, budget_context)
    report.update({"chosen": name, "kl": score, "bytes": spent, "evaluations": scorer.evaluations,
                   "seconds": round(time.perf_counter() - start, 1)})
    profile.predicted_ratio, profile.calibration = ratio, report
    if output is not None:
        profile.save(output)
    return profile


def _refuse_lossless_target(model, base: dict[str, Any], n_layers: int, budget_context: int,
                            target_ratio: float | None, target_bytes: int | None, target_bits: float | None) -> None:
    """Refuse, before any text is read or any KL measured, a target that 16 bits on every layer already meet (the
    window and sinks counted): there is nothing to choose, and a ratio of 3 is more likely a slip for 0.3."""
    sixteen = ByteModel(model, base, [Option(16)], budget_context)  # random tensors through the cache: milliseconds
    lossless = sixteen.total({(i, t): Option(16) for i in range(n_layers) for t in (0, 1)})
    if target_ratio is not None:
        budget, asked = int(target_ratio * sixteen.fp16), f"--target-ratio {target_ratio:g}"
    elif target_bytes is not None:
        budget, asked = int(target_bytes), f"--target-bytes {int(target_bytes)}"
    else:
        budget, asked = (lossless if target_bits == 16 else -1), f"--target-bits {target_bits:g}"
    if budget >= lossless:
        raise ValueError(
            f"{asked}: 16 bits on every layer already meet it ({lossless} bytes, {lossless / sixteen.fp16:.3f} of a "
            f"16-bit cache at {budget_context} tokens, window and sinks included), so there is nothing to calibrate: "
            f"use the uncompressed cache (method full), or give a target below that share, e.g. --target-ratio 0.27")


def _calibrate_bases(model, tokenizer, method, given, samples, context, text, output, progress,
                     key_space) -> Profile:
    if given:
        raise ValueError(f"calibrate --method {method} fits bases only: its budget is the method's target_ratio "
                         f"option (make_cache(model, '{method}', target_ratio=...)), not a calibration target")
    if isinstance(model, str):
        model, tokenizer = load_model(model)
    elif tokenizer is None:
        raise ValueError("a loaded model needs its tokenizer: calibrate(model, tokenizer=tok, ...)")
    source = _text_source(text)
    text = text if text is not None else calibration_text()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    profile = bases_profile(model, ids, method=method, samples=samples, context=context, key_space=key_space,
                            progress=progress)
    profile.calibration.update({**source, "text_sha256": text_digest(text)})
    if output is not None:
        profile.save(output)
    return profile
