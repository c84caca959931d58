"""kvpress presses as kvshrink token policies (`kvpress:press=CLASS`), run in kvpress's own environment
(`make test-kvpress`; the main suite does not collect this folder: tests/conftest.py).

Checked against kvpress itself: the same press, run by kvpress's own forward hook on the same tiny model and
prompt, scores the same tokens and keeps the same ones at the same budget."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import greedy, tiny_llama  # noqa: E402

import kvpress  # noqa: E402
from kvpress.utils import compute_n_kept  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import kvshrink as ks  # noqa: E402

SEED = 1234
PROMPT = 96  # a quarter and a half of it are whole numbers: kvpress's int() and kvshrink's ceil() keep the same count


def _model():
    return tiny_llama(head_dim=32, hidden_size=128)


def _ids(n=PROMPT, seed=0):
    return torch.randint(2, 95, (1, n), generator=torch.Generator().manual_seed(seed))


def _kvpress_choice(model, press, ids):
    """Per layer: the scores kvpress's own hook computed and the token indices it kept (top-k, as ScorerPress)."""
    got = {}
    score = press.score

    def recording(module, hidden_states, keys, values, attentions, kwargs):
        s = score(module, hidden_states, keys, values, attentions, kwargs)
        n = compute_n_kept(keys.shape[2], press.compression_ratio)
        got[module.layer_idx] = (s.float(), s.topk(n, dim=-1).indices.sort(-1).values)
        return s

    press.score = recording
    torch.manual_seed(SEED)  # presses with a random sketch (LeverageScore, Compactor) draw the same numbers
    with torch.no_grad(), press(model):
        model(ids, past_key_values=DynamicCache(), use_cache=True)
    return got


CASES = [
    ("SnapKVPress", "window_size=16", {"window_size": 16}),
    ("SnapKVPress", "window_size=8/kernel_size=3", {"window_size": 8, "kernel_size": 3}),
    ("ExpectedAttentionPress", "", {}),
    ("ExpectedAttentionPress", "use_covariance=false/n_future_positions=64", {"use_covariance": False,
                                                                             "n_future_positions": 64}),
    ("KnormPress", "", {}),
    ("KeyDiffPress", "", {}),
    ("TOVAPress", "", {}),
    ("StreamingLLMPress", "n_sink=2", {"n_sink": 2}),
    ("ObservedAttentionPress", "", {}),
    ("LagKVPress", "lag_size=16", {"lag_size": 16}),
    ("CURPress", "", {}),
    ("CapPress", "n_future_positions=64", {"n_future_positions": 64}),
    ("CompactorPress", "chunk_size=32", {"chunk_size": 32}),
    ("NonCausalAttnPress", "chunk_size=32", {"chunk_size": 32}),
    ("RandomPress", "seed=3", {"seed": 3}),
    ("LeverageScorePress", "sketch_dimension=24", {"sketch_dimension": 24}),
]


