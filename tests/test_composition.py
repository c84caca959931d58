"""The storage model: any token policy composed with any codec (`POLICY + CODEC`), codecs and policies as registered
one-file recipes (a toy codec and a toy policy are added here, in the test folder only), canonical specs, and every
spec that existed before the storage-model change keeping its bytes and greedy tokens."""
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import greedy, tiny_llama

import kvshrink as ks
from kvshrink.codecs import Field, Layout, PagedStore, register_codec
from kvshrink.codecs.base import Codec
from kvshrink.options import option
from kvshrink.policies.scoring import Policy, register_policy

DATA = Path(__file__).parent / "data"


# -- a toy codec: int8 codes with one fp16 scale per token and head (absmax) ----------------------------------------
@register_codec
@dataclass(frozen=True)
class Int8Codec(Codec):
    name = "toy-int8"
    summary = "int8 absmax per token (a test's toy)"

    clip: float = option(1.0, "share of the absmax the codes span")

    def layout(self, head_dim):
        return Layout("toy-int8", (), (Field("codes", torch.int8, (head_dim,), "codes"),
                                       Field("scale", torch.float16, (1,), "scales")))

    def encode(self, x, store):
        scale = (x.float().abs().amax(-1, keepdim=True) * self.clip / 127).clamp_min(1e-8)
        return {"codes": (x.float() / scale).round().clamp(-127, 127).to(torch.int8), "scale": scale.half()}

    def decode(self, fields, store):
        return fields["codes"].float() * fields["scale"].float()


# -- a toy policy: keep the tokens at even positions first -----------------------------------------------------------
@register_policy
class EvenFirst(Policy):
    name = "toy-even"
    summary = "even positions outrank odd ones, later ones first (a test's toy)"
    needs = ()

    def score(self, ctx):
        p = ctx.positions.float()
        return p + 1e6 * (ctx.positions % 2 == 0).float()


def _ids(n, seed=0):
    return torch.randint(2, 95, (1, n), generator=torch.Generator().manual_seed(seed))


def test_a_new_codec_and_a_new_policy_compose_with_the_others():
    model = tiny_llama(head_dim=32, hidden_size=128)
    ids = _ids(120)
    cache = ks.make_cache(model, "toy-even:budget=0.5,window=8 + toy-int8")
    out = greedy(model, ids, cache, n=6)
    assert out.shape == (1, 6)
    layer = cache.layers[0]
    held = layer.positions[0, 0]
    middle = held[(held >= layer.sinks) & (held < layer.seen - layer.window)]
    assert len(middle) and bool((middle % 2 == 0).all())  # the toy policy chose what stays
    assert layer.key_store.codec.name == "toy-int8" and layer.key_store.tokens == len(middle)
    report = cache.memory_report()
    # int8 codes and an fp16 scale per stored token and head, exact sinks and window, positions and scores
    h, d = 2, 32
    stored = sum(row["kept"] - min(row["kept"], 4 + 8) for row in report["by_layer"])
    assert report["by_part"]["codes"] == 2 * stored * h * d and report["by_part"]["scales"] == 2 * stored * h * 2
    # the toy codec composes with a named policy method too, and the toy policy with a storing method
    greedy(model, ids, ks.make_cache(model, "h2o:budget=0.5 + toy-int8"), n=3)
    greedy(model, ids, ks.make_cache(model, "toy-even:budget=0.5 + kivi:bits=4,key_axis=token"), n=3)


def test_snapkv_with_tada_codes_stores_the_kept_tokens_at_the_codec_bytes():
    model = tiny_llama(head_dim=32, hidden_size=128)
    ids = _ids(1000, 1)
    plain = ks.make_cache(model, "snapkv:budget=0.25")
    composed = ks.make_cache(model, "snapkv:budget=0.25 + tada:bits=2,mean=channel,exact_dtype=float16")
    greedy(model, ids, plain, n=8)
    greedy(model, ids, composed, n=8)
    a, b = plain.layers[0], composed.layers[0]
    assert torch.equal(a.positions, b.positions)  # same policy, same scores: the same tokens stay
    assert b.key_store.codec.bits == 2 and b.key_store.tokens > 0
    ra, rb = plain.memory_report(), composed.memory_report()
    assert rb["tokens"] == ra["tokens"] and rb["nbytes"] < 0.5 * ra["nbytes"]
    assert rb["method"] == "snapkv + tada"


