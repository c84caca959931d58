"""RazorAttention (`razor`): retrieval-head scores measured on repeated random tokens (the indexing checked on
constructed attention), the profile file, the compensation token (one mean token weighted by its count equals that
many copies of the mean), lossless settings reproducing `full`, bytes, save/load, padded rows and a codec."""
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import greedy, tiny_llama
from transformers import DynamicCache, LlamaConfig

import kvshrink as ks
from kvshrink.layers.compensated import CompensatedLayer
from kvshrink.layers.heads import HeadSplit
from kvshrink.layers.rows import RowSplit
from kvshrink.profile import ProfileError
from kvshrink.retrieval import head_scores, retrieval_heads, retrieval_profile


def _model():
    return tiny_llama(head_dim=32, hidden_size=128)


def _ids(n=200, seed=2, batch=1):
    return torch.randint(2, 95, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    return retrieval_profile(_model(), length=64, samples=2, progress=False).save(
        tmp_path_factory.mktemp("razor") / "heads.json")


class _Constructed(torch.nn.Module):
    """A stand-in model whose attention is given: KV head 0's query heads attend to the token after the earlier
    occurrence (induction), KV head 1's to the earlier occurrence itself (echo), with weight `w`."""

    def __init__(self, w=0.7):
        super().__init__()
        self.config = LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        self.config._attn_implementation = "sdpa"
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.w = w

    def set_attn_implementation(self, name):
        self.config._attn_implementation = name

    def forward(self, ids, output_attentions=False, use_cache=False):
        assert self.config._attn_implementation == "eager" and output_attentions
        t = ids.shape[1]
        n = (t - 1) // 2
        a = torch.zeros(1, 4, t, t)
        a[..., 0] = 1 - self.w
        for i in range(1 + n, t):
            assert ids[0, i] == ids[0, i - n]  # the second copy repeats the first
            a[0, :2, i, i - n + 1] += self.w
            a[0, 2:, i, i - n] += self.w
        return SimpleNamespace(attentions=(a,))


def test_echo_and_induction_scores_read_the_right_positions():
    model = _Constructed(0.7)
    echo, induction = head_scores(model, length=20, samples=2, progress=False)
    assert torch.allclose(induction[0], torch.tensor([0.7, 0.0]), atol=1e-6)
    assert torch.allclose(echo[0], torch.tensor([0.0, 0.7]), atol=1e-6)
    assert model.config._attn_implementation == "sdpa"  # put back


def test_the_top_share_of_heads_by_combined_score_are_retrieval_heads():
    echo = torch.tensor([[0.0, 0.5, 0.0], [0.1, 0.0, 0.0]])
    induction = torch.tensor([[0.9, 0.0, 0.0], [0.0, 0.0, 0.3]])
    assert retrieval_heads(echo, induction, 0.34) == {(0, 0), (0, 1), (1, 2)}  # ceil(0.34 * 6) = 3
    assert retrieval_heads(echo, induction, 0.15) == {(0, 0)}
    assert retrieval_heads(echo, induction, 1.0, layers=[1]) == {(1, 0), (1, 1), (1, 2)}
    assert retrieval_heads(echo, induction, 0.0) == set()


def test_the_profile_is_checked_when_it_is_used(profile_path, tmp_path):
    raw = json.loads(profile_path.read_text())
    assert raw["method"] == "razor" and len(raw["calibration"]["echo"]) == 2
    other = tiny_llama(num_hidden_layers=3)
    with pytest.raises(ProfileError, match="another model"):
        ks.make_cache(other, f"razor:profile={profile_path}")
    with pytest.raises(ProfileError, match="not a retrieval-head"):
        ks.make_cache(_model(), "razor:profile=smollm2-135m-tada-0.27")
    with pytest.raises(ValueError, match="profile is required"):
        ks.make_cache(_model(), "razor")
    with pytest.raises(ValueError, match="share must be"):
        ks.make_cache(_model(), f"razor:profile={profile_path},share=1.5")
    assert ks.make_cache(_model(), profile=str(profile_path)).spec.startswith("razor:profile=")


def test_a_compensation_token_weighs_as_many_copies_of_the_mean():
    torch.manual_seed(0)
    layer = CompensatedLayer(window=4, sinks=2, exact_dtype=torch.float32)
    k, v = torch.randn(1, 1, 20, 8), torch.randn(1, 1, 20, 8)
    layer.update(k, v)
    assert layer.attend(torch.randn(1, 2, 20, 8), None, 0.3) is None  # the prefill: SDPA, then eviction
    assert layer.evicted() == 20 - 2 - 4 and layer.held() == 6
    k1, v1, q = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8), torch.randn(1, 2, 1, 8)
    layer.update(k1, v1)
    out = layer.attend(q, None, 0.3)
    gone = slice(2, 16)  # the step attends first, then its oldest window token leaves
    mk, mv = k[:, :, gone].mean(2, keepdim=True), v[:, :, gone].mean(2, keepdim=True)
    keys = torch.cat([k[:, :, :2], mk.expand(-1, -1, 14, -1), k[:, :, 16:], k1], 2)
    values = torch.cat([v[:, :, :2], mv.expand(-1, -1, 14, -1), v[:, :, 16:], v1], 2)
    ref = torch.softmax(q @ keys.transpose(-1, -2) * 0.3, -1) @ values
    assert torch.allclose(out, ref, atol=1e-5)
    assert layer.evicted() == 15
    parts = {p: sum(t.numel() * t.element_size() for t in ts) for p, ts in layer.parts().items()}
    assert parts["means"] == 2 * 8 * 4 and parts["window"] == 4 * 2 * 8 * 4


