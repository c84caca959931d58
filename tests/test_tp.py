"""Tensor parallelism: a tiny Llama sharded over 2 ranks by transformers (`tp_plan="auto"`, torchrun, gloo on the
CPU) with one method per family gives a single process's greedy tokens, the same cross-head state (TaDA's head
mean, the positions kept, the low-rank levels) and, summed over the ranks, the same bytes plus each rank's copy of
what it replicates. The first tests check the pieces in one process, with a stand-in for the other ranks."""
import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

import kvshrink as ks
from kvshrink.bases import bases_profile, rank_bases
from kvshrink.codecs.quant import GroupCodec
from kvshrink.codecs.store import PagedStore
from kvshrink.codecs.rotation import RotationCodec, signs
from kvshrink.distributed import HeadShard, TensorParallelError, head_shard

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build")

WORKER = Path(__file__).with_name("tp_worker.py")
RANKS = 2
NEW_TOKENS = 24
# parts every rank keeps a whole copy of (the rest is split by KV heads)
REPLICATED = {"tada": {"means"}, "dynakv": {"codes", "scales", "levels"}, "kvdirect": {"residuals", "positions"}}


def _specs(tale: Path, dynakv: Path) -> list[str]:
    return ["full", "kivi:bits=2,group=16", "tada:bits=2,group=16", "tada:bits=2,group=16,mean_heads=rank",
            "turboquant:bits=3", "tova:budget=0.5", "h2o:budget=0.5", "snapkv:budget=0.5",
            "mixed:policy=tova,codec=rotated,bits=3", f"lowrank:profile={tale},rank=8",
            f"tale:profile={tale},target_ratio=0.2", f"dynakv:profile={dynakv},target_ratio=0.2,keep=0.75,pool=3",
            "kvdirect", "kvdirect:scheme=token,window=8"]


class Peers(HeadShard):
    """Rank 1 of 2 holding KV heads 2-3 of 4, whose "other rank" is a tensor of every head."""

    def __init__(self, every: torch.Tensor):
        super().__init__(None, 1, 2, 2, 4, 4)
        object.__setattr__(self, "every", every)

    def gather_heads(self, x, dim=1):
        assert torch.equal(x, self.every[:, self.start:self.stop]), "a rank hands over its own heads"
        return self.every


def test_without_tensor_parallelism_nothing_is_sharded():
    from transformers.distributed import DistributedConfig

    model = tiny_llama()
    assert head_shard(model) is None and head_shard(model.config) is None
    assert ks.make_cache(model, "tada:group=16").memory_report()["tensor_parallel"] is None
    config = copy.deepcopy(model.config)
    config.distributed_config = DistributedConfig(tp_size=2)
    with pytest.raises(TensorParallelError, match="make_cache\\(model"):
        ks.make_cache(config, "kivi:group=16")


def test_a_rank_stores_its_heads_with_the_head_mean_of_every_head():
    x = torch.randn(1, 4, 32, 16, generator=torch.Generator().manual_seed(0)) * 3
    one = PagedStore(GroupCodec(2, 16, "token", "head"), "keys")
    one.append(x)
    mine = PagedStore(GroupCodec(2, 16, "token", "head"), "keys")
    mine.shard = Peers(x)
    mine.append(x[:, 2:])
    assert torch.equal(mine.field("head_mean"), one.field("head_mean"))
    assert torch.equal(mine.field("codes"), one.field("codes")[:, 2:])
    assert torch.equal(mine.field("scale"), one.field("scale")[:, 2:])
    assert torch.equal(mine.decode(torch.float32), one.decode(torch.float32)[:, 2:])
    own = PagedStore(GroupCodec(2, 16, "token", "head", "rank"), "keys")  # the rank's own heads: another mean
    own.shard = mine.shard
    own.append(x[:, 2:])
    assert not torch.allclose(own.field("head_mean").float(), one.field("head_mean").float(), atol=0.1)


def test_a_rank_rotates_its_heads_as_one_process_does_and_slices_their_bases():
    store = PagedStore(RotationCodec(3, layer=1), "values")
    store.shard = Peers(torch.zeros(1, 4, 1, 16))
    assert torch.equal(store.codec.signs(store, 2, 16), signs(0, 1, 4, 16)[2:])
    kb, ks_, vb, vs = (torch.randn(4, 16, 16), torch.rand(4, 16), torch.randn(4, 16, 16), torch.rand(4, 16))
    shard = Peers(torch.zeros(1, 4, 1, 16))
    assert all(torch.equal(a, b[2:]) for a, b in zip(rank_bases((kb, ks_, vb, vs), shard, False), (kb, ks_, vb, vs)))
    jk, js = torch.randn(1, 64, 48), torch.rand(1, 48)
    k, s_, v, _ = rank_bases((jk, js, jk, js), shard, True)
    assert torch.equal(k, jk[:, 32:64]) and torch.equal(s_, js)  # rows of heads 2-3; one sigma per coefficient


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate(model, cache, ids):
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(per-rank worker results, single-process results by spec, the job, the output folder)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tp")
    model = tiny_llama(num_attention_heads=8, num_key_value_heads=4)  # 2 KV heads (4 query heads) per rank
    model.save_pretrained(root / "model")
    ids = torch.randint(2, 95, (1, 512), generator=torch.Generator().manual_seed(0))
    for method in ("tale", "dynakv"):
        bases_profile(model, ids, method=method, samples=2, context=256, progress=False).save(root / f"{method}.json")
    prompt = torch.randint(2, 95, (96,), generator=torch.Generator().manual_seed(1)).tolist()
    job = {"prompt": prompt, "new_tokens": NEW_TOKENS, "specs": _specs(root / "tale.json", root / "dynakv.json")}
    (root / "job.json").write_text(json.dumps(job))
    out = root / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(RANKS), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), str(WORKER), str(root / "model"), str(out),
           str(root / "job.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in {e.timeout} s:\n{(e.stderr or '')[-3000:]}")
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(RANKS)]

    single = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    reference = {}
    for spec in job["specs"]:
        cache = ks.make_cache(single, spec)
        reference[spec] = {"tokens": _generate(single, cache, ids), "report": cache.memory_report(), "cache": cache}
    return ranks, reference, job, out, single


