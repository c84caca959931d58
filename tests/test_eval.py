"""The evaluation harness and the benchmark: every metric can fail, records resume, tables and plots are written."""
import json
from dataclasses import dataclass

import pytest
import torch

import kvshrink as ks
from kvshrink.layers import FullLayer
from kvshrink.eval import runner
from kvshrink.eval.bench import bench, parse_length, write_bench
from kvshrink.eval.corpus import pydoc_text, split
from kvshrink.eval.results import plot_results, results_table, summarize
from kvshrink.spec import label as method_label
from kvshrink.eval.runner import evaluate, load_records
from kvshrink.spec import split_specs
from kvshrink.methods.base import METHODS, Method, register

from conftest import tiny_llama


class NoisyPastLayer(FullLayer):
    """Keeps the prefill exact for its own attention, then replaces every stored key and value by noise."""

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        gen = torch.Generator().manual_seed(self.layer_idx)
        self.keys = torch.randn(self.keys.shape, generator=gen) * 3
        self.values = torch.randn(self.values.shape, generator=gen) * 3
        return keys, values


@pytest.fixture(scope="module")
def corrupt_method():
    @dataclass
    class Corrupt(Method):
        name = "test-corrupt"
        summary = "test only: stored keys and values replaced by noise"

        def layer(self, layer_idx, sliding_window):
            return NoisyPastLayer(layer_idx)

    register(Corrupt)
    yield "test-corrupt"
    del METHODS["test-corrupt"]


