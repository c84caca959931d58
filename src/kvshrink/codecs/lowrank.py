"""Low-rank storage of keys and values: an orthonormal basis per group of heads, tokens kept as their leading
coefficients, at a rank and bit width chosen per token ("levels").

- A basis is fitted once (uncentred PCA of calibration keys or values: eigenvectors of the Gram matrix, by
  decreasing energy), so every rank r is a prefix of the same basis and lowering a token's rank is dropping its
  trailing coefficients.
- Coefficients are divided by their calibration RMS (`sigma`) before they are quantized, so every coefficient of a
  token has about the same spread and one group of codes per token and level suffices; attention folds `sigma`
  into the projected query (no per-token cost).
- Codes run along a token's coefficients (`axis="token"`: one fp16 scale and zero per token and code group) or,
  as KIVI's keys, along `coeff_group` tokens of each coefficient (`axis="channel"`: a scale and zero per
  coefficient and group of tokens). A channel-coded level stores whole groups only; its newest, not yet full group
  waits as exact fp16 coefficients (`pending`, reported with the window), read after the stored tokens.
- A "group" is the set of KV heads sharing one basis: one head (TALE, per-head bases) or all heads of a layer
  (DynaKV, a joint basis over the concatenated heads). A group row is stored as a vector of `heads x head_dim`.

`LevelStore` keeps the tokens of a layer's keys (or values) in one quantized store per level; the layer holds the
uint8 level map (token order) shared by its keys and values. Every token of a level is held in that level's own
packed tensor, so a lower rank costs fewer bytes, never zero padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .packing import packed_size
from .quant import QUANT_BITS, GroupCodec
from .store import PagedStore


def fit_basis(gram: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Basis and coefficient RMS from a Gram matrix sum_t x_t x_t^T over `count` vectors.

    gram: [G, D, D]. Returns (U [G, D, D] with orthonormal columns by decreasing energy, sigma [G, D] the RMS of
    each coefficient over the fitted vectors, floored so that no coefficient divides by zero).
    """
    if gram.dim() != 3 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"gram must be [groups, D, D], got {tuple(gram.shape)}")
    if count < 1:
        raise ValueError(f"a basis needs at least one fitted vector, got count={count}")
    evals, evecs = torch.linalg.eigh(gram.double())
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    sigma = (evals.clamp_min(0) / count).sqrt()
    sigma = torch.maximum(sigma, sigma[..., :1] * 1e-4 + 1e-8)
    return evecs.float(), sigma.float()


def energy(sigma: torch.Tensor) -> torch.Tensor:
    """Fraction of the fitted vectors' energy captured by ranks 1..D ([G, D], cumulative)."""
    e = sigma.double() ** 2
    return (e.cumsum(-1) / e.sum(-1, keepdim=True)).float()


@dataclass(frozen=True)
class Level:
    """One storage level: `rank` leading coefficients at `bits` bits (16: fp16 coefficients). `DROP` (rank 0) is
    the level of evicted tokens: nothing stored, never attended (SnapKV-style eviction inside `tale`/`dynakv`)."""

    rank: int
    bits: int

    @property
    def dropped(self) -> bool:
        return self.rank == 0

    def spec(self, group: int, center: str = "none", axis: str = "token", coeff_group: int = 32) -> GroupCodec:
        """The codec of this level's store: per-token groups of `group` coefficients, or per-coefficient groups of
        `coeff_group` tokens (`axis="channel"`; 16 bits has no groups)."""
        if axis == "channel" and self.bits != 16:
            return GroupCodec(self.bits, coeff_group, "channel", center)
        return GroupCodec(self.bits, min(group, self.rank), "token", center)


DROP = Level(0, 0)
CENTERS = ("none", "channel")  # what a level's codes subtract before quantizing (`LevelStore`)
AXES = ("token", "channel")  # what a level's code groups run along (`LevelStore`, the methods' `coeff_axis`)


