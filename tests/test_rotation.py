"""Rotation codecs: the rotation, the Lloyd-Max codebooks, the store, rotated attention, the turboquant method."""
import math

import pytest
import torch
from conftest import greedy, tiny_gemma3, tiny_llama
from transformers import DynamicCache

import kvshrink as ks
from kvshrink.kernels import cpu
from kvshrink.codecs.store import PagedStore
from kvshrink.layers import ComposedLayer
from kvshrink.codecs import rotation as rot
from kvshrink.codecs.packing import packed_size


@pytest.mark.parametrize("d", [16, 64, 128, 256, 96, 80])
def test_the_rotation_is_orthogonal_and_its_inverse_exact(d):
    x = torch.randn(2, 3, 5, d, dtype=torch.float64)
    s = rot.signs(7, 2, 3, d).double()
    y = rot.rotate(x, s)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12)
    assert torch.allclose(rot.unrotate(y, s), x, atol=1e-12)
    q = torch.randn(2, 3, 1, d, dtype=torch.float64)
    assert torch.allclose(rot.rotate(q, s) @ y.transpose(-1, -2), q @ x.transpose(-1, -2), atol=1e-10)
    # the transform is a Hadamard matrix: every entry ±1/sqrt(block)
    block = rot.hadamard_block(d)
    m = rot.fwht(torch.eye(d, dtype=torch.float64))
    assert torch.allclose(m.abs()[:block, :block], torch.full((block, block), block ** -0.5, dtype=torch.float64))


def test_bad_rotation_inputs():
    with pytest.raises(ValueError, match="power-of-two block of at least 16"):
        rot.hadamard_block(24)
    with pytest.raises(ValueError, match="seed must be an int"):
        rot.signs("1", 0, 2, 64)
    with pytest.raises(ValueError, match="quantizer must be one of"):
        rot.RotationCodec(quantizer="polar")
    with pytest.raises(ValueError, match="bits must be one of"):
        rot.RotationCodec(bits=5)
    with pytest.raises(ValueError, match="lloydmax' takes bits 2, 3 or 4"):
        rot.RotationCodec(bits=8)
    with pytest.raises(ValueError, match="turboquant: bits must be one of"):
        ks.make_cache(tiny_llama(), "turboquant:bits=5")
    with pytest.raises(ValueError, match="preset must be one of"):
        ks.make_cache(tiny_llama(), "turboquant:preset=turboquant_2bit")
    with pytest.raises(ValueError, match="preset turboquant_3bit_nc sets window=0; window=8 was asked for"):
        ks.make_cache(tiny_llama(), "turboquant:preset=turboquant_3bit_nc,window=8")
    with pytest.raises(ValueError, match="head_dim=24"):
        ks.make_cache(tiny_llama(head_dim=24, hidden_size=96), "turboquant")


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloyd_max_codebooks_reproduce_the_known_gaussian_mse(bits):
    centroids, mse = rot.gaussian_codebook(bits)
    assert mse == pytest.approx(rot.GAUSSIAN_LLOYD_MAX_MSE[bits], rel=2e-3)
    assert torch.allclose(centroids, -centroids.flip(0), atol=1e-6)  # symmetric
    z = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    codes = rot.lloydmax_encode(z[None, :] / math.sqrt(z.numel()), bits)
    empirical = ((rot.lloydmax_decode(codes, bits, z.numel()) * math.sqrt(z.numel()) - z) ** 2).mean()
    assert empirical.item() == pytest.approx(mse, rel=0.03)


@pytest.mark.parametrize("spec", [dict(bits=4), dict(bits=3), dict(bits=2), dict(bits=4, norm_correction=False),
                                  dict(bits=4, quantizer="uniform", group=32), dict(bits=8, quantizer="fp8"),
                                  dict(bits=8, quantizer="fp8", rotate=False), dict(bits=16)])
def test_the_store_counts_packed_bytes_and_decodes_close(spec):
    s = rot.RotationCodec(layer=3, **spec)
    store = PagedStore(s, "keys")
    x = torch.randn(1, 2, 40, 128) * 3
    x[..., 5] += 40  # an outlier channel
    store.append(x[:, :, :24])
    store.append(x[:, :, 24:])
    assert store.tokens == 40
    back = store.decode(torch.float32)
    err = ((back - x) ** 2).sum(-1).mean() / (x ** 2).sum(-1).mean()
    limit = {16: 1e-6, 8: 1e-3, 4: 0.02, 3: 0.06, 2: 0.2}[s.bits]
    assert err < limit
    n = 1 * 2 * 40
    nbytes = sum(t.numel() * t.element_size() for ts in store.parts().values() for t in ts)
    if s.quantizer == "lloydmax" and s.bits != 16:
        assert nbytes == n * (packed_size(128, s.bits) + 2)
        if s.norm_correction:  # decoded vectors keep their norm
            assert torch.allclose(back.norm(dim=-1), x.norm(dim=-1), rtol=2e-3)
    if s.quantizer == "fp8":
        assert nbytes == n * (128 + 2)
    store.drop_front(8)
    assert store.tokens == 32 and torch.equal(store.decode(torch.float32), back[:, :, 8:])


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_rotated_16_bit_codes_reproduce_full(make):
    model = make()
    ids = torch.randint(2, 95, (2, 60), generator=torch.Generator().manual_seed(3))
    ref = greedy(model, ids, DynamicCache(config=model.config), n=20)
    for attention in ("rotated", "decode") + (("cpu",) if cpu.unavailable() is None else ()):
        out = greedy(model, ids, ks.make_cache(model, f"turboquant:bits=16,window=4,sinks=2,attention={attention}"), n=20)
        assert torch.equal(out, ref), attention


