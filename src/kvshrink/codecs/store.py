"""`PagedStore`: the encoded tokens of one tensor (keys or values) of one layer, in fixed-size pages.

A page holds up to `page_tokens` tokens of every growing field the codec's layout declares, each shaped
[batch, heads, entries, ...]; the block table is the ordered list of pages. Appending encodes the new block and
fills the last page, copying at most one page, then opens new pages: what is already stored is never copied again
(a store that grew by concatenation copied all of itself at every flushed block). Only the first page may be
partial at its front (a sliding window dropped its oldest tokens) and only the last at its end; every page between
is full, so token t lives in page 0 when t < `first_fill`, else in page 1 + (t - first_fill) // page_tokens.

Fixed fields (a channel mean fixed by the first block) are held once in `state`. `state_dict()` and
`load_state_dict()` name every tensor after the declared fields, which is what a saved cache holds.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .base import Codec, Layout
from .perhead import PerHead

#: tokens per page: a multiple of every codec's unit (rounded up per store), 4-8 kernel tiles
PAGE_TOKENS = 256


def by_part(tensors: list[tuple[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """(part, tensor) pairs grouped by the memory report's part."""
    out: dict[str, list[torch.Tensor]] = {}
    for part, t in tensors:
        out.setdefault(part, []).append(t)
    return out


