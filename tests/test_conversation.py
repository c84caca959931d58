"""The 20-turn conversation benchmark (KV-Direct's experiment): generator, teacher forcing and per-turn records."""
import copy

import pytest
import torch

import kvshrink as ks
from kvshrink.eval.conversation import PeakMemory, _turn_ids, make_conversation, play, turn_format


def test_conversations_are_deterministic_and_distinct_per_seed():
    a, b, c = make_conversation(5, 200, seed=0), make_conversation(5, 200, seed=0), make_conversation(5, 200, seed=1)
    assert a.user_turns == b.user_turns and a.user_turns != c.user_turns
    assert len(a.user_turns) == 5 and all(len(t) < 200 + 120 for t in a.user_turns)
    with pytest.raises(ValueError, match="turns must be >= 1"):
        make_conversation(0)


def test_peak_memory_sees_a_transient_allocation():
    with PeakMemory() as before:
        pass
    with PeakMemory() as during:
        block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched, freed again before the block ends
        block.add_(1)
        del block
    if not during.exact:  # reported as a skip, not a pass: a 1 ms sampler can miss an allocation this short
        pytest.skip("this kernel refuses a reset of VmHWM (/proc/self/clear_refs)")
    assert during.peak >= before.peak + (32 << 20) and during.growth >= 32 << 20


def test_nested_peak_memory_keeps_what_the_outer_block_saw():
    with PeakMemory() as outer:
        block = torch.ones(64 << 20, dtype=torch.uint8)
        block.add_(1)
        del block
        with PeakMemory() as inner:  # resets the kernel's high-water mark
            pass
    assert outer.growth >= 32 << 20 and inner.growth < 32 << 20


def test_later_turns_carry_no_system_prompt(real_model):
    _, tok = real_model
    first = tok.decode(_turn_ids(tok, "hello there", first=True)[0])
    later = tok.decode(_turn_ids(tok, "hello there", first=False)[0])
    assert first.endswith(later) and later.startswith("<|im_start|>user") and "system" not in later


def test_a_tokenizer_without_a_chat_template_gets_a_plain_transcript(real_model):
    _, tok = real_model
    base = copy.deepcopy(tok)
    base.chat_template = None  # as Gemma 3 270M's base-model tokenizer ships here
    assert turn_format(tok) == "chat template" and turn_format(base) == "plain transcript"
    first = base.decode(_turn_ids(base, "hello there", first=True)[0])
    later = base.decode(_turn_ids(base, "hello there", first=False)[0])
    assert first.endswith("User: hello there\nAssistant:") and later == "\n\nUser: hello there\nAssistant:"
    if base.bos_token is not None and base.add_bos_token:
        assert first.startswith(base.bos_token)


def test_teacher_forcing_scores_full_at_one_and_bounds_eviction_memory(real_model):
    model, tok = real_model
    conv = make_conversation(3, 300, seed=0)
    stops = (tok.eos_token_id,)
    reference, ref_turns = play(model, tok, ks.make_cache(model, "full"), conv, None, 12, stops)
    assert [len(r) for r in reference] == [t["reply_tokens"] for t in ref_turns]
    _, same = play(model, tok, ks.make_cache(model, "full"), conv, reference, stop_ids=stops)
    assert [t["match"] for t in same] == [1.0, 1.0, 1.0]
    assert same[-1]["tokens"] == sum(t["prompt_tokens"] + t["reply_tokens"] for t in same)
    _, exact = play(model, tok, ks.make_cache(model, "kvdirect:scheme=token,window=32"), conv, reference,
                    stop_ids=stops)
    assert [t["match"] for t in exact] == [1.0, 1.0, 1.0]
    _, evicted = play(model, tok, ks.make_cache(model, "streamingllm:tokens=32"), conv, reference, stop_ids=stops)
    assert evicted[-1]["cache_bytes"] == evicted[0]["cache_bytes"] < same[-1]["cache_bytes"] / 4