@pytest.fixture(scope="module")
def tokenizer(real_model):
    return real_model[1]


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return tiny_llama(vocab_size=len(tokenizer), head_dim=32, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


TEXT = split(pydoc_text())[1][:20000]


def _eval(tiny, tokenizer, methods, tmp_path=None, **kw):
    kw.setdefault("tasks", ["ppl", "kl", "match"])
    return evaluate(tiny, methods, tokenizer=tokenizer, contexts=[96], seeds=[0], text=TEXT, continuation=12,
                    match_tokens=8, model_name="tiny", progress=False,
                    output=None if tmp_path is None else tmp_path / "r.jsonl", **kw)


def _metrics(records, method, task):
    (r,) = [r for r in records if r["method"] == method and r["task"] == task]
    return r["metrics"]


def test_split_specs_keeps_options_with_their_method():
    assert split_specs("full,kivi:bits=2,group=32,tada:bits=4") == ["full", "kivi:bits=2,group=32", "tada:bits=4"]
    assert split_specs(["kivi", "bits=2", "full"]) == ["kivi:bits=2", "full"]
    # a composition keeps its bare options with its last part (the codec side)
    assert split_specs("snapkv:budget=0.25 + tada:bits=2,mean=channel,full") == [
        "snapkv:budget=0.25 + tada:bits=2,mean=channel", "full"]
    with pytest.raises(ValueError, match="before any method"):
        split_specs("bits=2,full")


def test_bad_specs_and_tasks_fail_before_any_work(tiny, tokenizer):
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        _eval(tiny, tokenizer, ["full", "nope:bits=2"])
    with pytest.raises(ValueError, match="has no option 'bitz'"):
        _eval(tiny, tokenizer, ["kivi:bitz=2"])
    with pytest.raises(ValueError, match="unknown task 'bleu'"):
        _eval(tiny, tokenizer, ["full"], tasks=["bleu"])
    with pytest.raises(ValueError, match="hf-quanto: bits must be one of"):
        _eval(tiny, tokenizer, ["hf-quanto:bits=3"])
    with pytest.raises(ValueError, match="needs 96"):
        evaluate(tiny, ["full"], tokenizer=tokenizer, contexts=[84], text=TEXT[:300], continuation=12,
                 tasks=["ppl"], progress=False)


def test_full_is_exact_and_a_corrupted_cache_fails_every_metric(tiny, tokenizer, corrupt_method):
    records = _eval(tiny, tokenizer, ["full", corrupt_method, "kivi:bits=8"])
    full_kl, bad_kl = _metrics(records, "full", "kl"), _metrics(records, corrupt_method, "kl")
    assert full_kl["kl"] < 1e-6 and full_kl["top1"] == 1.0
    assert bad_kl["kl"] > 0.05 and bad_kl["top1"] < 1.0
    assert _metrics(records, "full", "match") == {"match": 1.0, "first_divergence": 8, "tokens": 8}
    assert _metrics(records, corrupt_method, "match")["match"] < 1.0
    assert abs(_metrics(records, "full", "ppl")["ppl_change"]) < 1e-5
    assert _metrics(records, corrupt_method, "ppl")["ppl_change"] > 0.01
    assert _metrics(records, "kivi:bits=8", "kl")["kl"] < bad_kl["kl"]
    kivi = [r for r in records if r["method"] == "kivi:bits=8"][0]["memory"]
    assert kivi["tokens"] == 96 + 11 and kivi["nbytes"] < kivi["fp16_nbytes"] * 2
    for r in records:
        assert r["model"] == "tiny" and r["environment"]["torch"] == torch.__version__


def test_records_resume_and_survive_a_cut_line(tiny, tokenizer, tmp_path, monkeypatch, corrupt_method):
    first = _eval(tiny, tokenizer, ["full", "kivi:bits=4"], tmp_path)
    path = tmp_path / "r.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(line)["version"] == runner.RECORD_VERSION for line in lines)

    calls = []
    from kvshrink.eval.tasks.match import GreedyMatch

    original = GreedyMatch.run
    monkeypatch.setattr(GreedyMatch, "run", lambda self, *a: calls.append(a) or original(self, *a))
    again = _eval(tiny, tokenizer, ["full", "kivi:bits=4"], tmp_path)
    assert calls == [] and [r["metrics"] for r in again] == [r["metrics"] for r in first]

    # an interrupted write leaves half a line: it is dropped with a warning and that record is recomputed
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    with pytest.warns(UserWarning, match="unreadable line"):
        assert len(load_records(path)) == 5
    with pytest.warns(UserWarning):
        resumed = _eval(tiny, tokenizer, ["full", "kivi:bits=4"], tmp_path)
    assert len(resumed) == 6 and len(calls) == 1
    assert len(load_records(path)) == 6  # the cut line is gone, the recomputed record appended whole

    # without resume the cells asked for are measured again and appended; the file's other records stay
    calls.clear()
    again = _eval(tiny, tokenizer, ["kivi:bits=4"], tmp_path, resume=False)
    assert len(again) == 3 and len(calls) == 1
    after = load_records(path)
    assert len(after) == 9 and sum(r["method"] == "full" for r in after) == 3


def test_table_and_plot(tiny, tokenizer, tmp_path, corrupt_method):
    records = _eval(tiny, tokenizer, ["full", "kivi:bits=2", corrupt_method])
    rows = summarize(records)
    assert [r["method"] for r in rows] == ["full", "kivi:bits=2", corrupt_method]
    table = results_table(records)
    assert "`kivi:bits=2`" in table and "KL" in table and "match" in table
    png = plot_results(records, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_method_label_shortens_paths_only():
    assert method_label("tada:profile=benchmarks/profiles/m-tada-0.20.json,kernel=torch") == \
        "tada:profile=m-tada-0.20,kernel=torch"
    assert method_label("tale:profile=bases.json,target_ratio=0.11") == "tale:profile=bases,target_ratio=0.11"
    assert method_label("kivi:bits=2") == "kivi:bits=2" and method_label("full") == "full"
    assert method_label("dynakv:profile=b/d.json,levels=r64b4/r32b4,exact_layers=0/1") == \
        "dynakv:profile=d,levels=r64b4/r32b4,exact_layers=0/1"


def test_kl_task_computes_the_divergence_of_known_distributions():
    """KL(reference || method) averaged over positions, on two positions whose divergence is known in closed form."""
    import math

    from kvshrink.eval.tasks.kl import KLDivergence

    ref = torch.tensor([[0.6, 0.4], [0.25, 0.75]]).log()
    got = torch.tensor([[0.1, 0.9], [0.25, 0.75]]).log()

    class Env:
        def logprobs(self, spec, context, seed):
            return (ref if spec is None else got), {"nbytes": 1}

    metrics, memory = KLDivergence().run(Env(), "m", 8, 0)
    first = 0.6 * math.log(0.6 / 0.1) + 0.4 * math.log(0.4 / 0.9)  # 0.7507; the second position is identical: 0
    assert metrics["kl"] == pytest.approx(first / 2, rel=1e-6) and metrics["kl_max"] == pytest.approx(first, rel=1e-6)
    assert metrics["top1"] == 0.5 and metrics["positions"] == 2 and memory == {"nbytes": 1}


def test_quanto_baseline_runs_through_the_same_tasks(tiny, tokenizer):
    import random

    from transformers import DynamicCache

    from kvshrink.eval.baselines import make_baseline_cache

    pytest.importorskip("optimum.quanto")
    records = _eval(tiny, tokenizer, ["hf-quanto:bits=4,residual=32"], tasks=["kl"])
    m = records[0]["memory"]
    # quanto quantizes the 96 prefill tokens (4-bit codes, an fp32 scale and shift per group of 64 values) and keeps
    # the 11 tokens decoded since in its fp32 residual; per layer, for keys and for values:
    heads, dim, layers = tiny.config.num_key_value_heads, tiny.config.head_dim, tiny.config.num_hidden_layers
    quantized = 96 * heads * dim
    per_tensor = quantized // 2 + quantized // 64 * 2 * 4 + 11 * heads * dim * 4
    assert m["tokens"] == 96 + 11 and m["fp16_nbytes"] == layers * 2 * 107 * heads * dim * 2
    assert m["nbytes"] == layers * 2 * per_tensor and m["ratio"] == pytest.approx(m["nbytes"] / m["fp16_nbytes"])
    # the recorded KL equals one computed here, step by step through a fresh quanto cache and a DynamicCache
    ids = tokenizer(TEXT, return_tensors="pt", add_special_tokens=False).input_ids
    start = random.Random("text:0:96").randrange(0, ids.shape[1] - 108 + 1)
    window = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids[:, start + 1:start + 108]], 1)

    def logprobs(cache):
        rows = []
        with torch.no_grad():
            out = tiny(window[:, :96], past_key_values=cache, use_cache=True)
            for i in range(96, 108):
                rows.append(out.logits[0, -1].double().log_softmax(-1))
                out = tiny(window[:, i:i + 1], past_key_values=cache, use_cache=True)
        return torch.stack(rows)

    ref = logprobs(DynamicCache(config=tiny.config))
    got = logprobs(make_baseline_cache(tiny, "hf-quanto:bits=4,residual=32"))
    kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
    assert kl > 1e-5 and records[0]["metrics"]["kl"] == pytest.approx(kl, rel=1e-3)


