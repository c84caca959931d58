"""GPU benchmark of the packed-cache kernels: one decode step of attention, quantize-and-pack, end-to-end decoding.

    .venv/bin/python benchmarks/gpu_decode.py                 # on a CUDA machine; writes benchmarks/results/
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/gpu_decode.py --smoke   # tiny shapes on the CPU: checks the
                                                                          # script runs; its timings mean nothing

1. Attention, Llama-3.1-8B-shaped (32 query heads, 8 KV heads, head dim 128), random data: one decode step at each
   context and batch, for PyTorch SDPA over the fp16 cache (the faster of `enable_gqa=True` and the query heads of a
   group folded into query rows) and for `kernels.packed_attention` over stores of 8, 4 and 2 bits (tada's layout:
   keys per channel in groups of 32 tokens, values per token in groups of 32 channels, per-channel mean; plus 4
   sinks and a 32-token fp16 window). Time is the median of CUDA-event timings; bandwidth is the bytes the step
   must read (the tensors held, from their real sizes) divided by that time; speed-up = SDPA time / kernel time.
2. Quantize-and-pack of one layer's keys and values after a prefill, against the prefill time of that decoder layer.
3. End to end: a randomly initialised Llama-3.1-8B-shaped model (`--layers` of them), prefill then greedy decode,
   tokens/s for `full`, `tada:bits=4` and `tada:bits=2` (kernels), and tada through the PyTorch path.

4. A profile end to end (`--profile`, default the rotation-aware Qwen2.5-Coder-1.5B profile at 0.20): a randomly
   initialised model of the profile's geometry (Qwen2.5-Coder-1.5B's config, bf16), prefill then greedy decode at
   `--profile-contexts` x `--profile-batches`, tokens/s for `full`, the profile through the Triton kernels and the
   profile through the PyTorch path. Random weights: the figures are speed, not quality. A transformers version whose
   config attributes differ changes the profile's config hash only; the geometry is checked and the run says so.

Figures are ratios against the fp16 baseline measured in the same run, on the device named in the results.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

import kvshrink as ks
from kvshrink import kernels
from kvshrink.codecs.quant import GroupCodec
from kvshrink.codecs.store import PagedStore
from kvshrink.eval.bench import parse_length
from kvshrink.io import atomic_write_text
from kvshrink.report import markdown_table

HQ, HKV, D = 32, 8, 128
SINKS, WINDOW = 4, 32


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn, iters: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `iters` runs after 3 warm-up runs (CUDA events on a GPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def random_store(spec: GroupCodec, b: int, t: int, device: torch.device, name: str) -> PagedStore:
    """A store holding `t` tokens of random codes in the codec's declared layout (speed needs no real data): random
    bytes for the codes, small positive fp16 scales, zeros that centre the codes, random fp16 means."""
    s = PagedStore(spec, name)
    layout = s.layout = spec.layout(D)
    s.head_dim = D

    def random(f):
        heads = 1 if f.shared_heads else HKV
        shape = (b, heads, t // f.tokens, *f.shape) if f.tokens else (b, heads, *f.shape)  # fixed: [B, H, *shape]
        if f.dtype == torch.uint8:
            return torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
        if f.name == "scale":
            return torch.rand(shape, device=device).half() * 0.1
        return torch.randn(shape, device=device).half()

    fields = {f.name: random(f) for f in layout.growing}
    if "zero" in fields:
        fields["zero"] = -fields["scale"] * (1 << (spec.bits - 1))
    s.state.update({f.name: random(f) for f in layout.fixed})
    s._write(fields, t)
    return s


def nbytes(*tensors) -> int:
    return sum(x.numel() * x.element_size() for x in tensors if x is not None)


def store_bytes(s: PagedStore) -> int:
    return nbytes(*[x for _, x in s.tensors()])


def attention_bench(contexts, batches, bits_list, center, iters, device, check=True):
    rows = []
    for t in contexts:
        for b in batches:
            q = torch.randn(b, HQ, 1, D, device=device, dtype=torch.float16)
            need = 2 * b * HKV * t * D * 2
            free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else need * 4
            if need * 1.6 > free:
                rows.append({"context": t, "batch": b, "skipped": f"the fp16 cache needs {need / 2**30:.1f} GiB"})
                log(f"context {t} batch {b}: skipped (memory)")
                continue
            k = torch.randn(b, HKV, t, D, device=device, dtype=torch.float16)
            v = torch.randn(b, HKV, t, D, device=device, dtype=torch.float16)
            gqa = timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), iters, device)
            folded = timed(lambda: F.scaled_dot_product_attention(q.view(b, HKV, HQ // HKV, D), k, v), iters, device)
            base_t = min(gqa, folded)
            base_bytes = nbytes(q, k, v)
            row = {"context": t, "batch": b, "sdpa_s": base_t, "sdpa_gqa_s": gqa, "sdpa_folded_s": folded,
                   "sdpa_bytes": base_bytes, "sdpa_GBps": base_bytes / base_t / 1e9, "kernels": {}}
            del k, v
            stored = (t - SINKS - WINDOW) // 32 * 32  # whole groups of 32 tokens; the window takes the rest
            for bits in bits_list:
                ks_ = random_store(GroupCodec(bits, 32, "channel", center), b, stored, device, "keys")
                vs_ = random_store(GroupCodec(bits, 32, "token", center), b, stored, device, "values")
                ek = torch.randn(b, HKV, t - stored, D, device=device, dtype=torch.float16)
                ev = torch.randn_like(ek)
                idx = torch.cat([torch.arange(SINKS), torch.arange(SINKS + stored, t)]).to(device)
                fn = lambda: kernels.packed_attention(q, ks_, vs_, ek, ev, idx, SINKS)  # noqa: E731
                kt = timed(fn, iters, device)
                # the part of a call spent joining the store's pages into one tensor per field (the kernel reads
                # one tensor per field; a decode step joins them again)
                join = timed(lambda: (kernels._store_args(ks_, D), kernels._store_args(vs_, D)), iters, device)
                kbytes = store_bytes(ks_) + store_bytes(vs_) + nbytes(q, ek, ev)
                entry = {"s": kt, "bytes": kbytes, "GBps": kbytes / kt / 1e9, "speedup_vs_sdpa": base_t / kt,
                         "bytes_vs_fp16": kbytes / base_bytes, "join_s": join, "pages": len(ks_.pages)}
                if check and t <= 8192 and b == batches[0]:
                    from kvshrink.kernels import reference

                    ref = reference.packed_attention(q, ks_, vs_, ek, ev, idx, SINKS)
                    entry["max_abs_err_vs_reference"] = (fn().float() - ref.float()).abs().max().item()
                row["kernels"][bits] = entry
                log(f"context {t} batch {b}: sdpa {base_t * 1e6:.0f} us, {bits}-bit {kt * 1e6:.0f} us "
                    f"({base_t / kt:.2f}x, {entry['GBps']:.0f} GB/s; joining {len(ks_.pages)} pages: "
                    f"{join * 1e6:.0f} us)")
                del ks_, vs_, ek, ev
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def llama8b_config(layers: int, smoke: bool):
    from transformers import LlamaConfig

    if smoke:
        return LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                           num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096)
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D, max_position_embeddings=131072,
                       rope_theta=500000.0)


def quantize_bench(contexts, bits_list, iters, device, smoke):
    """Quantize-and-pack of one layer's K and V after a prefill of `t` tokens, vs that decoder layer's prefill."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = llama8b_config(1, smoke)
    config._attn_implementation = "sdpa"
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    layer = LlamaDecoderLayer(config, 0).to(device=device, dtype=dtype).eval()
    rope = LlamaRotaryEmbedding(config).to(device)
    hkv, d = config.num_key_value_heads, config.head_dim
    rows = []
    for t in contexts:
        x = torch.randn(1, t, config.hidden_size, device=device, dtype=dtype)
        pos = torch.arange(t, device=device)[None]
        emb = rope(x, pos)
        with torch.no_grad():
            prefill = timed(lambda: layer(x, position_embeddings=emb, position_ids=pos), iters, device)
        kv = torch.randn(1, hkv, t - t % 32, d, device=device, dtype=dtype)
        row = {"context": t, "layer_prefill_s": prefill, "quantize": {}}
        for bits in bits_list:
            kspec, vspec = GroupCodec(bits, 32, "channel", "channel"), GroupCodec(bits, 32, "token", "channel")
            cm = kv.float().mean(2, keepdim=True).half()
            qt = timed(lambda: (kernels.quantize_pack(kv, kspec, cm), kernels.quantize_pack(kv, vspec, cm)),
                       iters, device)
            row["quantize"][bits] = {"s": qt, "share_of_prefill": qt / prefill}
            log(f"prefill {t}: layer {prefill * 1e3:.2f} ms, quantize-and-pack K+V {bits}-bit {qt * 1e3:.3f} ms "
                f"({100 * qt / prefill:.2f}%)")
        rows.append(row)
    return rows