def test_tova_with_turboquant_evicts_from_rotated_codes_while_decoding():
    model = tiny_llama(head_dim=32, hidden_size=128)
    ids = _ids(100, 2)
    cache = ks.make_cache(model, "tova:budget=0.5,window=8 + turboquant:bits=4")
    greedy(model, ids, cache, n=20)
    layer = cache.layers[0]
    assert layer.positions.shape[-1] == layer.budget_tokens() == 60  # ceil(0.5 * 120): the budget holds
    assert layer.key_store.codec.name == "rotated" and layer.key_store.tokens == 60 - 4 - 8
    assert torch.equal(layer.positions[:, 0], layer.positions[:, 1])  # TOVA: every head keeps the same tokens


@pytest.mark.model
def test_snapkv_with_the_shipped_smollm2_profile(real_model):
    model, tok = real_model
    ids = tok("The capital of France is Paris. " * 60 + "What is the capital of France?", return_tensors="pt").input_ids
    cache = ks.make_cache(model, "snapkv:budget=0.25 + tada:profile=smollm2-135m-tada-0.27")
    out = greedy(model, ids, cache, n=8)
    ref = greedy(model, ids, None, n=8)
    report = cache.memory_report()
    plain = ks.make_cache(model, "snapkv:budget=0.25")
    greedy(model, ids, plain, n=8)
    assert report["nbytes"] < 0.6 * plain.memory_report()["nbytes"]
    assert out.shape == ref.shape == (1, 8)


def test_compositions_are_checked_where_they_enter():
    model = tiny_llama(head_dim=32, hidden_size=128)
    with pytest.raises(ValueError, match="POLICY side .* must be a token-policy method"):
        ks.make_cache(model, "kivi + tada")
    with pytest.raises(ValueError, match="CODEC side .* must store tokens"):
        ks.make_cache(model, "snapkv + h2o")
    with pytest.raises(ValueError, match="window is 16 on the policy side and 8 on the codec side"):
        ks.make_cache(model, "snapkv:window=16 + kivi:window=8")
    with pytest.raises(ValueError, match="span 32 tokens"):  # per-channel key groups cannot lose single tokens
        ks.make_cache(model, "h2o:budget=0.5 + kivi:bits=2")
    with pytest.raises(ValueError, match="unknown method 'zstd'; available: .*; codecs: .*gear"):
        ks.make_cache(model, "snapkv + zstd")
    with pytest.raises(ValueError, match="one token policy and one codec"):
        ks.make_cache(model, "snapkv + kivi + tada")


def test_canonical_specs_spell_each_spec_one_way():
    assert ks.canonical_spec("kivi:group=32 ,bits=2") == "kivi:bits=2,group=32"
    assert ks.canonical_spec("h2o:budget=.25,score=normalized") == "h2o:budget=0.25,score=normalized"
    assert ks.canonical_spec("snapkv:budget=0.25+tada:mean=channel,bits=2") == \
        "snapkv:budget=0.25 + tada:bits=2,mean=channel"
    assert ks.canonical_spec("turboquant:rotate_keys=0") == "turboquant:rotate_keys=false"
    assert ks.canonical_spec("toy-even:budget=0.5 + grouped:bits=4") == "toy-even:budget=0.5 + grouped:bits=4"
    with pytest.raises(ValueError, match="option 'bits' is given twice"):
        ks.canonical_spec("kivi:bits=2,bits=4")


