"""Joint calibration: which tokens stay and how many bits they keep, chosen together per layer under one byte budget.

`kvshrink calibrate --method layered --target-ratio 0.10` measures, for every layer, what each candidate costs in
quality when only that layer takes it (every other layer exact, every token kept):
- a key codec (grouped per-channel codes, rotated Lloyd-Max codes, exact) and a value codec (grouped per-token,
  rotated, exact), each measured with the other side exact;
- a retention: the share of the prompt's tokens a prompt-only token policy keeps (SnapKV's observation window by
  default), measured with exact codecs.
Quality is the mean KL of next-token distributions against the uncompressed cache on two kinds of samples, both
cut from calibration text that no evaluation prompt is built from (`eval.corpus.calibration_text()`):
- plain text: a context, then `scored` tokens of continuation (what `calibrate --method tada` scores);
- a retrieval probe: the same kind of text with one sentence planted at a random depth that names an invented
  vault's passphrase (random digits), a question about it at the end, the answer scored. Its wording, filler and
  answer format are unlike the RULER-style generator's (`eval/ruler.py`), so the profile is not tuned to the
  benchmark that reports it.
A layer's combination (key codec, value codec, retention) is predicted to cost the sum of its three measured KLs
(interactions between eviction and coding are not modelled: the chosen profile's KL is measured and reported beside
the prediction). Bytes are real: every combination is built as one cache layer holding `budget_context` random
tokens (a policy scoring them with random queries) and its held tensors are counted. The allocation minimises the
predicted KL under the budget (a Lagrangian sweep over the per-layer choices, then the best KL-per-byte upgrades
that still fit), is written as a version-3 `layered` profile (`make_cache(model, profile=PATH)` builds it), and is
measured against every uniform pairing of the candidates that fits the same budget.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import DynamicCache

from .calibrate import calibration_windows, fill_random
from .codecs.base import codec_from_spec
from .distributed import refuse_sharded
from .eval.corpus import CALIBRATION_SOURCE, calibration_text, text_digest
from .eval.prefill import record_prefill, replay, replayable
from .eval.scoring import score_continuation_after
from .layers.composed import ComposedLayer
from .methods.build import build_method
from .methods.eviction import EvictionMethod
from .methods.layered import Layered
from .models import head_dim_of, load_model, text_config
from .profile import LayerRecipe, Profile, ProfileError, fingerprint, load_profile

#: key codecs tried per layer by default (the last is lossless)
KEY_CODECS = ("grouped:bits=2,axis=channel", "grouped:bits=3,axis=channel", "grouped:bits=4,axis=channel",
              "rotated:bits=2", "rotated:bits=3", "rotated:bits=4", "exact")
#: value codecs tried per layer by default
VALUE_CODECS = ("grouped:bits=2,axis=token", "grouped:bits=3,axis=token", "grouped:bits=4,axis=token",
                "rotated:bits=2", "rotated:bits=3", "rotated:bits=4", "exact")
#: shares of the tokens a layer's policy keeps (1.0: no policy, every token)
SHARES = (1.0, 0.5, 0.25, 0.125)
#: token policies a layer may take: prompt-only ones, whose kept tokens can be coded in groups along tokens
POLICIES = ("snapkv",)
#: options a retention policy may carry (`snapkv:heads=adaptive`: AdaKV's per-head budgets inside each layer)
POLICY_OPTIONS = ("heads", "floor", "observe")

_SYLLABLES = ("bra", "cel", "dov", "fen", "gar", "hul", "jas", "kor", "lim", "mab", "nor", "pel", "quin", "ros",
              "sul", "tam", "ulv", "ves", "wyn", "zed")


@dataclass(frozen=True)
class Combo:
    """One layer's choice: key codec spec, value codec spec, share of tokens kept."""

    key: str
    value: str
    share: float

    def recipe(self, policy: str) -> LayerRecipe:
        if self.share >= 1:
            return LayerRecipe(self.key, self.value, None)
        return LayerRecipe(self.key, self.value, f"{policy}{',' if ':' in policy else ':'}budget={self.share:g}")