WARMUP_STEPS = 4  # untimed decode steps before the timed ones (compilation, allocator)


def decode_seconds(model, ids, cache, new_tokens, device, **prefill) -> float:
    """Prefill `ids` into `cache`, decode WARMUP_STEPS greedy tokens untimed (the kernels compile on their first
    calls), then the seconds of `new_tokens` greedy steps."""
    with torch.no_grad():
        nxt = model(ids, past_key_values=cache, use_cache=True, **prefill).logits[:, -1:].argmax(-1)
        for _ in range(WARMUP_STEPS):
            nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def e2e_bench(layers, context, batch, new_tokens, device, smoke):
    """Decode tokens/s of a random Llama-3.1-8B-shaped model for full and tada 4/2-bit (kernels and PyTorch path)."""
    from transformers import LlamaForCausalLM

    config = llama8b_config(layers, smoke)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    ids = torch.randint(0, config.vocab_size, (batch, context), device=device)
    # kernel=triton insists on the kernels (auto would pick them on CUDA anyway, and warn if it could not)
    specs = ["full", "tada:bits=4,mean=channel,kernel=triton", "tada:bits=2,mean=channel,kernel=triton",
             "tada:bits=4,mean=channel,kernel=torch"]
    rows = []
    for spec in specs:
        cache = ks.make_cache(model, spec)
        dt = decode_seconds(model, ids, cache, new_tokens, device)
        rows.append({"method": spec, "decode_tokens_per_s": batch * new_tokens / dt, "cache_bytes": cache.nbytes()})
        log(f"e2e {spec}: {batch * new_tokens / dt:.1f} tokens/s, cache {cache.nbytes() / 2**20:.0f} MiB")
        del cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = rows[0]["decode_tokens_per_s"]
    for r in rows:
        r["speed_vs_full"] = r["decode_tokens_per_s"] / base
    model.set_attn_implementation("sdpa")
    return {"layers": layers, "context": context, "batch": batch, "new_tokens": new_tokens, "rows": rows}