@pytest.mark.parametrize("spec", ["bits=4,window=4,sinks=2", "bits=3,quantizer=uniform,group=16,window=4,sinks=2",
                                  "preset=turboquant_k8v4", "key_bits=3,value_bits=2,rotate_values=false,window=4"])
def test_attention_without_inverse_rotation_equals_decode_then_attend(spec):
    model = tiny_llama(head_dim=32, num_hidden_layers=5)
    ids = torch.randint(2, 95, (1, 50), generator=torch.Generator().manual_seed(5))
    logits = {}
    for attention in ("rotated", "decode") + (("cpu",) if cpu.unavailable() is None else ()):
        cache = ks.make_cache(model, f"turboquant:{spec},attention={attention}")
        rows = []
        with torch.no_grad():
            out = model(ids, past_key_values=cache, use_cache=True)
            for t in range(6):
                out = model(torch.tensor([[10 + t]]), past_key_values=cache, use_cache=True)
                rows.append(out.logits[0, -1])
        logits[attention] = torch.stack(rows)
        if attention != "decode":  # the layers that store codes read them with that backend
            assert any(isinstance(layer, ComposedLayer) and layer.backend == attention and layer.key_store.tokens
                       for layer in cache.layers)
    for attention in logits:
        assert torch.allclose(logits[attention], logits["decode"], atol=1e-4, rtol=1e-4), attention


def test_presets_have_vllm_byte_layouts():
    model = tiny_llama(head_dim=128, hidden_size=256, num_hidden_layers=6)
    ids = torch.randint(2, 95, (1, 64))
    want = {"turboquant_k8v4": 2 * (128 + 4) * 0 + (128 + 4) + (64 + 4), "turboquant_4bit_nc": 2 * (64 + 4),
            "turboquant_k3v4_nc": (48 + 4) + (64 + 4), "turboquant_3bit_nc": 2 * (48 + 4)}
    for preset, per_token_head in want.items():
        cache = ks.make_cache(model, f"turboquant:preset={preset}")
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
        r = cache.memory_report()
        compressed = [row for row in r["by_layer"] if row["layer"] not in (0, 1, 4, 5)]
        for row in compressed:
            assert row["nbytes"] == 64 * 2 * per_token_head, (preset, row)
        assert all(row["bits"] == "full" for row in r["by_layer"] if row["layer"] in (0, 1, 4, 5))


def test_tada_rotation_option_and_profile_choice(tmp_path):
    from kvshrink.codecs.rotation import RotationCodec
    from kvshrink.profile import LayerChoice, Profile, ProfileError, fingerprint, load_profile

    model = tiny_llama(head_dim=32)
    ids = torch.randint(2, 95, (1, 60), generator=torch.Generator().manual_seed(8))
    cache = ks.make_cache(model, "tada:bits=4,rotate=values,mean=none,group=8,window=4")
    greedy(model, ids, cache, n=4)
    layer = cache.layers[0]
    assert isinstance(layer.value_store.codec, RotationCodec) and not isinstance(layer.key_store.codec, RotationCodec)
    assert layer.value_store.tokens > 0
    with pytest.raises(ValueError, match="rotation needs bits in"):
        ks.make_cache(model, "tada:bits=4,rotate=keys,mean=head")
    with pytest.raises(ValueError, match="rotate must be one of"):
        ks.make_cache(model, "tada:rotate=all")
    # a profile may rotate one layer's keys and keep grouped codes elsewhere; version-1 files still load
    choices = [LayerChoice(3, 4, "none", "none", True, False), LayerChoice(4, 2, "none", "none")]
    path = tmp_path / "p.json"
    Profile(fingerprint(model), "tada", {"group": 8, "window": 4}, choices).save(path)
    loaded = load_profile(path)
    assert loaded.layers == choices
    cache = ks.make_cache(model, f"tada:profile={path}")
    greedy(model, ids, cache, n=4)
    assert isinstance(cache.layers[0].key_store.codec, RotationCodec)
    assert not isinstance(cache.layers[1].key_store.codec, RotationCodec)
    import json

    raw = json.loads(path.read_text())
    raw["version"] = 1
    for entry in raw["layers"]:
        del entry["key_rotate"], entry["value_rotate"]
    path.write_text(json.dumps(raw))
    assert not any(c.key_rotate or c.value_rotate for c in load_profile(path).layers)
    raw["layers"][0]["key_rotate"] = True  # a version-1 file cannot rotate
    path.write_text(json.dumps(raw))
    with pytest.raises(ProfileError, match="expected key_bits, key_mean"):
        load_profile(path)
    raw["version"] = 2
    raw["layers"][0].update(key_rotate=True, key_bits=8)
    raw["layers"][0]["value_rotate"] = False
    path.write_text(json.dumps(raw))
    with pytest.raises(ProfileError, match="key_rotate needs key_bits in"):
        load_profile(path)


def test_calibration_may_choose_rotation():
    from kvshrink.calibrate import calibrate
    from kvshrink.eval.corpus import pydoc_text

    class Tok:  # token ids straight from bytes: enough text for a tiny random model
        def __call__(self, text, return_tensors=None, add_special_tokens=False):
            ids = torch.tensor([[2 + b % 90 for b in text.encode()[:20000]]])
            return type("E", (), {"input_ids": ids})()

    model = tiny_llama(head_dim=32)
    profile = calibrate(model, tokenizer=Tok(), target_bits=3, budget_context=256, search="greedy", samples=1,
                        context=96, scored=8, bits=(2, 3, 4, 8), text=pydoc_text()[:20000], progress=False,
                        options={"group": 8, "window": 4}, rotation=True)
    sens = profile.calibration["greedy"]["sensitivity"]
    assert {k.split("/")[2] for k in sens} == {"none", "head", "rotate"}
    assert profile.predicted_ratio is not None