@pytest.mark.parametrize("budget", [0.25, 0.5])
@pytest.mark.parametrize("press, args, kwargs", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_the_kept_tokens_are_the_ones_kvpress_keeps(press, args, kwargs, budget):
    model = _model()
    ids = _ids()
    if press == "ObservedAttentionPress":  # kvpress hands it attention weights only under eager attention
        model.set_attn_implementation("eager")
    theirs = _kvpress_choice(model, getattr(kvpress, press)(compression_ratio=1 - budget, **kwargs), ids)
    spec = f"kvpress:press={press},budget={budget},exact_dtype=model" + (f",args={args}" if args else "")
    cache = ks.make_cache(model, spec)  # sinks=0, window=0: the press alone decides, as in kvpress
    torch.manual_seed(SEED)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    assert sorted(theirs) == list(range(len(cache.layers)))
    for i, layer in enumerate(cache.layers):
        scores, kept = theirs[i]
        mine = layer.positions.long().sort(-1).values
        assert mine.shape == kept.shape, f"layer {i}: kvshrink kept {mine.shape[-1]}, kvpress {kept.shape[-1]}"
        if not torch.equal(mine, kept):  # equal scores at the boundary (a token repeated in the prompt has the
            # same key norm): kvpress's top-k and kvshrink's stable sort may keep different ones of them, nothing else
            boundary = scores.gather(-1, kept).amin(-1, keepdim=True)
            for b, h in torch.nonzero(~(mine == kept).all(-1)).tolist():
                differ = set(mine[b, h].tolist()) ^ set(kept[b, h].tolist())
                assert all(scores[b, h, t] == boundary[b, h] for t in differ), \
                    f"layer {i} head {h}: {press} kept other tokens than kvpress: {sorted(differ)}"
        # the scores kvshrink ranked by (held for the kept tokens) are the press's own
        assert torch.allclose(layer.scores, scores.gather(-1, layer.positions.long()), rtol=1e-4, atol=1e-6)
    assert cache.memory_report()["tokens"] == PROMPT


@pytest.mark.parametrize("press, args", [("SnapKVPress", "window_size=16"), ("ExpectedAttentionPress", ""),
                                         ("KnormPress", "")])
def test_budget_one_reproduces_the_full_caches_greedy_tokens(press, args):
    model = _model()
    ids = _ids(80, seed=1)
    ref = greedy(model, ids, ks.make_cache(model, "full"), n=16)
    spec = f"kvpress:press={press},budget=1.0,exact_dtype=model" + (f",args={args}" if args else "")
    cache = ks.make_cache(model, spec)
    assert torch.equal(greedy(model, ids, cache, n=16), ref)
    assert all(row["kept"] == 80 + 15 for row in cache.memory_report()["by_layer"])  # nothing evicted


def test_composed_with_kivi_the_kept_tokens_are_stored_as_packed_2bit_codes():
    model = _model()
    ids = _ids(512, seed=2)
    policy = "kvpress:press=ExpectedAttentionPress,budget=0.5"
    exact, low = ks.make_cache(model, f"{policy} + exact"), ks.make_cache(model, f"{policy} + kivi:bits=2")
    out_exact, out_low = greedy(model, ids, exact, n=8), greedy(model, ids, low, n=8)
    assert out_exact.shape == out_low.shape == (1, 8)
    re, rl = exact.memory_report(), low.memory_report()
    # the press chose from the prompt as the model computed it: the same tokens whatever stores them
    for a, b in zip(exact.layers, low.layers):
        assert torch.equal(a.positions, b.positions)
    assert re["tokens"] == rl["tokens"] and [r["kept"] for r in re["by_layer"]] == [r["kept"] for r in rl["by_layer"]]
    assert rl["nbytes"] < 0.5 * re["nbytes"], (rl["nbytes"], re["nbytes"])
    # 2-bit codes, packed: the stored tokens' code bytes are a quarter of a byte per element
    h, d = 2, 32
    stored = sum(layer.key_store.tokens for layer in low.layers)
    assert stored > 0 and rl["by_part"]["codes"] == 2 * stored * h * d * 2 // 8
    assert all(layer.key_store.codec.bits == 2 and layer.value_store.codec.bits == 2 for layer in low.layers)


def test_a_bad_press_name_or_option_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown kvpress press 'SnapPress'.*SnapKVPress.*TOVAPress"):
        ks.build_method("kvpress:press=SnapPress,budget=0.5")
    with pytest.raises(ValueError, match=r"AdaKVPress is a kvpress press but not a ScorerPress"):
        ks.build_method("kvpress:press=AdaKVPress")
    with pytest.raises(ValueError, match=r"SnapKVPress has no option 'window'.*window_size, kernel_size"):
        ks.build_method("kvpress:press=SnapKVPress,args=window=16")
    with pytest.raises(ValueError, match=r"window_size='big' is not a valid int"):
        ks.build_method("kvpress:press=SnapKVPress,args=window_size=big")
    with pytest.raises(ValueError, match=r"give budget instead"):
        ks.build_method("kvpress:press=KnormPress,args=compression_ratio=0.5")
    with pytest.raises(ValueError, match=r"name the press.*KnormPress"):
        ks.build_method("kvpress:budget=0.5 + kivi:bits=2")


def test_the_spec_is_canonical_and_rebuilds_the_same_method():
    m = ks.build_method("kvpress:press=SnapKVPress,args=window_size=16,budget=0.25 + kivi:bits=2")
    again = ks.build_method(m.spec())
    assert again.spec() == m.spec() and "args=window_size=16" in m.spec()
    assert ks.canonical_spec("kvpress:press=KnormPress") == "kvpress:press=KnormPress"