def _method(spec: str) -> str:
    return spec.partition(":")[0]


@needs_gloo
def test_every_method_family_keeps_the_single_process_tokens_on_every_rank(run):
    ranks, reference, job, _, _ = run
    for spec in job["specs"]:
        for r, results in enumerate(ranks):
            assert "error" not in results[spec], f"{spec} on rank {r}: {results[spec]['error']}"
        assert ranks[0][spec]["tokens"] == ranks[1][spec]["tokens"], f"{spec}: the ranks disagree"
        if spec.endswith("mean_heads=rank"):
            continue  # a different codec under TP (each rank's own head mean), checked below
        assert ranks[0][spec]["tokens"] == reference[spec]["tokens"], f"{spec}: not the single-process tokens"


def _single_probe(cache, name: str) -> torch.Tensor:
    from tp_worker import lookup

    return lookup(cache.layers[-1], name).float()


@needs_gloo
def test_cross_head_state_is_the_single_process_state(run):
    """Each rank's head mean, kept positions and level map are the single process's (for its heads)."""
    ranks, reference, job, _, single = run
    heads = single.config.num_key_value_heads
    probed = set()
    for spec in job["specs"]:
        for r, results in enumerate(ranks):
            for name, value in results[spec]["probe"].items():
                mine = torch.tensor(value)
                want = _single_probe(reference[spec]["cache"], name)
                if want.shape[1] == heads and mine.shape[1] != heads:  # per head: this rank's slice
                    per = mine.shape[1]
                    want = want[:, r * per:(r + 1) * per]
                assert mine.shape == want.shape, f"{spec} rank {r} {name}: {mine.shape} vs {want.shape}"
                probed.add((_method(spec), name))
                if name.endswith("head_mean"):
                    # fp16 means of keys computed through the sharded projections: within an fp16 step or two
                    close = torch.allclose(mine, want, atol=5e-3, rtol=5e-3)
                    assert close != spec.endswith("mean_heads=rank"), f"{spec} rank {r} {name}"
                else:
                    assert torch.equal(mine, want), f"{spec} rank {r} {name}"
    assert {("tada", "key_store.head_mean"), ("tova", "positions"), ("mixed", "positions"), ("snapkv", "positions"),
            ("tale", "level_map"), ("dynakv", "level_map")} <= probed


@needs_gloo
def test_memory_reports_are_per_rank_and_sum_to_the_single_process_bytes(run):
    ranks, reference, job, _, single = run
    for spec in job["specs"]:
        want = reference[spec]["report"]
        replicated = REPLICATED.get(_method(spec), set())
        for r, results in enumerate(ranks):
            mine, total = results[spec]["rank_report"], results[spec]["total_report"]
            assert mine["tensor_parallel"] == {"rank": r, "size": RANKS, "kv_heads": [2 * r, 2 * r + 2], "of": 4,
                                               "scope": "rank"}
            assert total["tensor_parallel"]["scope"] == "all ranks"
            assert mine["fp16_nbytes"] * RANKS == total["fp16_nbytes"] == want["fp16_nbytes"], spec
            assert total["nbytes"] == sum(total["by_part"].values()) == sum(row["nbytes"] for row in total["by_layer"])
            for part, n in want["by_part"].items():
                expect = RANKS * n if part in replicated else n
                if part == "bases" and _method(spec) == "dynakv":  # the basis rows split; the sigmas are copied
                    sigmas = sum(t.numel() * t.element_size() for layer in reference[spec]["cache"].layers
                                 for t in (layer.key_sigma, layer.value_sigma))
                    expect = n + (RANKS - 1) * sigmas
                assert total["by_part"][part] == expect, f"{spec}: {part} {total['by_part'][part]} vs {expect}"
        totals = [results[spec]["total_report"] for results in ranks]
        assert all((t["nbytes"], t["by_part"]) == (totals[0]["nbytes"], totals[0]["by_part"]) for t in totals)


@needs_gloo
def test_a_sharded_model_refuses_what_needs_every_head(run, tmp_path):
    ranks, _, _, out, single = run
    for r, results in enumerate(ranks):
        refused = results["refusals"]
        assert "TensorParallelError" in refused["config"] and "make_cache(model" in refused["config"]
        assert "TensorParallelError" in refused["bases"] and "one process" in refused["bases"]
        assert "CacheFileError" in refused["other_rank"] and f"rank {1 - r} of 2" in refused["other_rank"]
        own, saved = refused["own_rank_nbytes"]
        assert own == saved > 0
    with pytest.raises(ks.CacheFileError, match="tensor-parallel rank 0 of 2 .*this process is one process"):
        ks.load_cache(out / "rank0.safetensors", single)