@pytest.mark.parametrize("spec", ["snapkv:window=8 + kivi:bits=2", "snapkv:sinks=2 + turboquant",
                                  "h2o:budget=0.3 + grouped:bits=4,axis=token", "tova + kivi:window=16,key_axis=token"])
def test_a_composition_spec_builds_the_same_composition_again(spec):
    method = ks.build_method(spec)
    again = ks.build_method(method.spec())
    assert (again.window, again.sinks) == (method.window, method.sinks) and again.spec() == method.spec()


def test_codecs_declare_the_tensors_their_stores_hold():
    """Every registered codec's store holds exactly the fields its layout declares, with their dtypes and shapes."""
    x = torch.randn(2, 3, 64, 32)
    for name in ("grouped", "rotated", "exact", "toy-int8"):
        for opts in ({}, {"bits": 2}, {"axis": "channel"}, {"center": "head"}, {"center": "channel"},
                     {"quantizer": "uniform"}, {"quantizer": "fp8", "bits": 8}, {"dtype": "bfloat16"}):
            try:
                codec = ks.make_codec(name, **opts)
            except ValueError:
                continue
            store = PagedStore(codec, name, page_tokens=32)
            store.append(x)
            layout = codec.layout(32)
            held = store.state_dict()[0]
            for f in layout.fields:
                if f.tokens:
                    pages = [held[f"page.{i}.{f.name}"] for i in range(len(store.fills))]
                    assert all(p.dtype == f.dtype and tuple(p.shape[3:]) == f.shape for p in pages), (name, opts, f)
                    assert sum(p.shape[2] for p in pages) * f.tokens == 64
                else:
                    assert held[f"state.{f.name}"].dtype == f.dtype
            assert store.nbytes() == sum(t.numel() * t.element_size() for t in held.values())


def test_every_spec_keeps_the_bytes_and_tokens_it_had_before_the_storage_model():
    """Records made by benchmarks/spec_baseline.py before the change (tests/data/spec-baseline-tiny.json)."""
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "spec_baseline.py"
    spec = importlib.util.spec_from_file_location("spec_baseline", path)
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    old = json.loads((DATA / "spec-baseline-tiny.json").read_text())
    model, ids, cal = baseline.load("tiny", old.get("request", old["context"]))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        files = baseline.bases_files(model, cal, Path(tmp))
        for name, want in old["records"].items():
            got = baseline.measure(model, ids, name.format(**files), old["new"])
            assert (got["nbytes"], got["tokens"], got["ids"]) == (want["nbytes"], want["tokens"], want["ids"]), name


def _layered_profile(model, tmp_path, layers):
    from kvshrink.profile import LayerRecipe, Profile, fingerprint

    path = tmp_path / "layered.json"
    Profile(fingerprint(model), "layered", {"window": 8, "sinks": 2}, [LayerRecipe(*x) for x in layers]).save(path)
    return path


def test_a_profile_gives_each_layer_and_head_its_codec_and_policy(tmp_path):
    from kvshrink.codecs.store import HeadSplitStore

    model = tiny_llama(head_dim=32, hidden_size=128)
    path = _layered_profile(model, tmp_path, [
        (("grouped:bits=4,group=16", "rotated:bits=3"), "grouped:bits=2,group=16", None),
        ("exact", "exact", "snapkv:budget=0.5"),
    ])
    ids = _ids(200, 3)
    cache = ks.make_cache(model, profile=str(path))
    assert cache.method == "layered"
    greedy(model, ids, cache, n=6)
    first, second = cache.layers
    assert isinstance(first.key_store, HeadSplitStore) and [len(h) for h, _ in first.key_store.groups] == [1, 1]
    assert first.key_store.groups[1][1].codec.name == "rotated" and first.key_store.tokens > 0
    assert first.policy is None and second.policy.name == "snapkv" and second.positions.shape[-1] < 205
    # one head at 4 bits (16-channel groups: 16 code bytes + 8 scale bytes), the other rotated 3-bit (12 + 2)
    stored = first.key_store.tokens
    codes = sum(t.numel() for p, t in first.key_store.tensors() if p == "codes")
    assert codes == stored * (16 + 12)
    # a saved cache of per-head codecs and policies resumes with the same tokens
    more = torch.cat([ids, greedy(model, ids, ks.make_cache(model, profile=str(path)), n=6)], 1)
    saved = ks.load_cache(cache.save(tmp_path / "c.safetensors"), model)
    assert saved.memory_report()["nbytes"] == cache.memory_report()["nbytes"]
    assert torch.equal(greedy(model, more, saved, n=4), greedy(model, more, cache, n=4))