def test_passkey_task_separates_full_from_a_corrupted_cache(real_model, corrupt_method):
    model, tok = real_model
    records = evaluate(model, ["full", corrupt_method], tokenizer=tok, tasks=["passkey"], contexts=[300], seeds=[0],
                       progress=False)
    assert _metrics(records, "full", "passkey")["accuracy"] == 1.0
    assert _metrics(records, corrupt_method, "passkey")["accuracy"] == 0.0


def test_bench_pairs_each_method_with_the_plain_cache(tiny, tokenizer, tmp_path):
    assert parse_length("4k") == 4096 and parse_length("1500") == 1500
    with pytest.raises(ValueError, match="not a number of tokens"):
        parse_length("lots")
    result = bench(tiny, ["kivi:bits=2,window=16,group=16"], [64], tokenizer=tokenizer, decode_tokens=3,
                   progress=False)
    (run,) = result["runs"]
    assert run["reference"]["cache_nbytes"] > run["method_run"]["cache_nbytes"] > 0
    assert run["cache_bytes_ratio"] == run["method_run"]["cache_nbytes"] / run["reference"]["cache_nbytes"]
    ref, got = run["reference"], run["method_run"]
    for r in (ref, got):  # 3 decoded tokens in the measured decode time
        assert r["decode_tokens_per_s"] == pytest.approx(3 / r["decode_s"])
    assert run["decode_speed_ratio"] == pytest.approx(ref["decode_s"] / got["decode_s"])
    assert run["prefill_time_ratio"] == pytest.approx(got["prefill_s"] / ref["prefill_s"])
    js, md = write_bench(result, tmp_path)
    assert json.loads(js.read_text())["runs"][0]["method"] == "kivi:bits=2,group=16,window=16"  # canonical
    assert "`kivi:bits=2,group=16,window=16`" in md.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([js.name, md.name])


