"""KVzip: the reconstruction pass after the prefill, its scores, the ranking across layers, and what it keeps."""
import math

import pytest
import torch
from conftest import greedy, tiny_gemma3, tiny_llama
from transformers import DynamicCache

import kvshrink as ks
from kvshrink.eval.prefill import record_prefill, replay, replayable
from kvshrink.eval.runner import Env
from kvshrink.eval.scoring import continue_greedy
from kvshrink.methods import build_method
from kvshrink.models import last_logits_only
from kvshrink.policies.kvzip import OVERLAP, compress, global_rooms


class FakeTokenizer:
    """Ids inside the tiny models' vocabulary for any text (one per word)."""

    def encode(self, text, add_special_tokens=False):
        return [3 + (sum(map(ord, w)) % 80) for w in text.split()]


def _prompt(batch=1, n=100, seed=2):
    return torch.randint(2, 95, (batch, n), generator=torch.Generator().manual_seed(seed))


def _cache(model, spec, tokenizer=None):
    method = build_method(spec)
    if tokenizer is not None:
        method.tokenizer = tokenizer
    return method.make_cache(model)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
@pytest.mark.parametrize("prompt", ["none", "repeat"])
def test_a_full_budget_reproduces_full(make, prompt):
    model = make()
    ids = _prompt(batch=2)
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0  # left padding in the second row: one pass per row
    ref = greedy(model, ids, DynamicCache(config=model.config), n=20, attention_mask=mask)
    cache = _cache(model, f"kvzip:budget=1.0,prompt={prompt},chunk=48", FakeTokenizer())
    out = greedy(model, ids, cache, n=20, attention_mask=mask)
    assert cache.reconstruction["forwards"] == 3 + 2  # row 0: 100 tokens in 3 chunks, row 1: 93 in 2
    assert torch.equal(out, ref)


def test_the_pass_keeps_none_of_its_tokens_and_leaves_the_next_logits_unchanged():
    model = tiny_llama()
    ids = _prompt(n=90)
    nxt = torch.tensor([[7]])
    caches = {}
    for spec in ("kvzip:budget=1.0,chunk=32", "snapkv:budget=1.0"):  # snapkv: the same layer, no pass
        cache = _cache(model, spec + ",exact_dtype=model", FakeTokenizer())
        with torch.no_grad():
            first = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
            logits = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1]
        caches[spec.split(":")[0]] = (cache, first, logits)
    cache, first, logits = caches["kvzip"]
    _, first_ref, logits_ref = caches["snapkv"]
    instruction = len(FakeTokenizer().encode("Repeat the previous context exactly."))
    assert cache.reconstruction == {**cache.reconstruction, "forwards": 3,
                                    "tokens": 3 * instruction + 90 + 2 * OVERLAP}
    for layer in cache.layers:
        assert layer.seen == 91 and layer.get_seq_length() == 91
        assert layer.positions[0, 0].tolist() == list(range(91))
        assert (layer.scores[..., :90] > 0).all()  # every prompt token was scored by the pass
    assert torch.equal(first, first_ref)
    assert torch.equal(logits, logits_ref)
    with torch.no_grad():
        full = DynamicCache(config=model.config)
        model(ids, past_key_values=full, use_cache=True)
        ref = model(nxt, past_key_values=full, use_cache=True).logits[:, -1]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_global_rooms_follow_one_ranking_across_layers():
    hot = torch.tensor([[[0.9, 0.8, 0.7, 0.6], [0.95, 0.85, 0.5, 0.4]]])  # [B=1, H=2, N=4]
    cold = torch.full((1, 2, 4), 0.1)
    assert global_rooms([hot, cold], [2, 2]) == [4, 0]
    assert global_rooms([cold, hot], [1, 1]) == [0, 2]
    assert global_rooms([hot, hot.clone()], [3, 1]) == [2, 2]  # equal layers share evenly
    # 5 of 8 slots chosen in layer 0 (0.9, 0.8, 0.7, 0.95, 0.85), 3 in layer 1: 2.5 and 1.5 per head
    mid = torch.tensor([[[0.75, 0.1, 0.1, 0.1], [0.65, 0.62, 0.1, 0.1]]])
    assert global_rooms([hot, mid], [2, 2]) == [3, 1] or global_rooms([hot, mid], [2, 2]) == [2, 2]
    assert sum(global_rooms([hot, mid], [2, 2])) == 4
    with pytest.raises(ValueError, match="budget of 5 among 4"):
        global_rooms([hot], [5])


