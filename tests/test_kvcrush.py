"""KVCrush: a base policy plus one representative per bucket of the tokens it drops."""
import math

import pytest
import torch
from conftest import greedy, tiny_llama
from transformers import DynamicCache

import kvshrink as ks
from kvshrink.methods import build_method
from kvshrink.policies.kvcrush import Crush
from kvshrink.policies.scoring import get_policy

# [B=1, H=2, N=8]; the base keeps tokens 0 and 1 in both heads (room 4, share 0.5: 2 base + 2 representatives)
RANK = torch.tensor([[[10., 9., 0., 6., 0., 0., 4., 0.],
                      [10., 9., 7., 0., 0., 5., 0., 0.]]])


def test_representatives_of_a_constructed_case():
    # head means 3.625 and 3.875: signatures t2 (0,1) t3 (1,0) t4 (0,0) t5 (0,1) t6 (1,0) t7 (0,0)
    # anchor (1,1): distances 1,1,2,1,1,2 -> order 2,3,5,6,4,7 -> buckets [2,3,5] [6,4,7]; best by head-mean: 2, 6
    kept, gone = Crush(get_policy("snapkv"), share=0.5).choose(RANK, 4)
    assert kept.tolist() == [[[0, 1, 2, 6], [0, 1, 2, 6]]]
    assert gone.tolist() == [[[3, 4, 5, 7], [3, 4, 5, 7]]]
    # anchor (1,0): distances 2,0,1,2,0,1 -> order 3,6,4,7,2,5 -> buckets [3,6,4] [7,2,5] -> 3, 2
    kept, _ = Crush(get_policy("snapkv"), share=0.5, anchor="alternate").choose(RANK, 4)
    assert kept.tolist() == [[[0, 1, 2, 3], [0, 1, 2, 3]]]
    # the plain top 4 keeps other tokens in each head
    assert get_policy("snapkv").choose(RANK, 4)[0].tolist() == [[[0, 1, 3, 6], [0, 1, 2, 5]]]


def test_too_few_dropped_tokens_are_filled_by_the_base():
    rank = torch.tensor([[[9., 8., 1., 2., 0., 0.], [1., 2., 9., 8., 0., 0.]]])
    kept, gone = Crush(get_policy("h2o"), share=0.5).choose(rank, 5)  # 3 representatives, only 4 and 5 dropped
    # base: {0, 1} and {2, 3}; representatives 4, 5; one more each by the base's rank: 3 and 1
    assert kept.tolist() == [[[0, 1, 3, 4, 5], [1, 2, 3, 4, 5]]]
    assert gone.tolist() == [[[2], [0]]]


def test_share_zero_is_the_base():
    model = tiny_llama()
    ids = torch.randint(2, 95, (1, 150), generator=torch.Generator().manual_seed(3))
    for base in ("snapkv", "h2o"):
        ref = greedy(model, ids, ks.make_cache(model, f"{base}:budget=0.3"), n=10)
        out = greedy(model, ids, ks.make_cache(model, f"kvcrush:base={base},budget=0.3,share=0.0"), n=10)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("base", ["snapkv", "h2o", "tova"])
def test_a_full_budget_reproduces_full(base):
    model = tiny_llama()
    ids = torch.randint(2, 95, (2, 100), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0
    ref = greedy(model, ids, DynamicCache(config=model.config), n=16, attention_mask=mask)
    out = greedy(model, ids, ks.make_cache(model, f"kvcrush:base={base},budget=1.0"), n=16, attention_mask=mask)
    assert torch.equal(out, ref)


def test_budget_and_composition():
    model = tiny_llama()
    ids = torch.randint(2, 95, (1, 400), generator=torch.Generator().manual_seed(4))
    plain = ks.make_cache(model, "kvcrush:budget=0.25,share=0.5,sinks=2,window=8")
    greedy(model, ids, plain, n=5)
    coded = ks.make_cache(model, "kvcrush:budget=0.25,share=0.5 + kivi:bits=2,group=16")
    greedy(model, ids, coded, n=5)
    for cache in (plain, coded):
        assert all(x.positions.shape[-1] == math.ceil(0.25 * 400) + 4 for x in cache.layers)
        assert cache.layers[0].describe()["bits"].startswith("kvcrush")
    assert coded.memory_report()["by_part"]["codes"] > 0


@pytest.mark.parametrize("spec, message", [
    ("kvcrush:base=streamingllm", "base must be one of snapkv, h2o, h2o_norm, tova"),
    ("kvcrush:base=kvzip", "base must be one of"),
    ("kvcrush:share=1.0", r"share must be in \[0, 1\)"),
    ("kvcrush:anchor=random", "anchor must be one of ones, alternate"),
])
def test_bad_options_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        build_method(spec)
