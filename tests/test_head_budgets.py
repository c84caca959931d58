"""Per-KV-head budgets (AdaKV): the allocation function on constructed scores, `HeadSplit` holding one layer per KV
head (lossless at budget 1.0, counts that differ per head and sum to the layer's budget, bytes = what the heads
hold, save/load, batch operations, padded rows), and composition with a codec."""
import pytest
import torch
from conftest import greedy, tiny_llama
from transformers import DynamicCache

import kvshrink as ks
from kvshrink.layers.heads import HeadSplit
from kvshrink.layers.rows import RowSplit
from kvshrink.policies.allocation import head_budgets

ADAPTIVE = "snapkv:budget=0.25,heads=adaptive,window=8,sinks=2"


def _ids(n=200, seed=2, batch=1):
    return torch.randint(2, 95, (batch, n), generator=torch.Generator().manual_seed(seed))


def _model():
    return tiny_llama(head_dim=32, hidden_size=128)


def _heads(layer):
    return layer.rows[0] if isinstance(layer, RowSplit) else layer


def test_one_ranking_over_all_heads_gives_a_concentrated_heads_room_to_a_spread_one():
    concentrated = torch.tensor([10.0, 9, 0, 0, 0, 0, 0, 0])
    spread = torch.tensor([5.0, 5, 5, 5, 5, 5, 5, 5])
    assert head_budgets([concentrated, spread], 8) == [2, 6]  # uniform would be [4, 4]
    steep = torch.tensor([10.0, 9, 8, 7, 6, 5, 4, 3])
    flat = torch.ones(8)
    assert head_budgets([steep, flat], 8) == [8, 0]
    assert head_budgets([steep, flat], 8, floor=2) == [6, 2]  # the safeguard: each head keeps its best 2
    assert head_budgets([steep, flat], 8, floor=4) == [4, 4]  # a full floor is the uniform split
    assert head_budgets([steep, flat[:3]], 11, floor=5) == [8, 3]  # a head never gets more than it has
    for total in range(0, 17):
        assert sum(head_budgets([steep, flat], total, floor=1)) == total


def test_the_allocation_refuses_a_total_it_cannot_give():
    with pytest.raises(ValueError, match="total must be in"):
        head_budgets([torch.ones(3), torch.ones(2)], 6)
    with pytest.raises(ValueError, match="floor must be"):
        head_budgets([torch.ones(3)], 1, floor=-1)


def test_a_full_budget_reproduces_full_through_per_head_layers():
    model = _model()
    ids = _ids(batch=2)
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0  # left padding: rows are split first, then heads
    ref = greedy(model, ids, DynamicCache(config=model.config), n=16, attention_mask=mask)
    cache = ks.make_cache(model, "snapkv:budget=1.0,heads=adaptive,window=8,sinks=2")
    assert torch.equal(greedy(model, ids, cache, n=16, attention_mask=mask), ref)
    assert all(isinstance(layer, RowSplit) and isinstance(layer.rows[0], HeadSplit) for layer in cache.layers)


def test_adaptive_counts_differ_per_head_and_sum_to_the_layer_budget():
    model = _model()
    ids = _ids()
    uniform = ks.make_cache(model, "snapkv:budget=0.25,window=8,sinks=2")
    adaptive = ks.make_cache(model, ADAPTIVE)
    greedy(model, ids, uniform, n=6)
    greedy(model, ids, adaptive, n=6)
    differ = False
    for u, a in zip(uniform.layers, adaptive.layers):
        held = a.held_per_head()
        assert sum(held) == u.positions.shape[-1] * len(held)  # the layer's budget, shared
        assert all(h >= 2 + 8 + 5 + int(0.2 * (50 - 10)) for h in held)  # sinks, window, decoded, the floor
        differ |= len(set(held)) > 1
    assert differ
    # exact codec: bytes follow tokens, so the same total; and the report is the sum over heads
    assert adaptive.memory_report()["nbytes"] == uniform.memory_report()["nbytes"]
    for row, layer in zip(adaptive.memory_report()["by_layer"], adaptive.layers):
        assert row["nbytes"] == sum(h.nbytes() for h in layer.heads)
        assert row["held_per_head"] == layer.held_per_head()


def test_a_full_floor_is_the_uniform_split():
    model = _model()
    ids = _ids()
    uniform = ks.make_cache(model, "snapkv:budget=0.25,window=8,sinks=2")
    floored = ks.make_cache(model, ADAPTIVE + ",floor=1.0")
    a, b = greedy(model, ids, uniform, n=6), greedy(model, ids, floored, n=6)
    assert torch.equal(a, b)
    for u, f in zip(uniform.layers, floored.layers):
        for h, head in enumerate(f.heads):
            assert torch.equal(head.positions[0, 0], u.positions[0, h])