class PagedStore:
    """The encoded tokens of one tensor of one layer; decoded, they are [batch, heads, tokens, head_dim]."""

    def __init__(self, codec: Codec, name: str = "tensor", page_tokens: int = PAGE_TOKENS, role: str | None = None):
        if not isinstance(page_tokens, int) or page_tokens < 1:
            raise ValueError(f"{name}: page_tokens must be a positive integer, got {page_tokens!r}")
        self.codec = codec
        self.name = name
        unit = codec.tokens_per_unit
        self.page_tokens = -(-page_tokens // unit) * unit
        self.tokens = 0
        self.head_dim = 0
        self.layout: Layout | None = None
        self.pages: list[dict[str, torch.Tensor]] = []
        self.fills: list[int] = []  # tokens per page (all full but possibly the first and the last)
        self.state: dict[str, torch.Tensor] = {}  # fixed fields
        self.copied = 0  # bytes of already-stored tokens copied by appends (at most a page each: see `_write`)
        self.cache: dict[Any, torch.Tensor] = {}  # derived, never saved (a rotation's signs)
        # what quantizes a block instead of the codec's PyTorch reference (a GPU kernel with its contract; the
        # `grouped` codec's `encode_block`)
        self.encoder: Callable | None = None
        # the global KV heads held under tensor parallelism (set by the layer)
        self.shard = None
        # what the store holds: "key" or "value" (a codec whose parameters differ by side reads it), and which of
        # the layer's (or rank's) KV heads, when a head split gave it some of them
        self.role = role
        self.head_index: torch.Tensor | None = None

    # -- writing ----------------------------------------------------------------------------------------------
    def append(self, x: torch.Tensor) -> None:
        """Encode and store a block of tokens x [B, H, T, D]; T must be a multiple of the codec's unit."""
        t = x.shape[2]
        unit = self.codec.tokens_per_unit
        if t % unit:
            raise ValueError(f"{self.name}: {t} tokens is not a multiple of the group of {unit} tokens")
        if t == 0:
            return
        self.codec.check_head_dim(x.shape[-1], self.name)
        if self.layout is None or self.head_dim != x.shape[-1]:
            self.layout = self.codec.layout(x.shape[-1])
        try:
            fields = self.codec.encode(x, self)
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None
        self.head_dim = x.shape[-1]
        self._write(fields, t)

    def _write(self, fields: dict[str, torch.Tensor], t: int) -> None:
        """Put `t` encoded tokens after the last page's, filling it first, then in new pages."""
        self._pages_changed()
        done = 0
        while done < t:
            if self.pages and self.fills[-1] < self.page_tokens:
                room = self.page_tokens - self.fills[-1]
                n = min(room, t - done)
                piece = self._slice(fields, done, done + n)
                last = self.pages[-1]
                for f in self.layout.growing:
                    self.copied += last[f.name].numel() * last[f.name].element_size()
                    last[f.name] = torch.cat([last[f.name], piece[f.name]], 2)
                self.fills[-1] += n
            else:
                n = min(self.page_tokens, t - done)
                piece = self._slice(fields, done, done + n)
                whole = n == t  # a block that is exactly one page needs no copy of its own
                self.pages.append({k: v if whole else v.clone() for k, v in piece.items()})
                self.fills.append(n)
            done += n
        self.tokens += t

    def _slice(self, fields: dict[str, torch.Tensor], a: int, b: int) -> dict[str, torch.Tensor]:
        out = {}
        for f in self.layout.growing:
            out[f.name] = fields[f.name][:, :, a // f.tokens:b // f.tokens]
        return out

    # -- reading ----------------------------------------------------------------------------------------------
    @property
    def first_fill(self) -> int:
        return self.fills[0] if self.fills else 0

    def field(self, name: str) -> torch.Tensor | None:
        """One growing field over every stored token (a copy when there is more than one page); None when empty."""
        if not self.pages:
            return None
        parts = [p[name] for p in self.pages]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 2)

    def page_list(self, name: str) -> list[torch.Tensor]:
        """One growing field page by page (contiguous), as kernels read it; kept until the pages change, since a
        decoding step reads every page of every layer."""
        key = ("pages", name)
        if key not in self.cache:
            self.cache[key] = [p[name].contiguous() for p in self.pages]
        return self.cache[key]

    def _pages_changed(self) -> None:
        """Forget the page lists kept for kernels (they would hold replaced pages alive)."""
        for key in [k for k in self.cache if isinstance(k, tuple) and k[0] == "pages"]:
            del self.cache[key]

    def fields(self) -> dict[str, torch.Tensor]:
        """Every growing field over all pages (one tensor each: the packed codes are joined, which copies far less
        than decoding page by page and joining the decoded tokens)."""
        return {f.name: self.field(f.name) for f in self.layout.growing}

    def decode(self, dtype: torch.dtype) -> torch.Tensor | None:
        """All stored tokens decoded to [B, H, T, D] in `dtype`; None when empty."""
        if not self.pages:
            return None
        return self.codec.decode(self.fields(), self).to(dtype)

    # -- reporting, batch operations, dropping ------------------------------------------------------------------
    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(part, tensor) of every tensor held."""
        if self.layout is None:
            return []
        out = [(f.part, p[f.name]) for p in self.pages for f in self.layout.growing]
        out += [(f.part, self.state[f.name]) for f in self.layout.fixed if f.name in self.state]
        return out

    def parts(self) -> dict[str, list[torch.Tensor]]:
        return by_part(self.tensors())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.tensors())

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply `fn` (a function of a batch-first tensor) to every held tensor: beam reorder, batch selection."""
        for page in self.pages:
            for k in page:
                page[k] = fn(page[k])
        for k in self.state:
            self.state[k] = fn(self.state[k])
        self.cache.clear()

    def drop_front(self, n: int) -> None:
        """Forget the oldest `n` tokens (a multiple of the codec's unit): whole pages go, a partial first page is
        cut (one page copied)."""
        if n <= 0:
            return
        unit = self.codec.tokens_per_unit
        if n % unit or n > self.tokens:
            raise ValueError(f"{self.name}: cannot drop {n} of {self.tokens} tokens in units of {unit}")
        self._pages_changed()
        self.tokens -= n
        while n and n >= self.fills[0]:
            n -= self.fills.pop(0)
            self.pages.pop(0)
        if n:
            page = self.pages[0]
            for f in self.layout.growing:
                page[f.name] = page[f.name][:, :, n // f.tokens:].clone()
            self.fills[0] -= n

    def select(self, index: torch.Tensor) -> None:
        """Keep only the tokens at `index` [B, H, K] (ascending per row), each head its own: eviction from a store.
        Needs a per-token, per-head layout (every growing field one entry per token and head)."""
        if self.tokens == 0:
            return
        for f in self.layout.growing:
            if f.tokens != 1 or f.shared_heads:
                raise ValueError(f"{self.name}: {self.codec.describe()} codes cannot lose single tokens "
                                 f"({f.name} spans {f.tokens} tokens{' and every head' if f.shared_heads else ''})")
        fields = {}
        for f in self.layout.growing:
            x = self.field(f.name)
            idx = index.reshape(*index.shape, *([1] * (x.dim() - 3))).expand(*index.shape, *x.shape[3:])
            fields[f.name] = x.gather(2, idx.to(x.device))
        kept = index.shape[-1]
        self._pages_changed()
        self.pages, self.fills, self.tokens = [], [], 0
        if kept:
            self._write(fields, kept)

    # -- saving -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(the store's tensors by declared name: 'page.3.codes', 'state.channel_mean'; its counts)."""
        tensors = {f"state.{k}": v for k, v in self.state.items()}
        for i, page in enumerate(self.pages):
            tensors.update({f"page.{i}.{k}": v for k, v in page.items()})
        return tensors, {"tokens": self.tokens, "head_dim": self.head_dim, "fills": list(self.fills),
                         "page_tokens": self.page_tokens, "codec": self.codec.name}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], counts: dict[str, Any]) -> None:
        """Put back what `state_dict` gave (checked against the declared fields)."""
        if counts.get("codec") != self.codec.name:
            raise ValueError(f"{self.name}: saved by the {counts.get('codec')!r} codec, rebuilt with {self.codec.name!r}")
        fills = counts["fills"]
        self.page_tokens, self.tokens, self.head_dim = counts["page_tokens"], counts["tokens"], counts["head_dim"]
        if sum(fills) != self.tokens:
            raise ValueError(f"{self.name}: page fills {fills} do not add up to {self.tokens} tokens")
        self.layout = self.codec.layout(self.head_dim) if self.head_dim else None
        self.fills = list(fills)
        self.state = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
        self.pages = [{} for _ in fills]
        for name, t in tensors.items():
            if name.startswith("page."):
                _, i, field = name.split(".", 2)
                self.pages[int(i)][field] = t
        if self.layout is not None:
            want = {f.name for f in self.layout.growing}
            for i, page in enumerate(self.pages):
                if set(page) != want:
                    raise ValueError(f"{self.name}: page {i} holds {sorted(page)}, the codec declares {sorted(want)}")
                for f in self.layout.growing:
                    t = page[f.name]
                    if t.dtype != f.dtype or tuple(t.shape[3:]) != f.shape or t.shape[2] * f.tokens != fills[i]:
                        raise ValueError(f"{self.name}: page {i} {f.name} is {t.dtype} {tuple(t.shape)}, the codec "
                                         f"declares {f.dtype} [.., {fills[i] // f.tokens}, {f.shape}]")
        self.cache.clear()