def test_compress_gives_the_attended_layer_the_tokens():
    """Two layers whose pass scores are set by hand: the hot layer takes the whole candidate budget."""
    model = tiny_llama()
    cache = _cache(model, "kvzip:budget=0.5,sinks=2,window=4,prompt=none")
    ids = _prompt(n=40)
    with torch.no_grad():
        model.model(ids, past_key_values=cache, use_cache=True)  # the inner model: no pass runs
    layers = list(cache.layers)
    assert all(x.awaiting_keep for x in layers)
    g = torch.Generator().manual_seed(0)
    layers[0].scores = torch.rand(1, 2, 40, generator=g) + 1.0  # every layer-0 score beats every layer-1 score
    layers[1].scores = torch.rand(1, 2, 40, generator=g)
    kept = compress(layers)
    # uniform: 20 per layer = 6 protected + 14; together 28 candidates per head, all of them in layer 0 (34 there)
    assert kept == [6 + 28, 6 + 0]
    assert layers[1].positions[0, 0].tolist() == [0, 1, 36, 37, 38, 39]
    assert layers[0].positions.shape[-1] == 34
    assert not any(x.awaiting_keep for x in layers)


def test_compress_keeps_each_heads_own_best_tokens():
    model = tiny_llama()
    cache = _cache(model, "kvzip:budget=0.5,sinks=2,window=4,prompt=none")
    with torch.no_grad():
        model.model(_prompt(n=40), past_key_values=cache, use_cache=True)
    layers = list(cache.layers)
    g = torch.Generator().manual_seed(1)
    scores = [torch.rand(1, 2, 40, generator=g) for _ in layers]
    for x, s in zip(layers, scores):
        x.scores = s.clone()
    kept = compress(layers)
    assert sum(kept) == 2 * 20
    for x, s, k in zip(layers, scores, kept):
        for h in range(2):
            cand = s[0, h, 2:36]
            best = (torch.argsort(cand, descending=True, stable=True)[:k - 6] + 2).sort().values.tolist()
            assert x.positions[0, h].tolist() == [0, 1] + best + [36, 37, 38, 39]


def test_the_budget_is_kept_over_the_whole_cache_and_layers_differ():
    model = tiny_llama(num_hidden_layers=4)
    ids = _prompt(n=200)
    cache = _cache(model, "kvzip:budget=0.3,sinks=2,window=8,prompt=none")
    greedy(model, ids, cache, n=5)
    counts = [x.positions.shape[-1] - 4 for x in cache.layers]  # 4 decoded tokens kept after the prompt
    assert sum(counts) == 4 * math.ceil(0.3 * 200)
    assert len(set(counts)) > 1, counts
    for x in cache.layers:
        for row in x.positions[0].tolist():
            assert row[:2] == [0, 1] and row[-12:] == list(range(192, 204)) and row == sorted(set(row))


def test_bytes_are_the_held_tensors():
    model = tiny_llama()
    cache = _cache(model, "kvzip:budget=0.4,sinks=2,window=8,prompt=none")
    greedy(model, _prompt(n=120), cache, n=3)
    report = cache.memory_report()
    want = 0
    for x in cache.layers:
        b, h, t = x.positions.shape
        want += b * h * t * (2 * 16 * 2 + 4 + 4)  # fp16 keys and values (head dim 16), int32 position, fp32 score
    assert report["nbytes"] == want
    assert report["tokens"] == 122