def test_a_layered_profile_is_checked_where_it_is_read(tmp_path):
    from kvshrink.profile import ProfileError

    model = tiny_llama(head_dim=32, hidden_size=128)
    path = _layered_profile(model, tmp_path, [("grouped:bits=5", "exact", None), ("exact", "exact", None)])
    with pytest.raises(ValueError, match="layer 0 keys: codec grouped: bits must be one of"):
        ks.make_cache(model, profile=str(path))
    path = _layered_profile(model, tmp_path, [("exact", "exact", "kivi:bits=2"), ("exact", "exact", None)])
    with pytest.raises(ValueError, match="'kivi:bits=2' is not a token-policy method"):
        ks.make_cache(model, profile=str(path))
    kvzip = _layered_profile(model, tmp_path, [("exact", "exact", "kvzip:budget=0.5"), ("exact", "exact", None)])
    with pytest.raises(ValueError, match="kvzip cannot be one layer's policy"):
        ks.make_cache(model, profile=str(kvzip))
    path = _layered_profile(model, tmp_path, [("exact", "exact", "kivi:bits=2"), ("exact", "exact", None)])
    raw = json.loads(path.read_text())
    raw["layers"][0]["key"] = 3
    from kvshrink.profile import _body_digest

    raw["sha256"] = _body_digest(raw)  # written so on purpose (an edit alone is refused by its digest)
    path.write_text(json.dumps(raw))
    with pytest.raises(ProfileError, match="layer 0: key must be a codec spec or a list"):
        ks.make_cache(model, profile=str(path))


def test_a_profile_with_any_byte_flipped_is_refused(tmp_path):
    from kvshrink.profile import ProfileError, load_profile

    model = tiny_llama(head_dim=32, hidden_size=128)
    path = _layered_profile(model, tmp_path, [("grouped:bits=4,group=16", "exact", "snapkv:budget=0.5"),
                                              ("exact", "exact", None)])
    good = path.read_bytes()
    load_profile(path)
    refused = 0
    for i in range(0, len(good), max(1, len(good) // 97)):
        bad = bytearray(good)
        bad[i] ^= 0x04  # one bit: digits stay digits ('2' -> '6'), letters stay letters
        path.write_bytes(bytes(bad))
        with pytest.raises(ProfileError):
            load_profile(path)
        refused += 1
    path.write_bytes(good[: len(good) // 2])  # cut short
    with pytest.raises(ProfileError, match="not a readable JSON file"):
        load_profile(path)
    assert refused > 90


def test_kvshrink_codecs_lists_every_codec_with_its_options_and_attention_paths(capsys):
    """`kvshrink codecs`: each registered codec, its options, and the decode attention paths it has per device (as
    the codec class declares them)."""
    from kvshrink.cli import main
    from kvshrink.codecs import CODECS

    assert main(["codecs"]) == 0
    out = capsys.readouterr().out
    for name, cls in CODECS.items():
        assert f"{name}: {cls.summary}" in out
        paths = "; ".join(f"{dev}: {', '.join(p)}" for dev, p in cls.backends.items())
        assert f"attention: {paths}" in out
    assert "cuda: torch, rotated, triton" in out  # the rotated codec's GPU kernel
    assert "bit widths by number format" in out
