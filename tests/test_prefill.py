"""Prefill once, replay into every method: the replayed cache is the cache a prefill through the method builds."""
import pytest
import torch
from conftest import tiny_gemma3, tiny_llama

import kvshrink as ks
from kvshrink.eval.prefill import record_prefill, replay, replayable
from kvshrink.eval.scoring import continue_greedy
from kvshrink.models import last_logits_only

SPECS = ["full", "kivi:bits=2,group=8,window=8", "tada:bits=4,group=8,window=8", "tada:bits=2,mean=channel,group=8,window=8",
         "snapkv:budget=0.3,window=8", "h2o:budget=0.3,window=8", "tova:budget=0.3,window=8",
         "streamingllm:budget=0.3,window=8", "mixed:budget=0.5,group=8,window=8"]


def _state(cache):
    """Every tensor a kvshrink cache holds, layer by layer, in a fixed order."""
    out = []
    for layer in cache.layers:
        for part, tensors in sorted(layer.parts().items()):
            out.extend((part, t) for t in tensors)
    return out


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
@pytest.mark.parametrize("spec", SPECS)
def test_a_replayed_cache_equals_a_prefilled_one(make, spec):
    model = make()
    ids = torch.randint(2, 95, (1, 70), generator=torch.Generator().manual_seed(1))
    through = ks.make_cache(model, spec)
    with torch.no_grad():
        logits = model(ids, past_key_values=through, use_cache=True, **last_logits_only(model)).logits[:, -1]
    record = record_prefill(model, ids)
    replayed = ks.make_cache(model, spec)
    assert replayable(replayed, ids.shape[1])
    assert torch.equal(replay(record, replayed), logits)
    a, b = _state(through), _state(replayed)
    assert [p for p, _ in a] == [p for p, _ in b]
    for (part, x), (_, y) in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y), part
    assert through.memory_report()["nbytes"] == replayed.memory_report()["nbytes"]
    ta = continue_greedy(model, through, logits, 12)
    tb = continue_greedy(model, replayed, record.logits, 12)
    assert torch.equal(ta, tb)


def test_continue_greedy_is_generate():
    model = tiny_llama()
    ids = torch.randint(2, 95, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model.generate(ids, past_key_values=ks.make_cache(model, "full"), max_new_tokens=15,
                             min_new_tokens=15, do_sample=False, pad_token_id=0)[0, 40:]
    record = record_prefill(model, ids)
    cache = ks.make_cache(model, "full")
    assert torch.equal(continue_greedy(model, cache, replay(record, cache), 15), ref)
    cache = ks.make_cache(model, "full")
    stop = int(ref[5])
    out = continue_greedy(model, cache, replay(record, cache), 15, stop_ids=[stop])
    first = ref.tolist().index(stop)
    assert out.tolist() == ref[:first + 1].tolist()  # ends with the stop token


def test_the_quanto_baseline_replays():
    pytest.importorskip("optimum.quanto")
    from kvshrink.eval.baselines import make_baseline_cache

    model = tiny_llama(head_dim=32)
    ids = torch.randint(2, 95, (1, 80), generator=torch.Generator().manual_seed(2))
    through = make_baseline_cache(model, "hf-quanto:bits=4")
    with torch.no_grad():
        logits = model(ids, past_key_values=through, use_cache=True, **last_logits_only(model)).logits[:, -1]
    replayed = make_baseline_cache(model, "hf-quanto:bits=4")
    assert replayable(replayed)
    record = record_prefill(model, ids)
    assert torch.equal(replay(record, replayed), logits)
    assert torch.equal(continue_greedy(model, through, logits, 10), continue_greedy(model, replayed, logits, 10))


def test_methods_that_change_the_prefill_are_not_replayed():
    model = tiny_llama()
    cache = ks.make_cache(model, "kvdirect")
    assert not replayable(cache)
    record = record_prefill(model, torch.randint(2, 95, (1, 20)))
    with pytest.raises(ValueError, match="change the prefill"):
        replay(record, cache)


def test_a_kernel_attending_cache_replays_long_prompts_only():
    from kvshrink import kernels
    from kvshrink.kernels import cpu

    if cpu.unavailable() is not None:
        pytest.skip(f"the CPU kernel is unavailable here: {cpu.unavailable()}")
    model = tiny_llama()
    cache = ks.make_cache(model, "kivi:bits=2,group=8,window=8,kernel=cpu")
    assert all(layer.backend == "cpu" for layer in cache.layers)  # (the check read a removed attribute and skipped)
    short, long = kernels.MAX_QUERY_TOKENS, kernels.MAX_QUERY_TOKENS + 1
    assert replayable(cache, long) and not replayable(cache, short) and not replayable(cache)
    with pytest.raises(ValueError, match="change the prefill"):  # the kernel answers a short prompt itself
        replay(record_prefill(model, torch.randint(2, 95, (1, short))), cache)
    ids = torch.randint(2, 95, (1, 40), generator=torch.Generator().manual_seed(5))
    through = ks.make_cache(model, "kivi:bits=2,group=8,window=8,kernel=cpu")
    with torch.no_grad():
        logits = model(ids, past_key_values=through, use_cache=True, **last_logits_only(model)).logits[:, -1]
    assert torch.equal(replay(record_prefill(model, ids), cache), logits)
    assert torch.equal(continue_greedy(model, through, logits, 8), continue_greedy(model, cache, logits, 8))


def test_a_prefill_computes_the_last_logits_only_as_generate_does():
    """The recorded prefill asks for the last position's logits only (`logits_to_keep=1`, which generate() passes
    too): the same bits as generate's prefill, and no [tokens x vocab] tensor; a forward without the keyword gets
    none."""
    model = tiny_llama()
    assert last_logits_only(model) == {"logits_to_keep": 1}
    assert last_logits_only(lambda input_ids, past_key_values=None: None) == {}
    assert last_logits_only(object()) == {}
    ids = torch.randint(2, 95, (1, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, logits_to_keep=1)
    record = record_prefill(model, ids)
    assert out.logits.shape[1] == 1 and torch.equal(record.logits, out.logits[:, -1])
