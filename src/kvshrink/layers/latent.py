"""LatentLayer: a cache layer that stores old tokens as low-rank coefficients, at a level (rank and bits) chosen per
token from the attention it received, and attends over them in the latent space.

Life of a token: it arrives exact in the recent window, where the attention it receives is accumulated (at prefill
from the last `observe` queries of the prompt, then from every decoding step); only when it leaves the window is it
approximated (lazily, at the next `update`), at the level its significance earns within its block. The first
`sinks` tokens stay exact. When the last level is `DROP` (rank 0), the least significant tokens are evicted
instead: nothing of them is stored but their byte in the level map, and attention masks them (SnapKV's selection
from the prompt's last queries, then low rank for the tokens kept: DynaKV's setting for its 6% figure).

Attention (`attend`, called through kvshrink's registered attention function) never rebuilds old keys or values:
each query head is projected once into its key basis (q~ = sigma * U_K^T q), scores against a level's tokens are
q~[:r] . c, and the probability-weighted sum of value coefficients is taken back through the value basis once per
head and step. `mode="reconstruct"` computes the same thing by rebuilding keys and values (the reference).

Under tensor parallelism a rank holds its KV heads and their bases. A joint basis spans every rank's heads, so the
layer is given the `shard`: each rank projects its heads onto its rows of the basis and the partial coefficients
are all-reduced (a row-parallel product, as `o_proj`'s), and the level of each token comes from its significance
averaged over every rank's heads, gathered; the ranks then hold the same coefficients and level map.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .. import attention
from ..codecs.lowrank import Level, LevelStore, check_coeff_codes
from ..distributed import gather_heads
from ..policies.significance import assign_levels, level_counts
from .base import CompressedLayer, ExactWindow, add_store_parts

MODES = ("latent", "reconstruct")
SIGNIFICANCE = ("attention", "norm")


class LatentLayer(ExactWindow, attention.SelfAttending, CompressedLayer):
    """Exact sinks, low-rank coefficient stores per level, and an exact recent window, for one decoder layer.

    key_basis / value_basis: [groups, heads_per_group * head_dim, R] orthonormal columns (R = the largest rank);
    key_sigma / value_sigma: [groups, R] coefficient RMS. One group per KV head is TALE's per-head basis; one group
    for the whole layer is DynaKV's joint basis. coeff_axis: the coefficients' code groups run along a token
    ("token": `code_group` coefficients share a scale) or along `coeff_group` tokens of each coefficient ("channel",
    KIVI's key groups; a level's not yet full group waits as exact fp16 coefficients, see `LevelStore`).
    """

    splits_rows = True  # a left-padded batch keeps one layer per row (layers/rows.py)

    replays_prefill = False  # its prefill attention is its own (see eval.prefill)
    kind = "a low-rank"
    _window_extras = ("sig_sum", "sig_count")  # attention received by the window's tokens, and observations
    _batch_tensors = (*ExactWindow._batch_tensors, *_window_extras, "level_map")
    _batch_stores = ("key_store", "value_store")

    def __init__(self, key_basis: torch.Tensor, key_sigma: torch.Tensor, value_basis: torch.Tensor,
                 value_sigma: torch.Tensor, levels: Sequence[Level], fractions: Sequence[float], *, kv_heads: int,
                 window: int = 32, sinks: int = 4, block: int = 32, code_group: int = 64, layer_idx: int = -1,
                 exact_dtype: torch.dtype | None = None, basis_dtype: torch.dtype = torch.float16,
                 mode: str = "latent", observe: int = 32, significance: str = "attention", rope: Any = None,
                 shard: Any = None, pool: int = 1, center: str = "none", coeff_axis: str = "token",
                 coeff_group: int = 32):
        super().__init__()
        where = f"layer {layer_idx}"
        if mode not in MODES:
            raise ValueError(f"{where}: mode must be one of {MODES}, got {mode!r}")
        if rope is not None and mode != "reconstruct":
            raise ValueError(f"{where}: pre-RoPE keys (a rope given) can only attend by reconstruction: each token's "
                             "rotation is applied after rebuilding it; use mode='reconstruct'")
        if significance not in SIGNIFICANCE:
            raise ValueError(f"{where}: significance must be one of {SIGNIFICANCE}, got {significance!r}")
        check_coeff_codes(coeff_axis, coeff_group, where)
        for arg, value, low in (("window", window, 0), ("sinks", sinks, 0), ("block", block, 1),
                                ("observe", observe, 1), ("pool", pool, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{where}: {arg} must be an integer >= {low}, got {value!r}")
        if len(levels) != len(fractions) or abs(sum(fractions) - 1) > 1e-6:
            raise ValueError(f"{where}: {len(fractions)} fractions summing to {sum(fractions):.4f} for {len(levels)} levels")
        groups, row, rank = key_basis.shape
        if kv_heads % groups or value_basis.shape != key_basis.shape:
            raise ValueError(f"{where}: bases {tuple(key_basis.shape)} / {tuple(value_basis.shape)} do not fit "
                             f"{kv_heads} KV heads")
        if max(lv.rank for lv in levels) > rank:
            raise ValueError(f"{where}: level rank {max(lv.rank for lv in levels)} exceeds the basis rank {rank}")
        self.layer_idx, self.kv_heads, self.groups = layer_idx, kv_heads, groups
        self.heads_per_group = kv_heads // groups
        self.head_dim = row // self.heads_per_group
        own = lambda t: t.to(basis_dtype, copy=True).contiguous()  # noqa: E731  (a slice would hold its whole base)
        self.key_basis, self.value_basis = own(key_basis), own(value_basis)
        self.key_sigma, self.value_sigma = own(key_sigma), own(value_sigma)
        self.levels, self.fractions = tuple(levels), tuple(fractions)
        self.window, self.sinks, self.block, self.code_group = window, sinks, block, code_group
        if pool % 2 == 0:
            raise ValueError(f"{where}: pool must be odd (a window centred on each token), got {pool}")
        self.exact_dtype, self.mode, self.observe, self.significance = exact_dtype, mode, observe, significance
        self.pool, self.center = pool, center
        self.coeff_axis, self.coeff_group = coeff_axis, coeff_group  # code groups along tokens or coefficients
        self.rope = rope  # set: keys are stored with the rotary embedding undone (pre-RoPE basis)
        if shard is not None and groups != 1:
            raise ValueError(f"{where}: a shard is for a joint basis whose heads span ranks; per-head bases are "
                             "sliced to the rank's heads instead")
        self.shard = shard  # a joint basis over every tensor-parallel rank's heads: this rank holds its rows
        self.sliding_window = None
        self.is_sliding = False
        self._clear()

    def _clear(self) -> None:
        codes = (self.center, self.coeff_axis, self.coeff_group)
        self.key_store = LevelStore(self.levels, self.code_group, f"layer {self.layer_idx} keys", *codes)
        self.value_store = LevelStore(self.levels, self.code_group, f"layer {self.layer_idx} values", *codes)
        self.level_map: torch.Tensor | None = None
        self.keys = self.values = self.sink_keys = self.sink_values = None
        self.sig_sum = self.sig_count = None  # attention received by the window's tokens, and observations
        self.seen = 0
        self._awaiting = False  # an update not yet answered by attend()
        self.is_initialized = False

    # -- transformers layer API -------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        if h != self.kv_heads or d != self.head_dim:
            raise ValueError(f"layer {self.layer_idx}: keys have {h} heads of dim {d}; the bases were fitted for "
                             f"{self.kv_heads} heads of dim {self.head_dim}")
        super().lazy_initialization(key_states, value_states)  # sinks, window and its significance, in `exact_dtype`
        self.level_map = torch.zeros((b, self.groups, 0), dtype=torch.uint8, device=key_states.device)
        for name in ("key_basis", "value_basis", "key_sigma", "value_sigma"):
            setattr(self, name, getattr(self, name).to(key_states.device))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self._begin_update(key_states, value_states)
        self._flush()
        self._take(key_states, value_states)
        # what an ordinary attention would get: the exact tokens only (the compressed ones are attended by `attend`)
        keys = torch.cat([self.sink_keys, self.keys], -2).to(self.dtype)
        self._hand_over(keys)
        return keys, torch.cat([self.sink_values, self.values], -2).to(self.dtype)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, T, d] -> [B, G, T, heads_per_group * d]."""
        b, h, t, d = x.shape
        g = self.groups
        return x.reshape(b, g, h // g, t, d).permute(0, 1, 3, 2, 4).reshape(b, g, t, -1)

    def _heads(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, G, T, heads_per_group * d] -> [B, H, T, d]."""
        b, g, t, _ = rows.shape
        return rows.reshape(b, g, t, self.heads_per_group, self.head_dim).permute(0, 1, 3, 2, 4).reshape(
            b, self.kv_heads, t, self.head_dim)

    def _flush(self) -> None:
        """Approximate the tokens that left the window, in whole blocks, at the levels their significance earns."""
        n = self._leaving()
        if n == 0:
            return
        k, v = self.keys[:, :, :n].float(), self.values[:, :, :n].float()
        if self.significance == "attention":
            score = self.sig_sum[..., :n] / self.sig_count[..., :n].clamp_min(1)
        else:
            score = k.norm(dim=-1)
        b = score.shape[0]
        score = gather_heads(self.shard, score).reshape(b, self.groups, -1, n).mean(2)
        if self.pool > 1:  # SnapKV's smoothing: a token near a significant one counts as significant
            score = torch.nn.functional.max_pool1d(score.float(), self.pool, 1, self.pool // 2)
        if self.rope is not None:  # these tokens' positions follow the sinks and the tokens already stored
            start = self.sink_keys.shape[-2] + self.level_map.shape[-1]
            k = self.rope(k, torch.arange(start, start + n), inverse=True)
        levels = assign_levels(score, level_counts(n, self.fractions))
        kc, vc = self._rows(k) @ self.key_basis.float(), self._rows(v) @ self.value_basis.float()
        if self.shard is not None:  # this rank's heads' share of the projection: sum the ranks' shares
            kc, vc = self.shard.all_reduce_sum(torch.stack([kc, vc])).unbind(0)
        kc = kc / self.key_sigma.float()[:, None, :]
        vc = vc / self.value_sigma.float()[:, None, :]
        self.key_store.append(kc, levels)
        self.value_store.append(vc, levels)
        self.level_map = torch.cat([self.level_map, levels], -1)
        self._drop_front(n)

    # -- attention over the layer ---------------------------------------------------------------------------------
    def _select(self, hq: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """For each query head: its group, its slot inside the group, and the GQA repeat."""
        if hq % self.kv_heads:
            raise ValueError(f"layer {self.layer_idx}: {hq} query heads for {self.kv_heads} KV heads")
        rep = hq // self.kv_heads
        kv = torch.arange(hq, device=self.level_map.device) // rep
        return kv // self.heads_per_group, kv % self.heads_per_group, rep

    def _head_basis(self, basis: torch.Tensor, group: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        g, row, r = basis.shape
        return basis.float().reshape(g, self.heads_per_group, self.head_dim, r)[group, slot]  # [Hq, d, R]

    def attend(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Attention output [B, Hq, q, d] for `query` [B, Hq, q, d] over sinks, stored tokens and window; the
        window's tokens record the attention they received."""
        self._begin_attend()
        out, p_win = self.attention(query, mask, scaling, self.mode)
        self._observe(p_win)
        return out

    def attention(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                  mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, probabilities over the window) computed in `mode` ('latent' or 'reconstruct'); no state
        changes."""
        q = query.float()
        b, hq, ql, _ = q.shape
        group, slot, rep = self._select(hq)
        exact = lambda t: t.float().repeat_interleave(rep, dim=1)  # noqa: E731
        ks, vs, kw, vw = exact(self.sink_keys), exact(self.sink_values), exact(self.keys), exact(self.values)
        n_sink, n_win, n_mid = ks.shape[-2], kw.shape[-2], self.level_map.shape[-1]
        mid_scores = q.new_zeros(b, hq, ql, n_mid)
        positions = coeffs = recon_v = None
        if n_mid:
            if mode == "latent":
                ub = self._head_basis(self.key_basis, group, slot)
                q_lat = torch.einsum("bjqd,jdr->bjqr", q, ub) * self.key_sigma.float()[group][:, None, :]
                positions = [None if p is None else p[:, group] for p in self.key_store.positions(self.level_map)]
                for lv, c, pos in zip(self.levels, self.key_store.coefficients(), positions):
                    if c is None:
                        continue
                    s = q_lat[..., : lv.rank] @ c[:, group].transpose(-1, -2)
                    mid_scores.scatter_(-1, pos[:, :, None, :].expand(-1, -1, ql, -1), s)
                coeffs = self.value_store.coefficients()
            else:
                recon_k = self._heads(self.key_store.reconstruct(self.level_map, self.key_basis.float(),
                                                                  self.key_sigma.float()))
                if self.rope is not None:
                    recon_k = self.rope(recon_k, torch.arange(n_sink, n_sink + n_mid))
                recon_v = self._heads(self.value_store.reconstruct(self.level_map, self.value_basis.float(),
                                                                    self.value_sigma.float()))
                mid_scores = q @ recon_k.repeat_interleave(rep, 1).transpose(-1, -2)
        scores = torch.cat([q @ ks.transpose(-1, -2), mid_scores, q @ kw.transpose(-1, -2)], -1) * scaling
        total = scores.shape[-1]
        if mask is not None:
            if mask.shape[-1] != total:
                raise ValueError(f"layer {self.layer_idx}: the attention mask covers {mask.shape[-1]} keys, the "
                                 f"cache holds {total}")
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
        elif ql > 1:
            qpos = torch.arange(total - ql, total, device=q.device)[:, None]
            scores = scores.masked_fill(torch.arange(total, device=q.device)[None, :] > qpos, float("-inf"))
        if n_mid and self.levels[-1].dropped:  # evicted tokens: nothing stored, never attended
            gone = (self.level_map == len(self.levels) - 1)[:, group]  # [B, Hq, n_mid]
            scores[..., n_sink:n_sink + n_mid].masked_fill_(gone[:, :, None, :], float("-inf"))
        p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query row with every key masked (padding) gets 0
        p_sink, p_mid, p_win = p[..., :n_sink], p[..., n_sink:n_sink + n_mid], p[..., n_sink + n_mid:]
        out = p_sink @ vs + p_win @ vw
        if n_mid:
            if mode == "latent":
                rank = self.value_basis.shape[-1]
                z = q.new_zeros(b, hq, ql, rank)
                for lv, c, pos in zip(self.levels, coeffs, positions):
                    if c is None:
                        continue
                    w = p_mid.gather(-1, pos[:, :, None, :].expand(-1, -1, ql, -1))
                    z[..., : lv.rank] += w @ c[:, group]
                z = z * self.value_sigma.float()[group][:, None, :]
                out = out + torch.einsum("bjqr,jdr->bjqd", z, self._head_basis(self.value_basis, group, slot))
            else:
                out = out + p_mid @ recon_v.repeat_interleave(rep, 1)
        return out.to(query.dtype), p_win

    def _observe(self, p_win: torch.Tensor) -> None:
        """Add the attention the window's tokens just received (mean over the last `observe` queries and over the
        query heads of each KV head) as one observation."""
        b, hq, ql, n = p_win.shape
        seen = p_win[:, :, -self.observe:].mean(2).reshape(b, self.kv_heads, hq // self.kv_heads, n).mean(2)
        self.sig_sum = self.sig_sum + seen
        self.sig_count = self.sig_count + 1

    def _stored(self) -> int:
        return self.level_map.shape[-1]

    # -- reporting ----------------------------------------------------------------------------------------------
    def parts(self) -> dict[str, list[torch.Tensor]]:
        out = add_store_parts({"codes": [], "scales": [], "means": [], "window": [], "sinks": [],
                               "bases": [self.key_basis, self.key_sigma, self.value_basis, self.value_sigma],
                               "levels": []}, self.key_store, self.value_store)
        if self.is_initialized:
            out["levels"].append(self.level_map)
        return self._exact_parts(out)

    def describe(self) -> dict[str, Any]:
        names = ["dropped" if lv.dropped else f"r{lv.rank}b{lv.bits}" for lv in self.levels]
        counts = [int((self.level_map[0, 0] == i).sum()) if self.level_map is not None and self.level_map.numel()
                  else 0 for i in range(len(self.levels))]  # tokens of the first row (every row has the same)
        return {
            "bits": "/".join(names),
            "levels": dict(zip(names, counts)),
            "basis": "joint" if self.groups == 1 and (self.kv_heads > 1 or self.shard is not None) else "per head",
            "window": self.window,
            "sinks": self.sinks,
            **({"coeff_codes": f"channel g{self.coeff_group}"} if self.coeff_axis == "channel" else {}),
        }