def check_coeff_codes(axis: str, coeff_group: int, name: str) -> None:
    """Raise unless `axis` is one of AXES and `coeff_group` a positive integer."""
    if axis not in AXES:
        raise ValueError(f"{name}: coeff_axis must be one of {', '.join(AXES)}, got {axis!r}")
    if isinstance(coeff_group, bool) or not isinstance(coeff_group, int) or coeff_group < 1:
        raise ValueError(f"{name}: coeff_group must be a positive integer (tokens per per-channel scale), "
                         f"got {coeff_group!r}")


def parse_levels(text: str, dim: int | None = None) -> tuple[Level, ...]:
    """'r64b4/r32b4/r16b3' -> levels by decreasing rank; `dim` (the basis size) bounds the ranks."""
    import re

    levels = []
    for item in filter(None, (s.strip() for s in text.split("/"))):
        m = re.fullmatch(r"r(\d+)b(\d+)", item)
        if m is None:
            raise ValueError(f"levels: {item!r} is not r<rank>b<bits> (levels are written like r32b4/r16b4)")
        level = Level(int(m.group(1)), int(m.group(2)))
        if level.rank < 1 or (dim is not None and level.rank > dim):
            raise ValueError(f"levels: rank {level.rank} must be between 1 and {dim or 'the head dim'}")
        if level.bits not in QUANT_BITS:
            raise ValueError(f"levels: bits {level.bits} must be one of {QUANT_BITS}")
        levels.append(level)
    if not levels:
        raise ValueError("levels: give at least one level, for example r64b4/r32b4/r16b4")
    ranked = sorted(levels, key=lambda lv: (-lv.rank, -lv.bits))
    if len(set(ranked)) != len(ranked):
        raise ValueError(f"levels: {text!r} repeats a level")
    return tuple(ranked)


