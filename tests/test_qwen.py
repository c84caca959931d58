"""Qwen2.5-Coder-1.5B-Instruct, where it is installed (`make setup-qwen`); skipped elsewhere, CI included."""
import pytest
import torch

import kvshrink as ks
from kvshrink.eval import ruler
from kvshrink.eval.prefill import record_prefill, replay
from kvshrink.eval.scoring import continue_greedy, stop_tokens

pytestmark = pytest.mark.qwen


@pytest.fixture(scope="module")
def qwen():
    try:
        return ks.load_model("qwen2.5-coder-1.5b")
    except ks.ModelNotAvailable as e:
        pytest.skip(f"Qwen2.5-Coder-1.5B is not installed here ({e})")


def test_qwen_loads_in_its_dtype_and_finds_a_needle_through_full_and_a_replayed_2bit_cache(qwen):
    from kvshrink import models

    model, tok = qwen
    cfg = model.config
    # bf16 where the CPU computes it natively, float32 elsewhere (AVX2-only: bf16 is emulated, ~7x slower)
    assert model.dtype == (torch.bfloat16 if models.native_bf16() else torch.float32)
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads) == (28, 2, 128)
    sample = ruler.ruler_sample("niah_single_1", tok, 1024, seed=0)
    ids = torch.tensor([sample.input_ids])
    record = record_prefill(model, ids)
    stops = stop_tokens(model, tok)
    for spec in ("full", "kivi:bits=2"):
        cache = ks.make_cache(model, spec)
        out = continue_greedy(model, cache, replay(record, cache), 24, stops)
        answer = tok.decode(out, skip_special_tokens=True)
        assert ruler.string_match_all(answer, sample.references) == 1.0, (spec, answer)
    report = cache.memory_report()
    assert 0.15 < report["ratio"] < 0.3