QWEN_PROFILE = "benchmarks/profiles/qwen2.5-coder-1.5b-tada-rotate-0.20.json"


def qwen15b_config(smoke: bool):
    """Qwen2.5-Coder-1.5B-Instruct's attention geometry (28 layers, 12 query / 2 KV heads, head dim 128); the smoke
    run keeps the geometry (a profile is checked against it) and shrinks the vocabulary and the MLP."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=256 if smoke else 151936, hidden_size=1536, intermediate_size=256 if smoke else 8960,
                       num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True)


def _profile_for(model, path: str, folder: Path) -> tuple[str, str | None]:
    """The profile's path for `model`, or a copy stamped with the model's fingerprint when only the config hash
    differs (another transformers version names other config attributes); any other difference is an error."""
    from kvshrink.profile import ProfileError, fingerprint, load_profile

    profile = load_profile(path)
    try:
        profile.check_model(model)
        return path, None
    except ProfileError:
        mine = fingerprint(model)
        other = [k for k in mine if k != "config_hash" and profile.model.get(k) != mine[k]]
        if other:
            raise
        theirs = profile.model.get("config_hash")
        profile.model = mine
        copy = profile.save(folder / Path(path).name)
        return str(copy), (f"the model's config hash here is {mine['config_hash']}, the profile's {theirs} (this "
                           "transformers names other config attributes); the geometry matches, so a copy of the "
                           "profile stamped with the model's fingerprint was used")


def profile_bench(path, contexts, batches, new_tokens, device, smoke, folder: Path):
    """Decode tokens/s of a random model of the profile's geometry: `full`, the profile through the Triton kernels
    (kernel=triton) and through the PyTorch path (kernel=torch)."""
    from transformers import Qwen2ForCausalLM

    config = qwen15b_config(smoke)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype).eval()
    used, note = _profile_for(model, path, folder)
    if note:
        log(note)
    specs = {"full": "full", "profile, Triton kernels": f"tada:profile={used},kernel=triton",
             "profile, PyTorch path": f"tada:profile={used},kernel=torch"}
    rows = []
    for t in contexts:
        for b in batches:
            ids = torch.randint(0, config.vocab_size, (b, t), device=device)
            for label, spec in specs.items():
                cache = ks.make_cache(model, spec)
                dt = decode_seconds(model, ids, cache, new_tokens, device, logits_to_keep=1)
                report = cache.memory_report()
                rows.append({"context": t, "batch": b, "method": label, "spec": spec,
                             "decode_tokens_per_s": b * new_tokens / dt, "ratio": report["ratio"]})
                log(f"profile e2e ctx {t} batch {b} {label}: {b * new_tokens / dt:.1f} tokens/s, "
                    f"{report['ratio']:.3f} of fp16")
                del cache
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            base = rows[-len(specs)]["decode_tokens_per_s"]
            for r in rows[-len(specs):]:
                r["speed_vs_full"] = r["decode_tokens_per_s"] / base
    model.set_attn_implementation("sdpa")
    return {"profile": path, "note": note, "new_tokens": new_tokens, "dtype": str(dtype).removeprefix("torch."),
            "rows": rows}


def to_markdown(result) -> str:
    lines = [f"# GPU decode benchmark — {result['device']}", "", f"`{result['command']}` ({result['date']})", "",
             f"## One decode step of attention ({HQ} query / {HKV} KV heads, head dim {D})", ""]
    body = []
    for r in result["attention"]:
        if "skipped" in r:
            body.append([r["context"], r["batch"], "skipped: " + r["skipped"], "", "", "", ""])
            continue
        for bits, e in r["kernels"].items():
            body.append([r["context"], r["batch"], f"{r['sdpa_s'] * 1e6:.0f} ({r['sdpa_GBps']:.0f} GB/s)", bits,
                         f"{e['s'] * 1e6:.0f}", f"{e['join_s'] * 1e6:.0f}", f"{e['GBps']:.0f}",
                         f"{e['speedup_vs_sdpa']:.2f}x"])
    lines.append(markdown_table(["context", "batch", "fp16 SDPA us", "bits", "kernel us", "of which joining pages us",
                                 "kernel GB/s", "speed-up vs fp16"], body))
    lines += ["", "## Quantize-and-pack vs the prefill of the layer it serves", ""]
    body = [[r["context"], f"{r['layer_prefill_s'] * 1e3:.2f}", bits, f"{e['s'] * 1e3:.3f}",
             f"{100 * e['share_of_prefill']:.2f}%"] for r in result["quantize"] for bits, e in r["quantize"].items()]
    lines.append(markdown_table(["context", "layer prefill ms", "bits", "K+V quantize ms", "share"], body))
    e = result.get("e2e")
    if e:
        lines += ["", f"## End to end: {e['layers']} layers, context {e['context']}, batch {e['batch']}, "
                      f"{e['new_tokens']} new tokens", ""]
        lines.append(markdown_table(["method", "decode tokens/s", "vs full", "cache MiB"],
                                    [[f"`{r['method']}`", f"{r['decode_tokens_per_s']:.1f}", f"{r['speed_vs_full']:.2f}",
                                      f"{r['cache_bytes'] / 2**20:.0f}"] for r in e["rows"]]))
    p = result.get("profile")
    if p:
        lines += ["", f"## A profile end to end: `{p['profile']}`, random weights of its geometry ({p['dtype']}), "
                      f"{p['new_tokens']} new tokens", ""]
        if p["note"]:
            lines += [p["note"], ""]
        lines.append(markdown_table(["context", "batch", "method", "decode tokens/s", "vs full", "share of fp16"],
                                    [[r["context"], r["batch"], r["method"], f"{r['decode_tokens_per_s']:.1f}",
                                      f"{r['speed_vs_full']:.2f}", f"{r['ratio']:.3f}"] for r in p["rows"]]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default="4k,32k,128k")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--bits", default="8,4,2")
    p.add_argument("--center", default="channel", choices=["channel", "head", "none"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--prefill-contexts", default="4k,32k")
    p.add_argument("--layers", type=int, default=32, help="decoder layers of the end-to-end model")
    p.add_argument("--e2e-context", default="4k")
    p.add_argument("--e2e-batch", type=int, default=8)
    p.add_argument("--e2e-tokens", type=int, default=64)
    p.add_argument("--profile", default=QWEN_PROFILE, help="the profile decoded end to end (part 'profile')")
    p.add_argument("--profile-contexts", default="4k,16k")
    p.add_argument("--profile-batches", default="1,8")
    p.add_argument("--profile-tokens", type=int, default=32)
    p.add_argument("--skip", default="", help="parts to skip: attention,quantize,e2e,profile")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU with TRITON_INTERPRET=1 allowed)")
    p.add_argument("-o", "--output", default="benchmarks/results", help="folder for the JSON and markdown results")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not (a.smoke and kernels.interpreting()):
        log("gpu_decode.py needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1 to check the script on the CPU)")
        return 2
    if a.smoke:
        a.contexts, a.batches, a.prefill_contexts, a.e2e_context = "100,200", "1,2", "64", "40"
        a.layers, a.e2e_batch, a.e2e_tokens, a.iters = 2, 2, 3, 1
        a.profile_contexts, a.profile_batches, a.profile_tokens = "80", "1", 2
    skip = set(filter(None, a.skip.split(",")))
    contexts = [parse_length(c) for c in a.contexts.split(",")]
    batches = [int(b) for b in a.batches.split(",")]
    bits_list = [int(b) for b in a.bits.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter; not a timing)"
    result = {"device": name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/gpu_decode.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "torch": torch.__version__, "triton": __import__("triton").__version__}
    if a.smoke:
        global HQ, HKV, D
        HQ, HKV, D = 8, 2, 64
    result["attention"] = [] if "attention" in skip else attention_bench(contexts, batches, bits_list, a.center,
                                                                         a.iters, device)
    result["quantize"] = [] if "quantize" in skip else quantize_bench(
        [parse_length(c) for c in a.prefill_contexts.split(",")], bits_list, a.iters, device, a.smoke)
    if "e2e" not in skip:
        result["e2e"] = e2e_bench(a.layers, parse_length(a.e2e_context), a.e2e_batch, a.e2e_tokens, device, a.smoke)
    if "profile" not in skip:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            result["profile"] = profile_bench(a.profile, [parse_length(c) for c in a.profile_contexts.split(",")],
                                              [int(b) for b in a.profile_batches.split(",")], a.profile_tokens,
                                              device, a.smoke, Path(tmp))
    md = to_markdown(result)
    print(md)
    if a.output and not a.smoke:
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
        stamp = datetime.now().strftime("%Y-%m-%dT%H%M%S")
        out = Path(a.output)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / f"gpu-decode-{slug}-{stamp}.json", json.dumps(result, indent=1))
        atomic_write_text(out / f"gpu-decode-{slug}-{stamp}.md", md)
        log(f"wrote {out}/gpu-decode-{slug}-{stamp}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