def test_composed_with_a_codec():
    model = tiny_llama()
    ids = _prompt(n=160)
    ref = greedy(model, ids, ks.make_cache(model, "snapkv:budget=1.0 + kivi:bits=2,group=16"), n=12)
    lossless = ks.make_cache(model, "kvzip:budget=1.0,prompt=none + kivi:bits=2,group=16")
    assert torch.equal(greedy(model, ids, lossless, n=12), ref)  # all tokens kept, stored alike
    ids = _prompt(n=600)
    small = ks.make_cache(model, "kvzip:budget=0.25,prompt=none + kivi:bits=2,group=16")
    greedy(model, ids, small, n=12)
    alone = ks.make_cache(model, "kvzip:budget=0.25,prompt=none")
    greedy(model, ids, alone, n=12)
    assert sum(x.positions.shape[-1] for x in small.layers) == 2 * (150 + 11)
    assert all(x.key_store.tokens > 0 for x in small.layers)  # the kept tokens beyond the window are coded
    coded, exact = small.memory_report(), alone.memory_report()
    assert coded["by_part"]["codes"] > 0 and coded["nbytes"] < 0.75 * exact["nbytes"]


def _held(cache):
    """Every tensor each layer holds, by part, in a fixed order."""
    return [[(part, t) for part, ts in sorted(x.parts().items()) for t in ts] for x in cache.layers]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
@pytest.mark.parametrize("spec", ["kvzip:budget=0.5,prompt=none", "kvzip:budget=0.4,prompt=none,heads=adaptive",
                                  "kvzip:budget=0.5,prompt=none,chunk=32 + kivi:bits=2,group=16",
                                  "kvzip:budget=0.6,ratio=0.5,prompt=none,scores=free,positions=bits + kivi:bits=2,group=16"])
def test_a_replayed_prefill_runs_the_pass_and_equals_its_own(make, spec):
    model = make()
    ids = _prompt(n=200)
    own = ks.make_cache(model, spec)
    with torch.no_grad():
        logits = model(ids, past_key_values=own, use_cache=True, **last_logits_only(model)).logits[:, -1]
    record = record_prefill(model, ids)
    cache = ks.make_cache(model, spec)
    assert not replayable(cache, 200) and replayable(cache, 200, model)
    with pytest.raises(ValueError, match="model=..."):  # without the model the pass could not run
        replay(record, cache)
    cache = ks.make_cache(model, spec)
    assert torch.equal(replay(record, cache, model), logits)
    assert cache.reconstruction["forwards"] == own.reconstruction["forwards"] > 0
    held, ref = _held(cache), _held(own)
    assert [[p for p, _ in x] for x in held] == [[p for p, _ in x] for x in ref]
    for x, y in zip(held, ref):  # every tensor held, bit for bit: the same tokens kept, coded alike
        for (part, a), (_, b) in zip(x, y):
            assert a.dtype == b.dtype and torch.equal(a, b), part
    assert cache.memory_report()["nbytes"] == own.memory_report()["nbytes"]
    assert torch.equal(continue_greedy(model, cache, logits, 10), continue_greedy(model, own, logits, 10))
    env = Env(model, None, "")  # the runner shares the recorded prefill and runs the pass on the replayed cache
    cache, shared_logits, how = env.prefilled(spec, ids)
    assert how["shared"] is True and cache.reconstruction["forwards"] == own.reconstruction["forwards"]
    assert torch.equal(shared_logits, logits)