def test_every_head_kept_reproduces_full(profile_path):
    model = _model()
    ids = _ids(batch=2)
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0
    ref = greedy(model, ids, DynamicCache(config=model.config), n=16, attention_mask=mask)
    for spec in (f"razor:profile={profile_path},share=1.0",  # every head keeps all: the codec's own layers
                 f"razor:profile={profile_path},share=0.5,window=300"):  # half the heads kept in per-head layers
        cache = ks.make_cache(model, spec)
        assert torch.equal(greedy(model, ids, cache, n=16, attention_mask=mask), ref), spec
    assert all(isinstance(layer, RowSplit) and isinstance(layer.rows[0], HeadSplit) for layer in cache.layers)


def test_other_heads_hold_sinks_window_and_one_token_and_bytes_are_what_heads_hold(profile_path, tmp_path):
    model = _model()
    ids = _ids()
    cache = ks.make_cache(model, f"razor:profile={profile_path},share=0.5,window=16")
    greedy(model, ids, cache, n=6)
    report = cache.memory_report()
    for row, layer in zip(report["by_layer"], cache.layers):
        assert isinstance(layer, HeadSplit)
        assert sorted(layer.held_per_head()) == [4 + 16, 205]
        assert row["nbytes"] == sum(h.nbytes() for h in layer.heads)
        small = next(h for h in layer.heads if isinstance(h, CompensatedLayer))
        assert small.evicted() == 205 - 20
    full = ks.make_cache(model, "full")
    greedy(model, ids, full, n=6)
    assert report["nbytes"] < 0.6 * full.memory_report()["nbytes"]
    loaded = ks.load_cache(cache.save(tmp_path / "c.safetensors"), model)
    assert loaded.memory_report()["nbytes"] == report["nbytes"]
    nxt = torch.tensor([[7]])
    with torch.no_grad():
        assert torch.equal(model(nxt, past_key_values=cache).logits, model(nxt, past_key_values=loaded).logits)
    one = loaded.memory_report()["nbytes"]
    loaded.batch_repeat_interleave(2)
    assert loaded.memory_report()["nbytes"] == 2 * one


def test_a_padded_row_equals_its_run_alone_and_a_codec_stores_the_retrieval_heads(profile_path):
    model = _model()
    spec = f"razor:profile={profile_path},share=0.5,window=16 + kivi:bits=4,group=16"
    prompts = [_ids(n, seed=n) for n in (120, 170)]
    ids = torch.zeros(2, 170, dtype=torch.long)
    mask = torch.zeros(2, 170, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 170 - p.shape[1]:], mask[i, 170 - p.shape[1]:] = p[0], 1
    together = greedy(model, ids, ks.make_cache(model, spec), n=8, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = ks.make_cache(model, spec)
        assert torch.equal(together[i], greedy(model, p, alone, n=8)[0]), i
    assert alone.memory_report()["by_part"]["codes"] > 0
    with pytest.raises(ValueError, match="mean=head"):
        ks.make_cache(model, f"razor:profile={profile_path},share=0.5 + tada:bits=4")


def test_razor_refuses_tensor_parallelism(profile_path):
    method = ks.build_method(f"razor:profile={profile_path}")
    method._shard = object()
    with pytest.raises(ValueError, match="not supported under tensor parallelism"):
        method.prepare(_model())