def level_token_bytes(level: Level, group: int, axis: str = "token", coeff_group: int = 32) -> float:
    """Bytes one token of one group row costs at `level`: codes plus an fp16 scale and zero per code group (per
    token: one per `group` coefficients; per channel: one per coefficient and `coeff_group` tokens, so
    4 * rank / coeff_group bytes a token, a fraction). The pending group of a channel-coded level is not counted
    (at most `coeff_group - 1` tokens a level, held exact)."""
    if level.dropped:
        return 0
    if level.bits == 16:
        return 2 * level.rank
    if axis == "channel":
        return packed_size(level.rank, level.bits) + 4 * level.rank / coeff_group
    g = min(group, level.rank)
    return (level.rank // g) * (packed_size(g, level.bits) + 4)


class LevelStore:
    """The compressed tokens of one tensor (keys or values) of one layer, shaped [batch, groups, tokens, rank_l]
    per level, in the coordinates of a fixed basis. Which level holds each token is the `level_map` [batch, groups,
    tokens] (uint8, token order) that the owner keeps and passes in.

    With `axis="channel"` a coded level's store takes tokens in whole groups of `coeff_group`; the rest of its
    tokens, fewer than a group and the newest of the level, wait in `pending[l]` [batch, groups, p, rank_l] as exact
    fp16 coefficients, and every reader returns them after the stored ones (token order within the level).
    """

    def __init__(self, levels: tuple[Level, ...], group: int, name: str = "tensor", center: str = "none",
                 axis: str = "token", coeff_group: int = 32):
        if center not in CENTERS:
            raise ValueError(f"{name}: center must be one of {CENTERS}, got {center!r}")
        check_coeff_codes(axis, coeff_group, name)
        for lv in levels:
            if axis == "token" and not lv.dropped and lv.bits != 16 and lv.rank % min(group, lv.rank):
                raise ValueError(f"{name}: code group {group} does not divide rank {lv.rank}")
        if any(lv.dropped for lv in levels[:-1]):
            raise ValueError(f"{name}: the dropped level (rank 0) must be the last, got {levels}")
        self.levels, self.group, self.name, self.center = levels, group, name, center
        self.axis, self.coeff_group = axis, coeff_group
        # a dropped level stores nothing: its tokens are known only by the level map; with center="channel" each
        # level's store subtracts its own per-coefficient mean, taken over the first block it stores
        self.stores = [None if lv.dropped else PagedStore(lv.spec(group, center if lv.bits != 16 else "none", axis,
                                                                  coeff_group), f"{name} level {i} (rank {lv.rank})")
                       for i, lv in enumerate(levels)]
        self.pending: list[torch.Tensor | None] = [None] * len(levels)

    @property
    def _held(self) -> list[PagedStore]:
        return [s for s in self.stores if s is not None]

    def level_tokens(self, i: int) -> int:
        """Tokens level `i` holds, coded and pending."""
        store, pend = self.stores[i], self.pending[i]
        return (0 if store is None else store.tokens) + (0 if pend is None else pend.shape[2])

    @property
    def tokens(self) -> int:
        """Tokens stored, coded or pending (dropped ones are not)."""
        return sum(self.level_tokens(i) for i in range(len(self.levels)))

    def append(self, coeffs: torch.Tensor, levels: torch.Tensor) -> None:
        """Store tokens given by their normalised coefficients [B, G, T, R] and their levels [B, G, T].

        Every (batch, group) row must put the same number of tokens in each level (levels are assigned by rank
        within a row), so each level's tensor stays rectangular.
        """
        b, g, t, _ = coeffs.shape
        if t == 0:
            return
        for i, (lv, store) in enumerate(zip(self.levels, self.stores)):
            hit = levels == i
            n = hit.sum(-1)
            if n.numel() and (n != n.flatten()[0]).any():
                raise ValueError(f"{self.name}: rows put different numbers of tokens in level {i}")
            count = int(n.flatten()[0]) if n.numel() else 0
            if count and store is not None:
                picked = coeffs[..., : lv.rank][hit].reshape(b, g, count, lv.rank)
                unit = store.codec.tokens_per_unit
                if unit == 1:
                    store.append(picked)
                    continue
                # per-channel codes: whole groups to the store, the rest waits; every token is rounded to fp16
                # first, so how the tokens arrive never changes the codes
                x = picked.half()
                if not torch.isfinite(x).all():
                    raise ValueError(f"{self.name}: coefficients beyond the fp16 range (|c| > 65504)")
                if self.pending[i] is not None:
                    x = torch.cat([self.pending[i], x], 2)
                whole = x.shape[2] // unit * unit
                if whole:
                    store.append(x[:, :, :whole].float())
                self.pending[i] = x[:, :, whole:].clone() if x.shape[2] > whole else None

    def positions(self, level_map: torch.Tensor) -> list[torch.Tensor | None]:
        """Per level, the token index of each of its tokens: [B, G, n_l] int64, ascending."""
        out = []
        for i in range(len(self.stores)):
            n = self.level_tokens(i)
            if n == 0:
                out.append(None)
                continue
            idx = (level_map == i).nonzero()[:, -1]
            out.append(idx.reshape(*level_map.shape[:2], n))
        return out

    def coefficients(self) -> list[torch.Tensor | None]:
        """Per level, the dequantized normalised coefficients [B, G, n_l, rank_l] (float32: coded, then pending),
        None when empty."""
        out = []
        for store, pend in zip(self.stores, self.pending):
            c = None if store is None else store.decode(torch.float32)
            if pend is not None:
                c = pend.float() if c is None else torch.cat([c, pend.float()], 2)
            out.append(c)
        return out

    def reconstruct(self, level_map: torch.Tensor, basis: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor | None:
        """All tokens back in the original coordinates, [B, G, T, D] float32, in token order."""
        if self.tokens == 0:
            return None
        b, g, t = level_map.shape
        out = torch.zeros(b, g, t, basis.shape[1], dtype=torch.float32, device=level_map.device)
        for lv, c, pos in zip(self.levels, self.coefficients(), self.positions(level_map)):
            if c is None:
                continue
            x = (c * sigma[:, None, : lv.rank]) @ basis[:, :, : lv.rank].transpose(-1, -2)
            out.scatter_(2, pos[..., None].expand(-1, -1, -1, out.shape[-1]), x)
        return out

    def parts(self) -> dict[str, list[torch.Tensor]]:
        """The stores' tensors by part; pending coefficients are exact recent tokens, reported as "window"."""
        out: dict[str, list[torch.Tensor]] = {"codes": [], "scales": [], "means": [], "window": []}
        for store in self._held:
            for part, ts in store.parts().items():
                out[part].extend(ts)
        out["window"].extend(p for p in self.pending if p is not None)
        return out

    def map_batch(self, fn) -> None:
        for store in self._held:
            store.map_batch(fn)
        self.pending = [None if p is None else fn(p) for p in self.pending]

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Each level's store's declared state, under `level.<i>.`; pending coefficients as `pending.<i>`."""
        tensors: dict[str, torch.Tensor] = {}
        counts: dict[str, Any] = {"levels": []}
        for i, store in enumerate(self.stores):
            if store is None:
                counts["levels"].append(None)
                continue
            own, c = store.state_dict()
            tensors.update({f"level.{i}.{k}": t for k, t in own.items()})
            counts["levels"].append(c)
        if self.axis != "token":  # a per-token store's file is what it was before the option
            counts.update(axis=self.axis, coeff_group=self.coeff_group,
                          pending=[0 if p is None else p.shape[2] for p in self.pending])
            tensors.update({f"pending.{i}": p for i, p in enumerate(self.pending) if p is not None})
        return tensors, counts

    def load_state_dict(self, tensors: dict[str, torch.Tensor], counts: dict[str, Any]) -> None:
        if len(counts["levels"]) != len(self.stores):
            raise ValueError(f"{self.name}: {len(counts['levels'])} levels saved, {len(self.stores)} rebuilt")
        saved = (counts.get("axis", "token"), counts.get("coeff_group", self.coeff_group))
        if saved[0] != self.axis or (self.axis == "channel" and saved[1] != self.coeff_group):
            raise ValueError(f"{self.name}: saved with coeff_axis={saved[0]}, coeff_group={saved[1]}; rebuilt with "
                             f"coeff_axis={self.axis}, coeff_group={self.coeff_group}")
        for i, (store, c) in enumerate(zip(self.stores, counts["levels"])):
            if store is not None:
                prefix = f"level.{i}."
                store.load_state_dict({k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}, c)
        want = counts.get("pending", [0] * len(self.stores))
        self.pending = [tensors.get(f"pending.{i}") for i in range(len(self.stores))]
        for i, (p, n, lv) in enumerate(zip(self.pending, want, self.levels)):
            got = 0 if p is None else p.shape[2]
            if got != n or (p is not None and (self.stores[i] is None or p.dtype != torch.float16
                                               or p.shape[-1] != lv.rank
                                               or n >= self.stores[i].codec.tokens_per_unit)):
                raise ValueError(f"{self.name}: level {i}'s pending coefficients are "
                                 f"{None if p is None else (p.dtype, tuple(p.shape))}, the counts say {n} tokens of "
                                 f"rank {lv.rank} in fp16, fewer than a group")

    def drop_front(self, counts: list[int]) -> None:
        """Forget the oldest `counts[l]` tokens of each level. A channel-coded level drops whole groups of coded
        tokens, or all of them and then pending ones; any other count would split a group's scale."""
        for i, (store, n) in enumerate(zip(self.stores, counts)):
            if store is None or n <= 0:
                continue
            coded, pend = store.tokens, self.pending[i]
            if n > self.level_tokens(i):
                raise ValueError(f"{self.name}: cannot drop {n} of level {i}'s {self.level_tokens(i)} tokens")
            if n >= coded:
                store.drop_front(coded)
                rest = n - coded
                if rest:
                    self.pending[i] = pend[:, :, rest:].clone() if pend.shape[2] > rest else None
            elif n % store.codec.tokens_per_unit:
                unit = store.codec.tokens_per_unit
                raise NotImplementedError(
                    f"{self.name}: level {i} cannot drop {n} of its {coded} coded tokens: with coeff_axis=channel "
                    f"they are coded in groups of coeff_group={unit} tokens sharing a scale; drop a multiple of "
                    f"{unit} (or all coded tokens), or use coeff_axis=token")
            else:
                store.drop_front(n)