def test_composition_with_a_codec_stores_each_heads_tokens_packed():
    model = _model()
    ids = _ids()
    spec = "snapkv:budget=0.25,heads=adaptive,window=8,sinks=2 + kivi:bits=2,group=16"
    cache = ks.make_cache(model, spec)
    greedy(model, ids, cache, n=6)
    report = cache.memory_report()
    assert report["by_part"]["codes"] > 0
    plain = ks.make_cache(model, "snapkv:budget=0.25,window=8,sinks=2 + kivi:bits=2,group=16")
    greedy(model, ids, plain, n=6)
    for layer, u in zip(cache.layers, plain.layers):
        assert sum(layer.held_per_head()) == u.positions.shape[-1] * len(layer.heads)
        assert any(head.key_store.tokens for head in layer.heads)


def test_save_load_and_batch_operations_keep_each_heads_tokens(tmp_path):
    model = _model()
    ids = _ids()
    cache = ks.make_cache(model, ADAPTIVE)
    greedy(model, ids, cache, n=4)
    loaded = ks.load_cache(cache.save(tmp_path / "c.safetensors"), model)
    assert loaded.memory_report()["nbytes"] == cache.memory_report()["nbytes"]
    assert [layer.held_per_head() for layer in loaded.layers] == [layer.held_per_head() for layer in cache.layers]
    nxt = torch.tensor([[7]])
    with torch.no_grad():
        a = model(nxt, past_key_values=cache).logits
        b = model(nxt, past_key_values=loaded).logits
    assert torch.equal(a, b)
    loaded.batch_repeat_interleave(2)
    assert loaded.memory_report()["nbytes"] == 2 * cache.memory_report()["nbytes"]
    loaded.reorder_cache(torch.tensor([1, 0]))
    with torch.no_grad():
        c = model(torch.tensor([[5], [5]]), past_key_values=loaded).logits
    loaded.batch_select_indices(torch.tensor([0]))
    assert loaded.memory_report()["batch"] == 1
    assert torch.equal(c[0], c[1])


def test_padded_and_unpadded_batch_rows_equal_their_runs_alone():
    model = _model()
    prompts = [_ids(n, seed=n) for n in (120, 170)]
    n = 170
    ids = torch.zeros(2, n, dtype=torch.long)
    mask = torch.zeros(2, n, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - p.shape[1]:], mask[i, n - p.shape[1]:] = p[0], 1
    together = greedy(model, ids, ks.make_cache(model, ADAPTIVE), n=8, attention_mask=mask)
    for i, p in enumerate(prompts):
        assert torch.equal(together[i], greedy(model, p, ks.make_cache(model, ADAPTIVE), n=8)[0]), i
    same = torch.cat([prompts[1], _ids(170, seed=9)])
    together = greedy(model, same, ks.make_cache(model, ADAPTIVE), n=8)  # no mask: the cache splits the rows
    for i in range(2):
        assert torch.equal(together[i], greedy(model, same[i:i + 1], ks.make_cache(model, ADAPTIVE), n=8)[0]), i


def test_bad_settings_are_refused_clearly():
    model = _model()
    layer = ks.make_cache(model, ADAPTIVE).layers[0]
    with pytest.raises(ValueError, match="one row at a time"):
        layer.update(torch.zeros(2, 2, 5, 32), torch.zeros(2, 2, 5, 32))
    with pytest.raises(ValueError, match="Policies that work: (.*, )?snapkv"):
        ks.make_cache(model, "h2o:budget=0.25,heads=adaptive")
    with pytest.raises(ValueError, match="heads must be one of uniform, adaptive"):
        ks.make_cache(model, "snapkv:heads=ragged")
    with pytest.raises(ValueError, match="floor must be"):
        ks.make_cache(model, "snapkv:heads=adaptive,floor=1.5")
    with pytest.raises(ValueError, match="mean=head"):
        ks.make_cache(model, "snapkv:heads=adaptive + tada:bits=4")


def test_uniform_specs_keep_their_layers():
    model = _model()
    cache = ks.make_cache(model, "snapkv:budget=0.25")
    assert not any(isinstance(layer, HeadSplit) for layer in cache.layers)
    assert "heads" not in ks.canonical_spec("snapkv:budget=0.25")


def test_a_replayed_prefill_builds_the_same_per_head_cache():
    from kvshrink.eval.prefill import record_prefill, replay

    model = _model()
    ids = _ids()
    record = record_prefill(model, ids)
    ran, replayed = ks.make_cache(model, ADAPTIVE), ks.make_cache(model, ADAPTIVE)
    with torch.no_grad():
        model(ids, past_key_values=ran)
    replay(record, replayed)
    for a, b in zip(ran.layers, replayed.layers):
        assert a.held_per_head() == b.held_per_head()
        for x, y in zip(a.heads, b.heads):
            assert torch.equal(x.positions, y.positions)


def test_tensor_parallelism_is_refused_clearly():
    model = _model()
    method = ks.build_method(ADAPTIVE)
    method.prepare(model)
    method._shard = object()  # as make_cache sets it for a head-sharded model
    with pytest.raises(ValueError, match="not supported under tensor parallelism"):
        method.layer(0, None)
