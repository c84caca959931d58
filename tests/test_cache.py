import pytest
import torch
from transformers import DynamicCache

import kvshrink as ks
from conftest import greedy, tiny_gemma3, tiny_llama


def _prompt(n=40, seed=1, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 90, (batch, n), generator=g)


def _held_tensors(obj, seen=None):
    """Every tensor reachable from an object's attributes: an independent walk, not the layers' own parts()."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _held_tensors(o, seen)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _held_tensors(o, seen)]
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("kvshrink"):
        return [t for o in vars(obj).values() for t in _held_tensors(o, seen)]
    return []


def test_full_is_dynamic_cache():
    model, ids = tiny_llama(), _prompt()
    assert torch.equal(greedy(model, ids, ks.make_cache(model, "full")), greedy(model, ids, DynamicCache(config=model.config)))


@pytest.mark.parametrize("spec", ["kivi:bits=16,group=8,window=4", "tada:bits=16,group=8,window=4",
                                  "tada:bits=16,group=8,window=0,sinks=3,mean=channel"])
def test_lossless_settings_reproduce_reference(spec):
    # a 16-bit model: its keys and values are exactly representable in the fp16 store (an fp32 model's are not).
    # The storage is what is tested, so attention is SDPA's as for the reference (the CPU kernel accumulates in fp32,
    # which on a random bf16 model can flip a later greedy token; tests/test_cpu_decode.py covers the kernel).
    spec += ",kernel=torch"
    model, ids = tiny_llama().to(torch.bfloat16), _prompt()
    ref = greedy(model, ids, DynamicCache(config=model.config), n=32)
    assert torch.equal(greedy(model, ids, ks.make_cache(model, spec), n=32), ref)


def test_prefill_attends_in_full_precision():
    """The logits of the prompt itself do not depend on the compression; the next steps do."""
    model, ids = tiny_llama(), _prompt(64)
    with torch.no_grad():
        ref = model(ids, past_key_values=DynamicCache(config=model.config)).logits
        cache = ks.make_cache(model, "kivi", bits=2, group=8, window=0)
        out = model(ids, past_key_values=cache).logits
        assert torch.equal(out, ref)
        nxt = torch.tensor([[5]])
        step_ref = model(torch.cat([ids, nxt], 1)).logits[:, -1]
        step = model(nxt, past_key_values=cache).logits[:, -1]
    assert not torch.allclose(step, step_ref, atol=1e-4)  # the past was really compressed to 2 bits
    assert cache.get_seq_length() == 65


def test_hand_written_loop_matches_generate():
    model, ids = tiny_llama(), _prompt()
    cache = ks.make_cache(model, "kivi", bits=4, group=8, window=8)
    toks = []
    with torch.no_grad():
        logits = model(ids, past_key_values=cache).logits[:, -1]
        for _ in range(12):
            nxt = logits.argmax(-1, keepdim=True)
            toks.append(nxt)
            logits = model(nxt, past_key_values=cache).logits[:, -1]
    loop = torch.cat(toks, 1)
    assert torch.equal(loop, greedy(model, ids, ks.make_cache(model, "kivi", bits=4, group=8, window=8), n=12))


def test_window_and_blocks():
    model, ids = tiny_llama(), _prompt(45)
    cache = ks.make_cache(model, "kivi", bits=4, group=8, window=10, sinks=2)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    layer = cache.layers[0]
    # 45 tokens: 2 sinks, then blocks of 8 leave 10..17 in the window: 32 stored, 11 in the window
    assert layer.sink_keys.shape[-2] == 2 and layer.key_store.tokens == 32 and layer.keys.shape[-2] == 11
    assert layer.held() == 45 and layer.get_mask_sizes(1) == (46, 0)


def test_nbytes_is_the_sum_of_every_held_tensor():
    model, ids = tiny_llama(), _prompt(70, batch=2)
    for spec in ("full", "kivi:bits=2,group=8,window=8", "tada:bits=3,group=8,window=8", "tada:bits=4,group=8,mean=channel"):
        cache = ks.make_cache(model, spec)
        greedy(model, ids, cache, n=5)
        walked = _held_tensors(cache.layers)
        assert walked, spec
        assert cache.nbytes() == sum(t.numel() * t.element_size() for t in walked), spec
        report = cache.memory_report()
        assert report["nbytes"] == cache.nbytes() == sum(report["by_part"].values())
        # K+V, fp16, batch 2, 2 heads, dim 16, 74 tokens (the 5th new token is never fed back), 2 layers
        assert report["fp16_nbytes"] == 2 * 2 * 2 * 2 * 16 * 74 * 2
        assert report["tokens"] == 74 and len(report["by_layer"]) == 2


def test_memory_report_parts_follow_bits():
    model, ids = tiny_llama(), _prompt(200)
    sizes = {}
    for bits in (2, 3, 4, 8):
        cache = ks.make_cache(model, "kivi", bits=bits, group=8, window=0, sinks=0)
        with torch.no_grad():
            model(ids, past_key_values=cache)
        sizes[bits] = cache.memory_report()["by_part"]["codes"]
    # 200 tokens x 2 heads x 16 channels x (K, V) x 2 layers codes at `bits` each, packed
    assert sizes == {b: 200 * 2 * 16 * 2 * 2 * b // 8 for b in (2, 3, 4, 8)}


def test_head_mean_cost_is_reported():
    model, ids = tiny_llama(), _prompt(128)
    head, chan = ks.make_cache(model, "tada", bits=2, group=8, window=0, sinks=0), ks.make_cache(model, "tada", bits=2, group=8, window=0, sinks=0, mean="channel")
    with torch.no_grad():
        model(ids, past_key_values=head)
        model(ids, past_key_values=chan)
    # one fp16 vector of 16 per token per layer for K and for V
    assert head.memory_report()["by_part"]["means"] == 128 * 16 * 2 * 2 * 2
    assert chan.memory_report()["by_part"]["means"] == 2 * 16 * 2 * 2 * 2  # per head and channel, once
    assert head.nbytes() > chan.nbytes()


def test_batch_with_left_padding_matches_single_sequences():
    model = tiny_llama().to(torch.bfloat16)
    a, b = _prompt(30, seed=2), _prompt(41, seed=3)
    ids = torch.cat([torch.cat([torch.zeros(1, 11, dtype=torch.long), a], 1), b])
    mask = torch.cat([torch.cat([torch.zeros(1, 11, dtype=torch.long), torch.ones_like(a)], 1), torch.ones_like(b)])
    spec = "kivi:bits=16,group=8,window=4"
    batch = greedy(model, ids, ks.make_cache(model, spec), n=16, attention_mask=mask)
    assert torch.equal(batch[0], greedy(model, a, ks.make_cache(model, spec), n=16)[0])
    assert torch.equal(batch[1], greedy(model, b, ks.make_cache(model, spec), n=16)[0])
    cache = ks.make_cache(model, "kivi:bits=4,group=8,window=4")
    greedy(model, ids, cache, n=16, attention_mask=mask)
    assert cache.memory_report()["batch"] == 2


def test_beam_search_works():
    model, ids = tiny_llama().to(torch.bfloat16), _prompt()
    ref = greedy(model, ids, DynamicCache(config=model.config), n=10, num_beams=3)
    assert torch.equal(greedy(model, ids, ks.make_cache(model, "kivi:bits=16,group=8,window=4"), n=10, num_beams=3), ref)
    out = greedy(model, ids, ks.make_cache(model, "tada:bits=2,group=8,window=4"), n=10, num_beams=3)
    assert out.shape == (1, 10)


def test_gemma3_sliding_layers_keep_their_window():
    model = tiny_gemma3(sliding_window=8).to(torch.bfloat16)
    ids = _prompt(21)
    ref_cache = DynamicCache(config=model.config)
    ref = greedy(model, ids, ref_cache, n=20)
    cache = ks.make_cache(model, "tada:bits=16,group=4,window=2")
    assert torch.equal(greedy(model, ids, cache, n=20), ref)
    assert [layer.sliding_window for layer in cache.layers] == [8, 8, None]
    # sliding layers hold at most window - 1 tokens plus less than one block; the global layer holds all
    assert cache.layers[0].held() <= 7 + 3 and cache.layers[2].held() == 40
    assert cache.get_seq_length() == 40
    full = ks.make_cache(model, "full")
    assert torch.equal(greedy(model, ids, full, n=20), ref)
    report = cache.memory_report()
    assert report["by_layer"][0]["fp16_nbytes"] == 2 * 2 * 1 * 32 * 7


def test_bad_input_is_named():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4, 8, 16\), got 5"):
        ks.make_cache(model, "kivi", bits=5)
    with pytest.raises(ValueError, match="layer 0 values: group=12 does not divide head_dim=16"):
        ks.make_cache(model, "kivi", group=12)
    with pytest.raises(ValueError, match=r"unknown method 'kiwi'; available: (\w+, )*kivi, (\w+, )*tada"):
        ks.make_cache(model, "kiwi")
    with pytest.raises(TypeError, match="a method spec is a string such as 'kivi:bits=4' or 'full', got None"):
        ks.make_cache(model, None)
    with pytest.raises(ValueError, match="method 'kivi' has no option 'mean'"):
        ks.make_cache(model, "kivi", mean="head")
    with pytest.raises(ValueError, match="option bits='two' is not a valid int"):
        ks.make_cache(model, "kivi:bits=two")
    cache = ks.make_cache(model, "kivi", bits=4, group=8)
    k = torch.randn(1, 2, 5, 16)
    bad = k.clone()
    bad[0, 1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"layer 1: key_states contain NaN or Inf \(first at .* = \[0, 1, 3, 2\]\)"):
        cache.update(bad, k, 1)
    with pytest.raises(ValueError, match="layer 0: value_states contain NaN or Inf"):
        cache.update(k, k * float("inf"), 0)
    assert cache.get_seq_length(1) == 0  # nothing half-written


def test_crop_only_inside_window():
    model, ids = tiny_llama(), _prompt(40)
    cache = ks.make_cache(model, "kivi", bits=4, group=8, window=8)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    cache.crop(-3)
    assert cache.get_seq_length() == 37
    with pytest.raises(ValueError, match="only the .* tokens of the full-precision window can be removed"):
        cache.crop(-30)


def test_separate_key_and_value_bits_are_stored_as_asked():
    model, ids = tiny_llama(), _prompt(200)
    cache = ks.make_cache(model, "kivi", key_bits=4, value_bits=2, group=8, window=0, sinks=0)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    # 200 tokens x 2 heads x 16 channels x 2 layers: keys at 4 bits, values at 2
    assert cache.memory_report()["by_part"]["codes"] == 200 * 2 * 16 * 2 * (4 + 2) // 8
    with pytest.raises(ValueError, match="bits must be one of"):
        ks.make_cache(model, "kivi", key_bits=5)


def test_exact_window_in_16_bits_halves_its_bytes_and_keeps_the_prefill_exact():
    model, ids = tiny_llama(), _prompt(100)
    # 16-bit store: the only difference between the two is the window's rounding to fp16
    caches = {d: ks.make_cache(model, "kivi", bits=16, group=8, window=16, sinks=4, exact_dtype=d)
              for d in ("model", "float16")}
    with torch.no_grad():
        logits = {d: model(ids, past_key_values=c).logits for d, c in caches.items()}
        step = {d: model(ids[:, -1:], past_key_values=c).logits for d, c in caches.items()}
    torch.testing.assert_close(logits["model"], logits["float16"], rtol=0, atol=0)  # the prefill saw fp32 states
    torch.testing.assert_close(step["model"], step["float16"], rtol=1e-2, atol=1e-2)
    full, half = (caches[d].memory_report()["by_part"] for d in ("model", "float16"))
    assert half["window"] * 2 == full["window"] and half["sinks"] * 2 == full["sinks"]
    assert caches["float16"].layers[0].keys.dtype == torch.float16
    with pytest.raises(ValueError, match="exact_dtype must be one of model, float16, bfloat16"):
        ks.make_cache(model, "kivi", exact_dtype="int8")
