"""Run by `tests/test_tp.py` under `torchrun`: greedy generation with kvshrink caches on a tensor-parallel model.

    python -m torch.distributed.run --nproc-per-node 2 tests/tp_worker.py MODEL_DIR OUT_DIR JOB_FILE

Every rank loads MODEL_DIR with transformers' tensor parallelism (`tp_plan="auto"`), generates greedily from the
prompt in JOB_FILE with each method spec listed there, and writes `rank<r>.json` to OUT_DIR: per spec, the new
tokens, this rank's memory report, the report summed over the ranks and a probe of the last layer's cross-head
state, or the error the spec raised; and under "refusals", what kvshrink refuses on a sharded model.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

PROBES = ("key_store.head_mean", "value_store.head_mean", "positions", "level_map")


def probe(cache) -> dict:
    """The last layer's state that spans heads or picks tokens (TaDA's head means, kept positions, low-rank levels),
    for the test to compare with a single process's."""
    out = {}
    for name in PROBES:
        obj = lookup(cache.layers[-1], name)
        if isinstance(obj, torch.Tensor):
            out[name] = obj.float().tolist()
    return out


def lookup(layer, name: str):
    """A layer's attribute by dotted path; a store's declared field (`key_store.head_mean`) over all its pages."""
    obj = layer
    for part in name.split("."):
        field = getattr(obj, "field", None)
        if callable(field) and getattr(obj, "layout", None) is not None:
            obj = field(part) if part in {f.name for f in obj.layout.growing} else None
        else:
            obj = getattr(obj, part, None)
    return obj


def generate(model, cache, ids: torch.Tensor, new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def run(model, spec: str, ids: torch.Tensor, new_tokens: int) -> dict:
    import kvshrink as ks

    try:
        cache = ks.make_cache(model, spec)
    except Exception as e:  # reported, so that the test names the method that failed
        return {"error": f"{type(e).__name__}: {e}"}
    return {"tokens": generate(model, cache, ids, new_tokens), "rank_report": cache.memory_report(),
            "total_report": cache.memory_report(across_ranks=True), "probe": probe(cache)}


def error_of(fn) -> str | None:
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def refusals(model, ids: torch.Tensor, out_dir: Path, rank: int, size: int) -> dict:
    """What a sharded model refuses: a cache built from its config, fitting bases on it, and another rank's file."""
    import kvshrink as ks
    from kvshrink.bases import bases_profile

    out = {"config": error_of(lambda: ks.make_cache(model.config, "kivi:group=16")),
           "bases": error_of(lambda: bases_profile(model, ids, method="tale", samples=1, context=64,
                                                   progress=False))}
    cache = ks.make_cache(model, "kivi:bits=2,group=16")
    generate(model, cache, ids, 2)
    cache.save(out_dir / f"rank{rank}.safetensors")
    torch.distributed.barrier()
    out["other_rank"] = error_of(lambda: ks.load_cache(out_dir / f"rank{(rank + 1) % size}.safetensors", model))
    out["own_rank_nbytes"] = [ks.load_cache(out_dir / f"rank{rank}.safetensors", model).nbytes(), cache.nbytes()]
    return out


def main(model_dir: str, out_dir: str, job_file: str) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    job = json.loads(Path(job_file).read_text())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 distributed_config=DistributedConfig(tp_plan="auto")).eval()
    rank, size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ids = torch.tensor([job["prompt"]])
    results = {spec: run(model, spec, ids, job["new_tokens"]) for spec in job["specs"]}
    results["refusals"] = refusals(model, ids, Path(out_dir), rank, size)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
