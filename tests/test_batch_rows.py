"""A row's answer does not depend on what else is in the batch: left-padded batch rows through `generate()` equal
the same prompts run alone, for every method family (pad positions never enter a group, a scale, a sink, a score, a
budget or a kept set: `layers/rows.py`)."""
import pytest
import torch
from conftest import tiny_llama

import kvshrink as ks
from kvshrink.layers.rows import RowSplit, left_padding

FAMILIES = ["full", "kivi:bits=2", "tada:profile=smollm2-135m-tada-0.27", "turboquant:bits=3",
            "h2o:budget=0.25", "snapkv:budget=0.25", "tova:budget=0.25",
            "mixed:budget=0.25", "snapkv:budget=0.25 + tada:profile=smollm2-135m-tada-0.27", "kvdirect",
            "tale:profile={bases},target_ratio=0.3"]


def _batch(prompts, pad):
    n = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), n), pad)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - p.shape[1]:], mask[i, n - p.shape[1]:] = p[0], 1
    return ids, mask


def _generate(model, ids, mask, spec, pad, n=8):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, past_key_values=ks.make_cache(model, spec), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=pad)
    return out[:, ids.shape[1]:]


@pytest.mark.model
def test_left_padded_rows_equal_their_runs_alone_for_every_family(real_model, tmp_path):
    from kvshrink.bases import bases_profile
    from kvshrink.eval.corpus import calibration_text, heldout_text

    model, tok = real_model
    text = heldout_text()
    prompts = [tok(text[1500 * i:], return_tensors="pt").input_ids[:, :n] for i, n in enumerate((40, 90, 140))]
    cal = tok(calibration_text()[:6000], return_tensors="pt").input_ids
    bases = bases_profile(model, cal, method="tale", samples=1, context=256, progress=False).save(tmp_path / "b.json")
    ids, mask = _batch(prompts, tok.pad_token_id)
    for spec in FAMILIES:
        spec = spec.format(bases=bases)
        together = _generate(model, ids, mask, spec, tok.pad_token_id)
        for i, p in enumerate(prompts):
            alone = _generate(model, p, torch.ones_like(p), spec, tok.pad_token_id)
            assert torch.equal(together[i], alone[0]), (spec, i)


def test_left_padding_is_read_from_the_mask_and_only_left_padding_splits():
    assert left_padding(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])) == [2, 0]
    assert left_padding(torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1]])) is None  # nothing padded: nothing to split
    assert left_padding(torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])) is None  # right padding is not split
    assert left_padding(torch.tensor([[0, 1, 0, 1]])) is None  # holes are not either


def test_a_split_cache_reports_saves_resumes_and_selects_rows(tmp_path):
    model = tiny_llama(head_dim=32, hidden_size=128)
    prompts = [torch.randint(2, 95, (1, n), generator=torch.Generator().manual_seed(n)) for n in (40, 90)]
    ids, mask = _batch(prompts, 0)
    cache = ks.make_cache(model, "kivi:bits=2,group=16,window=8")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=4, min_new_tokens=4,
                             do_sample=False, pad_token_id=0)
    assert all(isinstance(layer, RowSplit) for layer in cache.layers)
    report = cache.memory_report()
    alone = []
    for p in prompts:
        single = ks.make_cache(model, "kivi:bits=2,group=16,window=8")
        with torch.no_grad():
            model.generate(p, past_key_values=single, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                           pad_token_id=0)
        alone.append(single.memory_report()["nbytes"])
    # each row holds what it holds alone (its pads are not held)
    assert report["nbytes"] == sum(alone) and report["batch"] == 2
    loaded = ks.load_cache(cache.save(tmp_path / "c.safetensors"), model)
    assert loaded.memory_report()["nbytes"] == report["nbytes"]
    more = torch.cat([out, torch.full((2, 1), 7)], 1)
    grow = torch.cat([mask, torch.ones(2, out.shape[1] - ids.shape[1] + 1, dtype=torch.long)], 1)
    with torch.no_grad():
        a = model(more[:, -1:], attention_mask=grow, past_key_values=cache).logits
        b = model(more[:, -1:], attention_mask=grow, past_key_values=loaded).logits
    assert torch.equal(a, b)
    cache.batch_select_indices(torch.tensor([1]))
    assert len(cache.layers[0].rows) == 1 and cache.layers[0].pads == [0]
