"""generated=budget: a prompt-only policy (snapkv) holds the tokens generated after the prompt to its budget too."""
import math

import pytest
import torch
from conftest import greedy, tiny_llama
from transformers import DynamicCache

import kvshrink as ks
from kvshrink.codecs.exact import ExactCodec
from kvshrink.layers.composed import ComposedLayer
from kvshrink.policies.scoring import get_policy


def _prompt(n=100, seed=2):
    return torch.randint(2, 95, (1, n), generator=torch.Generator().manual_seed(seed))


def test_the_generated_tokens_kept_are_the_ones_later_queries_attend_to():
    torch.manual_seed(0)
    d = 8
    layer = ComposedLayer(ExactCodec("float32"), ExactCodec("float32"), window=4, sinks=2,
                          policy=get_policy("snapkv"), budget=0.25, exact_dtype=torch.float32, generated="budget")
    assert layer.chunk == 32
    layer.update(torch.randn(1, 1, 40, d) * 0.1, torch.randn(1, 1, 40, d))
    assert layer.attend(torch.randn(1, 2, 40, d) * 0.1, None, 0.35) is None
    assert layer.held() == 10  # 2 sinks, 4 stored, the 4-token window
    u = torch.zeros(d)
    u[0] = 3.0
    loud = {40 + i for i in range(3, 32, 4)}  # 8 generated tokens every later query attends to
    for pos in range(40, 72):
        key = u if pos in loud else torch.randn(d) * 0.1
        layer.update(key.view(1, 1, 1, d), torch.randn(1, 1, 1, d))
        layer.attend(u.view(1, 1, 1, d).expand(1, 2, 1, d).clone(), None, 0.35)
    # 72 seen: the budget holds ceil(0.25 * 72) = 18 = 2 sinks + 4 stored + 8 of the 32 that left + the 4-token window
    assert layer.held() == 18 and layer.key_store.tokens == 12
    kept = set(layer.positions[0, 0].tolist())
    assert kept >= loud and len(kept & set(range(36, 68))) == 8


def test_a_long_generation_stays_at_the_budget_and_keep_does_not():
    model = tiny_llama()
    ids = _prompt(n=120)
    held, kept = (ks.make_cache(model, f"snapkv:budget=0.25,sinks=3,window=8,generated={g}") for g in ("budget",
                                                                                                       "keep"))
    greedy(model, ids, held, n=161)
    greedy(model, ids, kept, n=161)
    seen = 120 + 160
    for layer, other in zip(held.layers, kept.layers):
        assert other.positions.shape[-1] == math.ceil(0.25 * 120) + 160  # SnapKV keeps every generated token
        n = layer.positions.shape[-1]
        assert math.ceil(0.25 * seen) <= n < math.ceil(0.25 * seen) + layer.chunk  # at most one chunk waiting (block 1)
        for row in layer.positions.reshape(-1, n).tolist():
            assert {0, 1, 2} <= set(row) and row == sorted(row) and len(set(row)) == n
            assert set(range(seen - 8, seen)) <= set(row)  # the recent window
    # exact tokens: the bytes are the tokens held, each with its keys, values, position and score
    tokens = [sum(layer.positions.numel() for layer in c.layers) for c in (held, kept)]
    assert held.memory_report()["nbytes"] * tokens[1] == kept.memory_report()["nbytes"] * tokens[0]
    assert held.memory_report()["ratio"] < 0.25 + 48 / seen * 1.1  # the budget, one chunk and the window waiting


def test_with_a_group_codec_the_generated_tokens_are_stored_in_whole_groups():
    model = tiny_llama()
    caches = {g: ks.make_cache(model, f"snapkv:budget=0.25,window=8,generated={g} + kivi:bits=2,group=8")
              for g in ("budget", "keep")}
    for cache in caches.values():
        greedy(model, _prompt(n=100), cache, n=161)
    seen = 100 + 160
    for layer in caches["budget"].layers:
        assert layer.block == 8 and layer.chunk == 32
        assert layer.key_store.tokens % 8 == 0  # whole groups coded; up to 7 kept ones wait exact
        assert math.ceil(0.25 * seen) <= layer.positions.shape[-1] < math.ceil(0.25 * seen) + 32 + 7
    assert all(layer.positions.shape[-1] == 25 + 160 for layer in caches["keep"].layers)
    assert caches["budget"].layers[0].key_store.tokens < caches["keep"].layers[0].key_store.tokens


def test_a_full_budget_with_generated_budget_reproduces_full():
    model = tiny_llama()
    ids = _prompt(n=60)
    ref = greedy(model, ids, DynamicCache(config=model.config), n=60)
    out = greedy(model, ids, ks.make_cache(model, "snapkv:budget=1.0,window=8,generated=budget"), n=60)
    assert torch.equal(out, ref)


def test_a_layered_profile_can_hold_its_generated_tokens(tmp_path):
    from kvshrink.profile import LayerRecipe, Profile, fingerprint

    model = tiny_llama()
    path = tmp_path / "layered.json"
    Profile(fingerprint(model), "layered", {"window": 8, "sinks": 2},
            [LayerRecipe("exact", "exact", "snapkv:budget=0.25"), LayerRecipe("exact", "exact", None)]).save(path)
    for generated in ("keep", "budget"):
        cache = ks.make_cache(model, f"layered:profile={path},generated={generated}")
        greedy(model, _prompt(n=100), cache, n=121)
        first, second = cache.layers
        assert first.generated == generated and second.held() == 220
        n = first.positions.shape[-1]
        if generated == "keep":
            assert n == 25 + 120
        else:
            assert math.ceil(0.25 * 220) <= n < math.ceil(0.25 * 220) + first.chunk


def test_generated_is_checked():
    model = tiny_llama()
    with pytest.raises(ValueError, match="generated must be one of keep, budget, got 'all'"):
        ks.make_cache(model, "snapkv:generated=all")
    with pytest.raises(ValueError, match="h2o evicts while decoding"):
        ks.make_cache(model, "h2o:generated=budget")
    with pytest.raises(ValueError, match="has no token policy, so only generated=keep applies"):
        ComposedLayer(ExactCodec("float32"), ExactCodec("float32"), generated="budget")


def test_heads_with_their_own_prompt_counts_keep_them_and_a_share_of_the_generated_tokens():
    model = tiny_llama()
    cache = ks.make_cache(model, "snapkv:budget=0.25,window=8,heads=adaptive,floor=0.2,generated=budget")
    greedy(model, _prompt(n=160), cache, n=121)
    for layer in cache.layers:
        for head in layer.heads:
            generated = head.seen - head.decode_from
            assert generated == 120
            want = head.prompt_held + math.ceil(0.25 * generated)
            assert want <= head.positions.shape[-1] < want + head.chunk
        prompt = [h.prompt_held for h in layer.heads]
        assert sum(prompt) == 2 * math.ceil(0.25 * 160)  # the layer's prompt budget, split by AdaKV