def test_a_second_cache_of_the_prompt_reuses_the_pass_and_keeps_what_its_own_would():
    model = tiny_llama()
    ids = _prompt(n=200)
    record = record_prefill(model, ids)

    def check(spec, reused, forwards=1):
        cache, own = ks.make_cache(model, spec), ks.make_cache(model, spec)
        replay(record, cache, model)
        with torch.no_grad():
            model(ids, past_key_values=own, use_cache=True)
        assert reused is None or cache.reconstruction["reused"] is reused
        assert own.reconstruction["reused"] is False
        assert cache.reconstruction["forwards"] == forwards
        for x, y in zip(_held(cache), _held(own)):  # every tensor held, bit for bit
            assert [p for p, _ in x] == [p for p, _ in y]
            for (part, a), (_, b) in zip(x, y):
                assert torch.equal(a, b), (spec, part)
        last = cache.layers[-1]
        last = getattr(last, "heads", [last])[0]
        return last.exact_dtype or next(model.parameters()).dtype  # what the prompt was held in

    held = check("kvzip:budget=0.3,prompt=none,window=8 + kivi:bits=2,group=16", False)
    check("kvzip:budget=0.6,ratio=0.5,prompt=none,scores=free,positions=bits + kivi:bits=4,group=16", True)
    assert len(record.passes) == 1
    # the same pass with each KV head stored apart (heads=adaptive): its heads take their layer's scores, and keep
    # what their own pass keeps, bit for bit (each KV head is scored by its own query heads either way)
    check("kvzip:budget=0.3,prompt=none,window=8,heads=adaptive + kivi:bits=2,group=16", True)
    check("kvzip:budget=0.6,ratio=0.5,prompt=none,heads=adaptive,scores=free,positions=bits + kivi:bits=4,group=16",
          True)
    assert len(record.passes) == 1
    # the prompt held in another dtype (kvzip alone keeps the 16-bit cache's float16, a codec's window the model's
    # float32 here: the scores differ in the 4th digit), another pass (chunks)
    same = check("kvzip:budget=0.5,prompt=none", None) == held
    check("kvzip:budget=0.5,prompt=none,chunk=64", False, forwards=4)
    check("kvzip:budget=0.5,prompt=none,heads=adaptive", True)  # the float16 pass above, its heads apart
    assert not same and len(record.passes) == 3  # float16 against float32 on this model: not reused
    record = record_prefill(model, ids)  # the other way round: heads apart first, then a layer that holds them
    check("kvzip:budget=0.3,prompt=none,window=8,heads=adaptive + kivi:bits=2,group=16", False)
    check("kvzip:budget=0.4,prompt=none + kivi:bits=2,group=16", True)
    assert len(record.passes) == 1


def test_a_pass_beside_coded_sliding_layers_is_not_reused():
    model = tiny_gemma3(sliding_window=48)
    ids = _prompt(n=150)
    record = record_prefill(model, ids)
    for codec in ("kivi:bits=2,group=16,window=8", "kivi:bits=4,group=16,window=8"):
        cache = ks.make_cache(model, f"kvzip:budget=0.5,prompt=none + {codec}")
        replay(record, cache, model)
        assert cache.reconstruction["reused"] is False  # what the pass read of the sliding layers differs by codec
    assert not record.passes
    for i, budget in enumerate((0.5, 0.3)):  # plain sliding layers beside: the prompt's exact states, reused
        spec = f"kvzip:budget={budget},prompt=none"
        cache, own = ks.make_cache(model, spec), ks.make_cache(model, spec)
        replay(record, cache, model)
        with torch.no_grad():
            model(ids, past_key_values=own, use_cache=True)
        assert cache.reconstruction["reused"] is (i == 1)
        assert all(torch.equal(a, b) for x, y in zip(_held(cache), _held(own)) for (_, a), (_, b) in zip(x, y))


def test_coded_sliding_layers_beside_the_pass_keep_the_prompt_only():
    """Gemma 3's local layers with a codec (`kvzip + CODEC`) are read by the pass decoded, as a decoding step reads
    them; the pass's tokens never reach their codes: after the prefill they hold what the codec alone holds."""
    model = tiny_gemma3(sliding_window=48)
    ids = _prompt(n=150)
    codec = "kivi:bits=2,group=16,window=8"
    both, alone = ks.make_cache(model, f"kvzip:budget=0.5,prompt=none,chunk=64 + {codec}"), ks.make_cache(model, codec)
    with torch.no_grad():
        model(ids, past_key_values=both, use_cache=True)
        model(ids, past_key_values=alone, use_cache=True)
    assert both.reconstruction["forwards"] == 3
    for i in (0, 1):  # the sliding layers
        x, y = both.layers[i], alone.layers[i]
        assert x.key_store.tokens > 0 and x.seen == y.seen == 150
        for part, tensors in y.parts().items():
            assert all(torch.equal(a, b) for a, b in zip(x.parts()[part], tensors)), part
    assert both.layers[2].positions.shape[-1] < 150  # the global layer was evicted after the pass