def test_chunked_scoring_equals_stepwise_for_the_plain_cache(tiny, tokenizer):
    from transformers import DynamicCache

    from kvshrink.eval.scoring import score_continuation, score_continuation_chunked

    ids = tokenizer(TEXT[:2000], return_tensors="pt").input_ids[:, :80]
    ctx, cont = ids[:, :64], ids[:, 64:]
    step = score_continuation(tiny, DynamicCache(config=tiny.config), ctx, cont)
    chunk = score_continuation_chunked(tiny, DynamicCache(config=tiny.config), ctx, cont)
    assert step.shape == chunk.shape == (16, len(tokenizer))
    torch.testing.assert_close(step, chunk, atol=1e-4, rtol=1e-4)


def test_records_name_the_source_commit():
    """Every record's environment says which code made it: this checkout's HEAD (git asked independently)."""
    import subprocess
    from pathlib import Path

    from kvshrink.eval.runner import environment, source_commit

    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    commit = environment()["commit"]
    assert commit == source_commit()
    assert commit.removesuffix("+dirty") == head.stdout.strip()


def test_resume_refuses_records_of_another_dtype(tiny, tokenizer, tmp_path):
    """A row's records share one dtype: resuming bfloat16 records with a float32 model is an error naming both, and
    the file is left as it was."""
    _eval(tiny, tokenizer, ["full"], tmp_path)
    path = tmp_path / "r.jsonl"
    records = load_records(path)
    assert {r["dtype"] for r in records} == {"float32"}
    records[0]["dtype"] = "bfloat16"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    before = path.read_text()
    with pytest.raises(ValueError, match=r"1 in bfloat16\) and this run computes in float32.*--dtype bfloat16"):
        _eval(tiny, tokenizer, ["full"], tmp_path)
    assert path.read_text() == before
    # cells not asked for do not count, and measuring again without resume is allowed
    assert len(_eval(tiny, tokenizer, ["kivi:bits=4"], tmp_path)) == 3
    assert len(_eval(tiny, tokenizer, ["full"], tmp_path, resume=False)) == 3


def test_kvzip_cells_share_the_prefill_and_the_pass(tiny, tokenizer, tmp_path):
    specs = ["kvzip:budget=0.5,prompt=none + kivi:bits=4,group=16", "kvzip:budget=0.3,prompt=none,window=8 + kivi:bits=2,group=16"]
    records = evaluate(tiny, ["full", *specs], tokenizer=tokenizer, tasks=["ppl"], contexts=[200], seeds=[0],
                       text=TEXT, continuation=12, model_name="tiny", progress=False, output=tmp_path / "r.jsonl")
    full, a, b = records  # in the order asked
    assert "reconstruction" not in full and full["shared_prefill_seconds"] > 0
    first, second = a["reconstruction"], b["reconstruction"]
    assert first["reused"] is False and second["reused"] is True and second["seconds"] == first["seconds"] > 0
    assert a["metrics"]["ppl"] != b["metrics"]["ppl"]  # each its own budget and codes
    rows = {r["method"]: r for r in summarize(records)}  # the reused pass still counts in the method's seconds
    assert rows[b["method"]]["method_seconds"] >= first["seconds"]
    assert load_records(tmp_path / "r.jsonl")[-1]["reconstruction"] == second
