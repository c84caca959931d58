"""Tensor parallelism: which KV heads this process holds, and the few collectives that cross heads.

A model loaded with transformers' tensor parallelism (`from_pretrained(path, tp_plan="auto")` or
`distributed_config=DistributedConfig(tp_plan="auto")`, under `torchrun`) has its `k_proj` and `v_proj` sharded
column-wise: rank r of a TP group of size W computes, and hands its cache, the contiguous slice of global KV heads
[r H/W, (r+1) H/W). Every kvshrink layer then holds only those heads. What is per head needs nothing more; what
spans heads asks the other ranks through a `HeadShard`:
- a function of per-head values (TaDA's head mean, TOVA's head-averaged scores, DynaKV's level choice): the ranks'
  heads are gathered and the quantity is computed as one process computes it, so every rank agrees with the
  single-process cache;
- a projection over all heads' channels (DynaKV's joint basis): each rank projects its own heads with its rows of
  the basis and the partial sums are all-reduced, as transformers does for `o_proj`.
Without an initialised process group, or for a model that is not head-sharded, `head_shard` returns None and
nothing here runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


class TensorParallelError(ValueError):
    """A tensor-parallel layout kvshrink cannot serve, or a method that cannot run on it."""


def is_initialized() -> bool:
    """Whether a `torch.distributed` process group is up (False when torch.distributed is not built)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@dataclass(frozen=True)
class HeadShard:
    """The KV heads one rank of a tensor-parallel model holds: global heads [start, stop) of `total`, on rank `rank`
    of a TP group of `size` processes (`group`, a torch.distributed process group)."""

    group: Any
    rank: int
    size: int
    start: int
    stop: int
    total: int

    @property
    def heads(self) -> int:
        return self.stop - self.start

    def describe(self) -> dict[str, Any]:
        """JSON-ready: what the memory report and saved caches record."""
        return {"rank": self.rank, "size": self.size, "kv_heads": [self.start, self.stop], "of": self.total}

    def gather_heads(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """`x` (this rank's heads along `dim`) from every rank, concatenated in global head order. A collective:
        every rank of the group must call it with the same shape."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim)

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over the ranks of the group (a new tensor; a collective)."""
        out = x.contiguous().clone()
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM, group=self.group)
        return out

    def sum_counts(self, values: list[int]) -> list[int]:
        """Integers summed over the ranks (byte counts for a memory report; a collective)."""
        device = torch.device("cpu")
        if torch.distributed.get_backend(self.group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        return self.all_reduce_sum(torch.tensor(values, dtype=torch.int64, device=device)).tolist()


def _tensor_parallel_config(config: Any) -> int:
    """The TP size transformers recorded on a config it loaded sharded (1 when none)."""
    dc = getattr(config, "distributed_config", None)
    return int(getattr(dc, "tp_size", None) or 1)


def head_shard(model_or_config: Any) -> HeadShard | None:
    """This rank's KV heads when transformers sharded `model_or_config` (a model) by tensor parallelism, else None.

    A config of a sharded model is refused: which heads a rank holds is read off the model's device mesh.
    """
    config = getattr(model_or_config, "config", model_or_config)
    is_model = hasattr(model_or_config, "parameters") and hasattr(model_or_config, "config")
    if not is_model:
        if _tensor_parallel_config(config) > 1:
            raise TensorParallelError("this config belongs to a tensor-parallel model: make_cache(model, ...) with "
                                      "the model itself, whose device mesh says which KV heads this rank holds")
        return None
    size = int(getattr(model_or_config, "_tp_size", None) or 1)
    mesh = getattr(model_or_config, "_device_mesh", None)
    if size <= 1 or mesh is None or not is_initialized():
        return None
    text = config.get_text_config(decoder=True)
    total = text.num_key_value_heads
    try:
        from transformers.distributed.tensor_parallel import get_kv_heads_per_rank
    except ImportError:  # pragma: no cover - transformers without its 5.x distributed package
        raise TensorParallelError("this transformers has no tensor_parallel.get_kv_heads_per_rank; kvshrink's "
                                  "tensor parallelism follows transformers 5.x") from None
    plan = dict(getattr(model_or_config, "tp_plan", None) or {})
    per_rank = get_kv_heads_per_rank(plan, total, size)
    if per_rank is None:
        raise TensorParallelError(f"{total} KV heads cannot be split evenly over {size} tensor-parallel ranks: "
                                  f"choose a TP size that divides {total}")
    if per_rank == total:  # the plan does not shard the key projection: every rank holds every head
        return None
    if any(key.rsplit(".", 1)[-1] in ("qkv_proj", "query_key_value") for key in plan):
        raise TensorParallelError("fused QKV projections under tensor parallelism are not supported (kvshrink knows "
                                  "the layout of separate k_proj/v_proj sharded 'colwise')")
    tp_mesh = mesh["tp"] if mesh.mesh_dim_names and "tp" in mesh.mesh_dim_names else mesh
    rank = tp_mesh.get_local_rank()
    return HeadShard(tp_mesh.get_group(), rank, size, rank * per_rank, (rank + 1) * per_rank, total)


def gather_heads(shard: HeadShard | None, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """All heads of `x` (this rank's heads along `dim`): `x` itself without a shard."""
    return x if shard is None else shard.gather_heads(x, dim)


def refuse_sharded(model: Any, what: str) -> None:
    """Raise when `model` is head-sharded: `what` (a calibration) must see every KV head, so it runs in one
    process, and its profile then serves any tensor-parallel layout."""
    if head_shard(model) is not None:
        raise TensorParallelError(f"{what} needs every KV head: run it in one process on the unsharded model (the "
                                  "profile it writes serves every tensor-parallel layout)")