def lcm_units(*codecs: Codec) -> int:
    """Tokens a layer must move to its stores together so that every codec gets whole units."""
    return math.lcm(*(c.tokens_per_unit for c in codecs))


class HeadSplitStore:
    """A store whose KV heads are coded by different codecs (`PerHead`): one `PagedStore` per distinct codec over
    the heads that use it, read back in head order. Every head holds the same tokens, so the page fills agree."""

    def __init__(self, codec, name: str = "tensor", page_tokens: int = PAGE_TOKENS, role: str | None = None):
        self.codec = codec
        self.name = name
        order: dict = {}
        for h, c in enumerate(codec.codecs):
            order.setdefault(c, []).append(h)
        self.groups = [(torch.tensor(heads), PagedStore(c, f"{name} heads {heads}", page_tokens, role))
                       for c, heads in order.items()]
        for heads, store in self.groups:
            store.head_index = heads
        self.shard = None

    @property
    def tokens(self) -> int:
        return self.groups[0][1].tokens

    @property
    def head_dim(self) -> int:
        return self.groups[0][1].head_dim

    @property
    def fills(self) -> list[int]:
        return self.groups[0][1].fills

    def append(self, x: torch.Tensor) -> None:
        if x.shape[1] != len(self.codec.codecs):
            raise ValueError(f"{self.name}: {x.shape[1]} heads given, the per-head codecs name "
                             f"{len(self.codec.codecs)}")
        for heads, store in self.groups:
            store.append(x[:, heads.to(x.device)])

    def decode(self, dtype: torch.dtype) -> torch.Tensor | None:
        if self.tokens == 0:
            return None
        parts = [(heads, store.decode(dtype)) for heads, store in self.groups]
        b, _, t, d = parts[0][1].shape
        out = parts[0][1].new_empty(b, len(self.codec.codecs), t, d)
        for heads, x in parts:
            out[:, heads.to(x.device)] = x
        return out

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [pt for _, store in self.groups for pt in store.tensors()]

    def parts(self) -> dict[str, list[torch.Tensor]]:
        return by_part(self.tensors())

    def nbytes(self) -> int:
        return sum(store.nbytes() for _, store in self.groups)

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for _, store in self.groups:
            store.map_batch(fn)

    def drop_front(self, n: int) -> None:
        for _, store in self.groups:
            store.drop_front(n)

    def select(self, index: torch.Tensor) -> None:
        for heads, store in self.groups:
            store.select(index[:, heads.to(index.device)])

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        counts: dict[str, Any] = {"groups": []}
        for g, (_, store) in enumerate(self.groups):
            own, c = store.state_dict()
            tensors.update({f"group.{g}.{k}": t for k, t in own.items()})
            counts["groups"].append(c)
        return tensors, counts

    def load_state_dict(self, tensors: dict[str, torch.Tensor], counts: dict[str, Any]) -> None:
        if len(counts["groups"]) != len(self.groups):
            raise ValueError(f"{self.name}: {len(counts['groups'])} head groups saved, {len(self.groups)} rebuilt")
        for g, ((_, store), c) in enumerate(zip(self.groups, counts["groups"])):
            prefix = f"group.{g}."
            store.load_state_dict({k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}, c)


def make_store(codec: Codec, name: str, page_tokens: int = PAGE_TOKENS,
               role: str | None = None) -> "PagedStore | HeadSplitStore":
    """The store a codec's tokens go to (`role`: "key" or "value"): paged, or split by head when the heads have
    codecs of their own."""
    kind = HeadSplitStore if isinstance(codec, PerHead) else PagedStore
    return kind(codec, name, page_tokens, role)