def test_a_step_before_the_pass_is_refused():
    model = tiny_llama()
    cache = ks.make_cache(model, "kvzip:budget=0.5,prompt=none")
    with torch.no_grad():
        model.model(_prompt(n=50), past_key_values=cache, use_cache=True)  # no hook on the inner model
        with pytest.raises(RuntimeError, match="scoring pass"):
            model(torch.tensor([[5]]), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("spec, message", [
    ("kvzip:prompt=please", "prompt must be one of repeat, none"),
    ("kvzip:chunk=0", "chunk must be >= 1"),
    ("kvzip:budget=0", "budget must be in"),
    ("kvzip:budget=1.5", "budget must be in"),
    ("kvzip:chunks=4", "has no option 'chunks'"),
])
def test_bad_options_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        build_method(spec)


def test_an_instruction_needs_a_tokenizer():
    model = tiny_llama()
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        ks.make_cache(model, "kvzip:prompt=repeat")


def test_inputs_embeds_are_refused():
    model = tiny_llama()
    cache = ks.make_cache(model, "kvzip:prompt=none")
    with torch.no_grad(), pytest.raises(ValueError, match="prefill with input_ids"):
        model(inputs_embeds=model.get_input_embeddings()(_prompt(n=40)), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("make, spec", [
    (tiny_llama, "kvzip:budget=0.4,prompt=none,chunk=50"),
    # Gemma 3's coded local layers beside the pass, one row at a time: each row's pass reads its own decoded view
    (lambda: tiny_gemma3(sliding_window=48), "kvzip:budget=0.4,prompt=none,chunk=50 + kivi:bits=2,group=16,window=8")])
def test_a_padded_row_is_compressed_as_if_alone(make, spec):
    model = make()
    ids = _prompt(batch=2, n=120)
    mask = torch.ones_like(ids)
    ids[1, :15], mask[1, :15] = 0, 0
    batch = _cache(model, spec)
    both = greedy(model, ids, batch, n=10, attention_mask=mask)
    single = _cache(model, spec)
    alone = greedy(model, ids[1:, 15:], single, n=10)
    assert torch.equal(both[1], alone[0])
    for split, own in zip(batch.layers, single.layers):
        if own.positions is not None:  # the kvzip layers (Gemma 3's local layers hold the batch unsplit)
            assert torch.equal(split.rows[1].positions, own.positions)


def test_per_head_budgets_follow_one_ranking_over_every_layers_heads():
    model = tiny_llama(num_hidden_layers=3)
    ids = _prompt(n=160)
    cache = _cache(model, "kvzip:budget=0.3,sinks=2,window=8,prompt=none,heads=adaptive")
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    held = [n for x in cache.layers for n in x.held_per_head()]
    assert sum(held) == 3 * 2 * math.ceil(0.3 * 160)  # what uniform budgets would hold, summed
    assert len(set(held)) > 1, held  # heads of one layer and of different layers keep different counts
    # the counts are one ranking of every head's pass scores: recompute it from the scores the heads kept
    heads = [h for x in cache.layers for h in x.heads]
    for h in heads:
        assert h.positions[0, 0, :2].tolist() == [0, 1] and h.positions[0, 0, -8:].tolist() == list(range(152, 160))
    cut = min(h.scores[0, 0, 2:-8].min() for h in heads if h.positions.shape[-1] > 10)
    plain = _cache(model, "kvzip:budget=1.0,sinks=2,window=8,prompt=none,heads=adaptive")
    with torch.no_grad():
        model(ids, past_key_values=plain, use_cache=True)
    for x, y in zip(cache.layers, plain.layers):
        for h, full in zip(x.heads, y.heads):
            kept = set(h.positions[0, 0].tolist())
            scores = full.scores[0, 0]
            dropped = [p for p in range(2, 152) if p not in kept]
            assert all(scores[p] <= cut + 1e-6 for p in dropped)  # nothing dropped outranks what any head kept


def test_per_head_kvzip_at_a_full_budget_reproduces_full():
    model = tiny_llama()
    ids = _prompt(n=90)
    ref = greedy(model, ids, DynamicCache(config=model.config), n=12)
    out = greedy(model, ids, _cache(model, "kvzip:budget=1.0,prompt=none,heads=adaptive"), n=12)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("make,heads", [(tiny_llama, {}), (tiny_llama, {"num_attention_heads": 6, "hidden_size": 96}), (tiny_gemma3, {})])
def test_the_fused_pass_scores_as_the_general_path(monkeypatch, make, heads):
    """The pass's CPU fast path (fused SDPA with its log-sum-exp, max from one more product over the held keys)
    keeps the tokens, scores and answers of the general path (softmax over the materialised scores)."""
    from kvshrink.layers import composed

    model = make(**heads)
    ids = _prompt(batch=2, n=150, seed=5)
    mask = torch.ones_like(ids)
    ids[1, :9], mask[1, :9] = 0, 0  # a left-padded row: one pass per row, each with its own mask
    runs, taken = {}, []
    fast = composed.ComposedLayer._probe_attention

    def spy(self, *args):
        got = fast(self, *args)
        taken.append(got is not None)
        return got

    monkeypatch.setattr(composed.ComposedLayer, "_probe_attention", spy)
    for name, flash in (("fast", composed._FLASH_CPU), ("general", None)):
        monkeypatch.setattr(composed, "_FLASH_CPU", flash)
        cache = _cache(model, "kvzip:budget=0.3,window=8,chunk=64", FakeTokenizer())
        out = greedy(model, ids, cache, n=12, attention_mask=mask)
        rows = [r for x in cache.layers for r in getattr(x, "rows", [x]) if hasattr(r, "scores")]
        assert rows
        runs[name] = (out, [(r.positions.clone(), r.scores.clone()) for r in rows])
        if name == "fast":
            assert taken and all(taken)  # every pass call went through the fused path
    assert torch.equal(runs["fast"][0], runs["general"][0])
    for (pa, sa), (pb, sb) in zip(runs["fast"][1], runs["general"][1]):
        assert torch.equal(pa, pb)
        torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("codec,scores", [("kivi:bits=2", "keep"), ("tada:bits=4,mean=head", "keep"),
                                          ("turboquant:bits=3", "keep"), ("grouped:bits=4", "keep"),
                                          ("kivi:bits=2", "free"), ("tada:bits=4,mean=head", "free"),
                                          ("kivi:bits=2", "free,positions=bits"),
                                          ("tada:bits=4,mean=head", "free,positions=bits")])
def test_a_byte_budget_holds_the_prompt_at_its_share(codec, scores):
    """kvzip:ratio=R keeps the ranking's best tokens while the layers' bytes stay within R of 16-bit, everything
    counted; the byte model it spends by equals what the layers then hold, byte for byte."""
    from kvshrink.policies import kvzip as kz

    model = tiny_llama(head_dim=32, hidden_size=128, num_hidden_layers=3)
    ids = _prompt(n=400, seed=3)
    predicted = {}
    real = kz.layer_bytes

    def spy(layer, protected):
        f = real(layer, protected)
        predicted[layer.layer_idx] = f
        return f

    kz.layer_bytes = spy
    try:
        for ratio in (0.24, 0.18):
            cache = _cache(model, f"kvzip:budget=1.0,ratio={ratio},prompt=none,chunk=128,scores={scores} + {codec},"
                                  "exact_dtype=float16")
            with torch.no_grad():
                model(ids, past_key_values=cache, use_cache=True)
            report = cache.memory_report()
            assert ratio - 0.03 < report["ratio"] <= ratio, (codec, ratio, report["ratio"])
            for layer in cache.layers:
                assert (layer.scores is None) == scores.startswith("free")
                assert (layer.kept_bits is not None) == scores.endswith("bits")
                room = layer.held_positions().shape[-1] - layer.sinks - layer.window
                assert predicted[layer.layer_idx](room) == layer.nbytes()
            counts = [x.held_positions().shape[-1] for x in cache.layers]
            assert len(set(counts)) > 1  # still one ranking across layers
    finally:
        kz.layer_bytes = real
    tokens_only = _cache(model, f"kvzip:budget=0.3,prompt=none,chunk=128 + {codec}")
    capped = _cache(model, f"kvzip:budget=0.3,ratio=0.9,prompt=none,chunk=128 + {codec}")
    with torch.no_grad():
        for c in (tokens_only, capped):
            model(ids, past_key_values=c, use_cache=True)
    assert [x.positions.tolist() for x in capped.layers] == [x.positions.tolist() for x in tokens_only.layers]


def test_a_byte_budget_holds_with_adaptive_heads():
    """kvzip:ratio=R with heads=adaptive (a layer per KV head): at most R of 16-bit, heads of a layer differ."""
    model = tiny_llama(head_dim=32, hidden_size=128, num_hidden_layers=3)
    ids = _prompt(n=400, seed=3)
    cache = _cache(model, "kvzip:budget=1.0,ratio=0.3,prompt=none,chunk=128,heads=adaptive,scores=free + kivi:bits=2")
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    assert 0.27 < cache.memory_report()["ratio"] <= 0.3
    counts = [[h.positions.shape[-1] for h in layer.heads] for layer in cache.layers]
    assert any(len(set(c)) > 1 for c in counts), counts


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("spec", ["kvzip:budget=0.4,prompt=none,chunk=128", "snapkv:budget=0.4"])
def test_freed_scores_change_nothing_but_their_bytes(spec, packed, tmp_path):
    """scores=free: the same kept tokens and greedy answer, 4 bytes less per held token and KV head (the float32
    scores; with positions=bits the int32 positions too, for a bitmask of one bit per prompt token), nothing
    scored while decoding, and a saved cache resumes as it was saved."""
    from kvshrink import load_cache, save_cache

    model = tiny_llama(head_dim=32, hidden_size=128, num_hidden_layers=3)
    ids = _prompt(n=300, seed=5)
    runs = {}
    for scores in ("keep", "free"):
        extra = ",positions=bits" if packed and scores == "free" else ""
        cache = _cache(model, f"{spec},scores={scores}{extra} + kivi:bits=4")
        out = greedy(model, ids, cache, n=10)
        runs[scores] = (out, cache)
    (out_k, keep), (out_f, free) = runs["keep"], runs["free"]
    assert torch.equal(out_k, out_f)
    saved = 0
    for a, b in zip(keep.layers, free.layers):
        assert torch.equal(a.positions, b.held_positions()) and b.scores is None and a.scores is not None
        assert (b.positions is None) == packed and (b.kept_bits is not None) == packed
        want = a.scores.numel() * 4
        if packed:  # the positions' int32 for a bit per prompt token (what was seen before the answer)
            assert b.kept_bits.shape[-1] == -(-b.prompt_end // 8) and b.prompt_end == ids.shape[1]
            want += a.positions.numel() * 4 - b.kept_bits.numel()
        assert a.nbytes() - b.nbytes() == want
        saved += want
    assert keep.memory_report()["nbytes"] - free.memory_report()["nbytes"] == saved
    path = tmp_path / "c.safetensors"
    save_cache(free, path)
    back = load_cache(path, model)
    assert all(x.scores is None and (x.positions is None) == packed for x in back.layers)
    assert all(torch.equal(x.held_positions(), y.held_positions()) for x, y in zip(back.layers, free.layers))
    nxt = torch.tensor([[7]])
    with torch.no_grad():
        want = model(nxt, past_key_values=free, use_cache=True).logits
        got = model(nxt, past_key_values=back, use_cache=True).logits
    torch.testing.assert_close(got, want)


def test_a_freed_layer_answers_as_the_scored_one_in_bf16():
    """In a bf16 model the freed layer still attends in float32, as the scored path does: the same greedy tokens
    and logits to bf16 rounding (in bf16 SDPA a Qwen RULER answer changed). The float32 kernels' summation order
    differs by CPU, and a last-bit difference can round a bf16 activation the other way: the mean |logit change| was
    0 on an AVX-512 BF16 machine and 0.0044 on an AVX2 one; attending in bf16 SDPA gives 0.032 there."""
    from conftest import logits_through

    model = tiny_llama(head_dim=32, hidden_size=128, num_hidden_layers=3).to(torch.bfloat16)
    ids = _prompt(n=300, seed=4)
    got = {}
    for scores in ("keep", "free,positions=bits"):
        cache = _cache(model, f"kvzip:budget=0.4,prompt=none,chunk=128,scores={scores} + kivi:bits=4")
        got[scores] = logits_through(model, ids, cache, steps=12)
    assert torch.equal(got["free,positions=bits"][1], got["keep"][1])
    change = (got["free,positions=bits"][0].float() - got["keep"][0].float()).abs().mean().item()
    assert change < 0.01, change


@pytest.mark.parametrize("chunk,spec", [(1, "snapkv:budget=0.3"), (3, "snapkv:budget=0.3"),
                                        (3, "snapkv:budget=0.3,positions=bits"),
                                        (3, "mixed:policy=snapkv,budget=0.3"),
                                        (3, "mixed:policy=snapkv,budget=0.3,positions=bits")])
def test_a_freed_layer_attends_as_the_scored_one(chunk, spec):
    """After the prompt's eviction a freed layer answers through SDPA over its positions; the same logits as the
    general scored path, on a left-padded batch (rows' masks by position) and on steps of several tokens."""
    from conftest import logits_through

    model = tiny_llama(head_dim=32, hidden_size=128, num_hidden_layers=3)
    ids = _prompt(n=200, seed=9, batch=2)
    mask = torch.ones_like(ids)
    ids[1, :11], mask[1, :11] = 0, 0
    got = {}
    for scores in ("keep", "free"):
        opts = spec.replace(",positions=bits", "") if scores == "keep" else spec
        cache = _cache(model, f"{opts},scores={scores}" + (" + kivi:bits=4" if "mixed" not in spec else ""))
        got[scores] = logits_through(model, ids, cache, steps=6, chunk=chunk, attention_mask=mask)
    torch.testing.assert_close(got["free"][0], got["keep"][0], rtol=1e-4, atol=1e-4)
    assert torch.equal(got["free"][1], got["keep"][1])
    layer = cache.layers[0].rows[0] if hasattr(cache.layers[0], "rows") else cache.layers[0]
    if "mixed" in spec:  # a low tier: the general path answers, unscored (the logits above)
        assert layer.low_keys is not None and layer.low_keys.tokens > 0 and layer.scores is None
        assert layer.kept_bits is None  # a low tier keeps its positions as int32
        return
    assert (layer.kept_bits is not None) == ("bits" in spec)
    # any mask, boolean or additive, is read at the held tokens' positions, as the general path reads it
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, model.config.num_attention_heads, 2, 32, generator=g)
    allowed = torch.rand(1, 1, 2, layer.seen, generator=g) > 0.3
    allowed[..., -1] = True
    for m in (allowed, torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))):
        want = layer.attention(q, m, 0.2, needs=())[0]
        torch.testing.assert_close(layer._attend_settled(q, m, 0.2), want, rtol=1e-4, atol=1e-5)


def test_freed_scores_are_checked():
    with pytest.raises(ValueError, match="scores must be one of keep, free"):
        build_method("kvzip:scores=drop")
    with pytest.raises(ValueError, match="h2o evicts while decoding"):
        build_method("h2o:scores=free")
    with pytest.raises(ValueError, match="generated=budget ranks"):
        build_method("snapkv:generated=budget,scores=free")
    with pytest.raises(ValueError, match="positions must be one of int32, bits"):
        build_method("kvzip:scores=free,positions=int16")
    with pytest.raises(ValueError, match="add scores=free"):
        build_method("kvzip:positions=bits")


def test_a_byte_budget_is_checked():
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        build_method("kvzip:ratio=1.5")
    model = tiny_llama(head_dim=32, hidden_size=128)
    cache = _cache(model, "kvzip:budget=1.0,ratio=0.05,prompt=none + kivi:bits=2")  # window and sinks: 0.18
    with pytest.warns(UserWarning, match="below what the sinks and windows alone hold"):
        with torch.no_grad():
            model(_prompt(n=400), past_key_values=cache, use_cache=True)
    assert all(x.positions.shape[-1] == x.sinks + x.window for x in cache.layers)
