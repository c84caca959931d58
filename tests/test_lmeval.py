"""lm-evaluation-harness adapter: requests go through a kvshrink cache; `full` equals lm-eval's own HF model."""
import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the test extra")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

import kvshrink as ks  # noqa: E402
from kvshrink.eval.corpus import pydoc_text  # noqa: E402
from kvshrink.lmeval import KVShrinkLM, method_spec  # noqa: E402

TEXT = pydoc_text()


def _requests(n=3, context_chars=3000):
    reqs = []
    for i in range(n):
        start = 20000 + 7000 * i
        ctx, cont = TEXT[start:start + context_chars], TEXT[start + context_chars:start + context_chars + 60]
        reqs.append(Instance("loglikelihood", {}, (ctx, cont), i))
    return reqs


def test_method_args_from_model_args():
    extra = {"bits": "2", "group": "16", "batch_size": 1}
    assert method_spec("kivi", extra) == "kivi:bits=2,group=16"
    assert extra == {"batch_size": 1}  # what is not a method option stays for lm-eval
    assert method_spec("tada:bits=2;mean=channel", {}) == "tada:bits=2,mean=channel"
    assert method_spec("snapkv:budget=0.25 + tada", {"bits": "3"}) == "snapkv:budget=0.25 + tada:bits=3"
    with pytest.raises(ValueError, match="unknown method 'zip'"):
        method_spec("zip", {})


def test_full_equals_lm_evals_own_model_and_compression_shows(real_model):
    model, tok = real_model
    reqs = _requests()
    plain = HFLM(pretrained=model, tokenizer=tok, backend="causal", device="cpu", batch_size=1)
    ref = plain.loglikelihood(reqs)
    full = KVShrinkLM(pretrained="smollm2-135m", method="full").loglikelihood(reqs)
    for (a, ga), (b, gb) in zip(ref, full):
        assert a == pytest.approx(b, abs=2e-3) and ga == gb
    squeezed = KVShrinkLM(pretrained="smollm2-135m", method="kivi", bits=2, window=0, sinks=0).loglikelihood(reqs)
    assert sum(a for a, _ in squeezed) < sum(a for a, _ in ref) - 1.0  # 2-bit codes cost likelihood


def test_simple_evaluate_on_a_local_task(tmp_path):
    from lm_eval.tasks import TaskManager

    docs = []
    for i in range(4):
        key = str(10000 + 1111 * i)
        docs.append({"question": f"{TEXT[5000 * i:5000 * i + 1500]}\nThe pass key is {key}. {TEXT[900:1500]}\n"
                                 "What is the pass key?", "choices": [key, str(int(key) + 7)], "answer": 0,
                     "target": key})
    data = tmp_path / "smoke.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
              "doc_to_text: \"{{question}}\"\n")
    (tmp_path / "mc.yaml").write_text("task: kvshrink_smoke_mc\n" + common + "output_type: multiple_choice\n"
                                      "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
                                      "metric_list:\n  - metric: acc\n")
    (tmp_path / "gen.yaml").write_text("task: kvshrink_smoke_gen\n" + common + "output_type: generate_until\n"
                                       "doc_to_target: \"{{target}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n"
                                       "  max_gen_toks: 8\nmetric_list:\n  - metric: exact_match\n")
    out = lm_eval.simple_evaluate(model="kvshrink", model_args="pretrained=smollm2-135m,method=kivi,bits=4",
                                  tasks=["kvshrink_smoke_mc", "kvshrink_smoke_gen"],
                                  task_manager=TaskManager(include_path=str(tmp_path)), device="cpu")
    res = out["results"]
    assert 0.0 <= res["kvshrink_smoke_mc"]["acc,none"] <= 1.0
    assert "exact_match,none" in res["kvshrink_smoke_gen"]


def test_the_command_line_runs_kvshrink_only():
    from kvshrink.lmeval import main

    with pytest.raises(SystemExit, match="runs the model 'kvshrink', not 'hf'"):
        main(["--model", "hf", "--tasks", "x"])