def check_policy(policy: str) -> None:
    """A retention policy for joint calibration: a prompt-only policy (its kept tokens may be coded in groups along
    tokens) with at most the options in POLICY_OPTIONS; a clear error otherwise."""
    from .spec import parse

    try:
        (part,) = parse(policy)
    except ValueError as e:
        raise ValueError(f"policy {policy!r}: {e}") from None
    if part.name not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)} (prompt-only: the kept tokens may be coded "
                         f"in groups along tokens), with options {', '.join(POLICY_OPTIONS)}; got {policy!r}")
    extra = [k for k, _ in part.options if k not in POLICY_OPTIONS]
    if extra:
        raise ValueError(f"policy {policy!r}: option {extra[0]!r} is set by the calibration or not allowed here; "
                         f"allowed: {', '.join(POLICY_OPTIONS)}")
    build_method(Combo("exact", "exact", 0.5).recipe(policy).policy)  # option values are checked here


@dataclass
class Sample:
    """A calibration sample: context ids [1, N] and the scored ids [1, M] after it."""

    context: torch.Tensor
    scored: torch.Tensor
    kind: str  # "text" or "probe"


PROBE_STYLES = ("digits", "hex", "both")


def probe_samples(tokenizer, text: str, count: int, context: int, seed: int, style: str = "digits") -> list[Sample]:
    """Retrieval probes: `context` tokens of `text` with a planted passphrase sentence, a question, the answer.
    style: the passphrase's alphabet, "digits" (three groups of 3 digits), "hex" (four groups of 4 hex digits: many
    rare tokens, the kind of string a 2-bit code or a thin token budget loses first) or "both" (alternating)."""
    if style not in PROBE_STYLES:
        raise ValueError(f"probe style must be one of {', '.join(PROBE_STYLES)}, got {style!r}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    rng = random.Random(f"joint-probe:{seed}")
    out = []
    for n in range(count):
        vault = "".join(rng.choice(_SYLLABLES) for _ in range(3)).capitalize()
        if style == "hex" or (style == "both" and n % 2):
            phrase = "-".join("".join(rng.choice("0123456789abcdef") for _ in range(4)) for _ in range(4))
        else:
            phrase = "-".join(str(rng.randint(100, 999)) for _ in range(3))
        fact = tokenizer(f"\n(Aside: the passphrase of the {vault} vault is {phrase}.)\n",
                         add_special_tokens=False).input_ids
        question = tokenizer(f"\n\nWhat is the passphrase of the {vault} vault? The passphrase of the {vault} vault "
                             "is", add_special_tokens=False).input_ids
        answer = tokenizer(f" {phrase}.", add_special_tokens=False).input_ids
        filler = context - len(fact) - len(question)
        if filler < 16:
            raise ValueError(f"joint calibration: a context of {context} tokens leaves no room for a probe's text")
        if ids.shape[0] < filler + 1:
            raise ValueError(f"the calibration text has {ids.shape[0]} tokens; a probe needs {filler}")
        start = rng.randrange(0, ids.shape[0] - filler)
        body = ids[start:start + filler].tolist()
        at = rng.randint(filler // 10, filler * 9 // 10)
        ctx = body[:at] + fact + body[at:] + question
        out.append(Sample(torch.tensor([ctx]), torch.tensor([answer]), "probe"))
    return out


def text_samples(tokenizer, text: str, count: int, context: int, scored: int, seed: int) -> list[Sample]:
    """Plain-text samples: `context` tokens, then `scored` tokens of continuation."""

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return [Sample(c, s, "text") for c, s in calibration_windows(ids, count, context, scored, seed)]


def combo_bytes(model, combo: Combo, policy: str, context: int, window: int, sinks: int,
                exact_dtype: torch.dtype) -> int:
    """Bytes one layer holds with `combo` after a prompt of `context` random tokens (a policy scores them with
    random queries): measured on the tensors held."""
    cfg = text_config(model.config)
    d, h = head_dim_of(cfg), cfg.num_key_value_heads
    hq = cfg.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, h, context, d, generator=gen)
    v = torch.randn(1, h, context, d, generator=gen)
    key, value = codec_from_spec(combo.key), codec_from_spec(combo.value).for_values()  # as a profile builds them
    if combo.share >= 1:
        layer = ComposedLayer(key, value, window=window, sinks=sinks, exact_dtype=exact_dtype, layer_idx=0)
        layer.update(k, v)
        return layer.nbytes()
    method = build_method(combo.recipe(policy).policy)
    method.prepare(model.config)
    layer = method.scored_layer(0, key, value, exact_dtype, window, sinks)
    layer.update(k, v)
    layer.attend(torch.randn(1, hq, context, d, generator=gen), None, d ** -0.5)
    return layer.nbytes()


class _Measure:
    """KL(uncompressed || allocation) per sample, through the cache, each sample's prefill recorded once."""

    def __init__(self, model, samples: list[Sample], options: dict[str, Any]):
        self.model, self.samples, self.options = model, samples, options
        self.records = [record_prefill(model, s.context) for s in samples]
        self.refs = [self._logprobs(DynamicCache(config=model.config), i) for i in range(len(samples))]
        self.evaluations = 0

    def _logprobs(self, cache, i: int) -> torch.Tensor:
        if not replayable(cache, self.samples[i].context.shape[1]):
            raise RuntimeError("joint calibration: a candidate's cache cannot be built from the recorded prefill")
        return score_continuation_after(self.model, cache, replay(self.records[i], cache), self.samples[i].scored)

    def __call__(self, recipes: list[LayerRecipe]) -> dict[str, float]:
        """Mean KL per sample kind ("text", "probe") and over all samples ("all")."""
        profile = Profile(fingerprint(self.model), "layered", dict(self.options), recipes)
        method = Layered.of(profile)
        by_kind: dict[str, list[float]] = {}
        for i, ref in enumerate(self.refs):
            lp = self._logprobs(method.make_cache(self.model), i)
            kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
            by_kind.setdefault(self.samples[i].kind, []).append(max(kl, 0.0))
        self.evaluations += 1
        out = {kind: sum(v) / len(v) for kind, v in by_kind.items()}
        out["all"] = sum(sum(v) for v in by_kind.values()) / sum(len(v) for v in by_kind.values())
        return out


def allocate(kl: list[dict[Combo, float]], cost: dict[Combo, int], budget: int) -> list[Combo]:
    """Per-layer combos minimising the summed predicted KL with total bytes <= budget: the cheapest choice of a
    Lagrangian sweep that fits, then the best KL-per-byte single-layer changes while any fits."""
    combos = list(cost)

    def pick(lam: float) -> list[Combo]:
        return [min(combos, key=lambda c: (layer[c] + lam * cost[c], cost[c])) for layer in kl]

    def spent(choice: list[Combo]) -> int:
        return sum(cost[c] for c in choice)

    cheapest = [min(combos, key=lambda c: (cost[c], layer[c])) for layer in kl]
    if spent(cheapest) > budget:
        raise ValueError(f"the budget of {budget} bytes is below the cheapest allocation ({spent(cheapest)} bytes): "
                         "raise the target or allow cheaper candidates (lower shares, fewer bits)")
    lo, hi = 0.0, 1.0
    while spent(pick(hi)) > budget:
        hi *= 4
        if hi > 1e12:
            break
    best = pick(hi) if spent(pick(hi)) <= budget else cheapest
    for _ in range(60):
        mid = (lo + hi) / 2
        choice = pick(mid)
        if spent(choice) <= budget:
            best, hi = choice, mid
        else:
            lo = mid
    best = list(best)
    total = spent(best)
    while True:
        move = None
        for i, layer in enumerate(kl):
            for c in combos:
                dc, dk = cost[c] - cost[best[i]], layer[best[i]] - layer[c]
                if dk > 0 and total + dc <= budget:
                    gain = dk / dc if dc > 0 else math.inf
                    if move is None or gain > move[0]:
                        move = (gain, i, c, dc)
        if move is None:
            return best
        _, i, c, dc = move
        best[i] = c
        total += dc


def calibrate_joint(
    model: Any = "smollm2-135m",
    *,
    tokenizer: Any = None,
    target_ratio: float,
    budget_context: int = 4096,
    context: int = 2048,
    samples: int = 2,
    probes: int = 2,
    probe_style: str = "digits",
    scored: int = 32,
    key_codecs: Sequence[str] = KEY_CODECS,
    value_codecs: Sequence[str] = VALUE_CODECS,
    shares: Sequence[float] = SHARES,
    policy: str = "snapkv",
    window: int = 32,
    sinks: int = 4,
    text: str | None = None,
    seed: int = 0,
    sensitivity_from: str | Path | None = None,
    output: str | Path | None = None,
    progress: bool = True,
) -> Profile:
    """Per-layer codecs and retention under `target_ratio` of a 16-bit cache at `budget_context` tokens; returns
    (and writes) a `layered` profile whose calibration record holds every measurement."""
    from tqdm.auto import tqdm

    if not 0 < target_ratio < 1:
        raise ValueError(f"target_ratio must be in (0, 1) (a share of the 16-bit cache), got {target_ratio}")
    check_policy(policy)
    if not shares or any(not 0 < s <= 1 for s in shares):
        raise ValueError(f"shares must be fractions in (0, 1], got {list(shares)}")
    if samples < 0 or probes < 0 or samples + probes < 1:
        raise ValueError(f"samples and probes must be >= 0 and at least one sample in all, got {samples}, {probes}")
    if probe_style not in PROBE_STYLES:
        raise ValueError(f"probe_style must be one of {', '.join(PROBE_STYLES)}, got {probe_style!r}")
    if scored < 2 or context < 64:
        raise ValueError(f"scored must be >= 2 and context >= 64, got {scored} and {context}")
    for what, given in (("key", key_codecs), ("value", value_codecs)):
        if not given:
            raise ValueError(f"give at least one {what} codec")
        for spec in given:
            codec_from_spec(spec)  # unknown codecs and options fail here
    shares = sorted(set(float(s) for s in shares), reverse=True)
    if isinstance(model, str):
        model, tokenizer = load_model(model)
    elif tokenizer is None:
        raise ValueError("a loaded model needs its tokenizer: calibrate_joint(model, tokenizer=tok, ...)")
    refuse_sharded(model, "joint calibration")
    n_layers = text_config(model.config).num_hidden_layers
    options = {"window": window, "sinks": sinks, "exact_dtype": "float16"}
    start = time.perf_counter()

    exact = Combo("exact", "exact", 1.0)
    combos = [Combo(k, v, s) for k in key_codecs for v in value_codecs for s in shares]
    cost = {c: combo_bytes(model, c, policy, budget_context, window, sinks, torch.float16)
            for c in tqdm(combos, desc="bytes", unit="combo", disable=not progress)}
    fp16 = 2 * 2 * text_config(model.config).num_key_value_heads * head_dim_of(text_config(model.config)) \
        * budget_context
    lossless = combo_bytes(model, exact, policy, budget_context, window, sinks, torch.float16)
    if target_ratio * fp16 >= lossless:
        raise ValueError(f"--target-ratio {target_ratio:g}: every layer exact already meets it "
                         f"({lossless / fp16:.3f} of a 16-bit cache); nothing to calibrate")
    budget = int(target_ratio * fp16 * n_layers)

    source = {"text": CALIBRATION_SOURCE if text is None else "text given to calibrate_joint()"}
    text = text if text is not None else calibration_text()
    pool = text_samples(tokenizer, text, samples, context, scored, seed) if samples else []
    pool += probe_samples(tokenizer, text, probes, context, seed, probe_style)
    measure = _Measure(model, pool, options)

    every = [exact.recipe(policy)] * n_layers
    base_kl = measure(every)["all"]  # 0 up to the arithmetic of replay vs a plain cache
    singles: dict[tuple[int, str, str], float] = {}
    trials = [("key", k) for k in key_codecs if k != "exact"] + [("value", v) for v in value_codecs if v != "exact"] \
        + [("share", f"{s:g}") for s in shares if s < 1]
    settings = {"samples": samples, "probes": probes, "context": context, "scored": scored, "seed": seed,
                "policy": policy, "text_sha256": text_digest(text)}
    if probe_style != "digits":  # recorded when not the first probes' style (their profiles' settings stay as written)
        settings["probe_style"] = probe_style
    if sensitivity_from is not None:  # what an earlier calibration measured is reused; new candidates are measured
        singles = _reuse(sensitivity_from, model, options, settings, n_layers, trials)
    missing = [(i, what, choice) for i in range(n_layers) for what, choice in trials if (i, what, choice) not in singles]
    bar = tqdm(total=len(missing), desc="sensitivity", unit="eval", disable=not progress or not missing)
    for i, what, choice in missing:
        c = Combo(choice if what == "key" else "exact", choice if what == "value" else "exact",
                  float(choice) if what == "share" else 1.0)
        recipes = list(every)
        recipes[i] = c.recipe(policy)
        singles[(i, what, choice)] = max(measure(recipes)["all"] - base_kl, 0.0)
        bar.update()
    bar.close()

    def predicted(i: int, c: Combo) -> float:
        return (singles.get((i, "key", c.key), 0.0) + singles.get((i, "value", c.value), 0.0)
                + singles.get((i, "share", f"{c.share:g}"), 0.0))

    kl = [{c: predicted(i, c) for c in combos} for i in range(n_layers)]
    chosen = allocate(kl, cost, budget)
    recipes = [c.recipe(policy) for c in chosen]
    joint_kl = measure(recipes)

    uniform = []
    for c in combos:
        if cost[c] * n_layers <= budget and c != exact:
            uniform.append((c, cost[c] * n_layers))
    # the uniform pairings that spend the most of the budget are the fair comparison; measure the top few
    uniform.sort(key=lambda x: (-x[1], sum(kl[i][x[0]] for i in range(n_layers))))
    uniform_rows = []
    for c, b in tqdm(uniform[:6], desc="uniform pairings", unit="eval", disable=not progress):
        r = measure([c.recipe(policy)] * n_layers)
        uniform_rows.append({"key": c.key, "value": c.value, "share": c.share, "ratio": b / (fp16 * n_layers),
                             "kl": r})
    spent = sum(cost[c] for c in chosen)
    report = {
        "target_ratio": target_ratio, "budget_bytes": budget, "budget_context": budget_context,
        "fp16_bytes": fp16 * n_layers, "predicted_bytes": spent, "predicted_ratio": spent / (fp16 * n_layers),
        "samples": samples, "probes": probes, "probe_style": probe_style, "context": context, "scored": scored,
        "seed": seed, "policy": policy, **source, "text_sha256": text_digest(text),
        "candidates": {"key": list(key_codecs), "value": list(value_codecs), "shares": list(shares)},
        "combo_bytes": {f"{c.key} | {c.value} | {c.share:g}": b for c, b in cost.items()},
        "sensitivity": {f"{i}/{w}/{c}": v for (i, w, c), v in singles.items()},
        "sensitivity_from": str(sensitivity_from) if sensitivity_from else None,
        "baseline_kl": base_kl,
        "predicted_kl": sum(kl[i][c] for i, c in enumerate(chosen)),
        "kl": joint_kl, "uniform": uniform_rows,
        "evaluations": measure.evaluations, "seconds": round(time.perf_counter() - start, 1),
    }
    profile = Profile(fingerprint(model), "layered", options, recipes, None, report)
    measured = fill_random(Layered.of(profile).make_cache(model), model, budget_context).memory_report()["ratio"]
    profile.predicted_ratio = measured
    report["measured_ratio"] = measured
    if measured > target_ratio + 1e-9:
        raise RuntimeError(f"joint calibration: the chosen profile holds {measured:.4f} of a 16-bit cache at "
                           f"{budget_context} tokens, over the target {target_ratio:g} (a byte model error)")
    if output is not None:
        profile.save(output)
    return profile


def _reuse(path, model, options: dict[str, Any], settings: dict[str, Any], n_layers: int,
           trials: list[tuple[str, str]]) -> dict[tuple[int, str, str], float]:
    """The single-layer KLs an earlier joint calibration measured with the same model, text and settings."""
    old = load_profile(path)
    old.check_model(model, f"profile {path}")
    cal = old.calibration
    if old.method != "layered" or "sensitivity" not in cal:
        raise ProfileError(f"profile {path} holds no joint-calibration sensitivities (calibrate --method layered)")
    for key, value in settings.items():
        if cal.get(key) != value:
            raise ProfileError(f"profile {path} was calibrated with {key}={cal.get(key)!r}, this run uses {value!r}: "
                               "its sensitivities do not apply")
    if old.options != options:
        raise ProfileError(f"profile {path} was calibrated with options {old.options}, this run uses {options}")
    return {(i, what, choice): float(cal["sensitivity"][f"{i}/{what}/{choice}"])
            for i in range(n_layers) for what, choice in trials if f"{i}/{what}/{choice}" in cal["sensitivity"]}
