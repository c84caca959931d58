"""The `kvshrink` command line."""
from __future__ import annotations

import argparse
from pathlib import Path
import json
import sys
import time
import warnings
from typing import Sequence


from .defaults import best_spec


def _method_spec(args: argparse.Namespace) -> str:
    """The canonical spec of `--method` (a spec, a composition 'POLICY + CODEC', or 'best': the best measured recipe
    for the model), `--profile` (alone: whatever the profile builds; with a method: its profile option) and the
    option shortcuts, which go to the method (to the CODEC side of a composition)."""
    from .methods import with_options
    from .profile import load_profile

    shortcuts = [(k, getattr(args, k)) for k in ("bits", "group", "window", "sinks") if getattr(args, k, None) is not None]
    extra = []
    for item in args.option or []:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ValueError(f"--option {item!r} must be written key=value")
        extra.append((key.strip(), raw.strip()))
    profile = getattr(args, "profile", None)
    if args.method == "best":
        if shortcuts or extra:
            given = [f"--{k}" for k, _ in shortcuts] + (["--option"] if extra else [])
            raise ValueError(f"{', '.join(given)} need a method: give --method (e.g. --method tada)")
        method = f"{load_profile(profile).method}:profile={profile}" if profile else best_spec(args.model)
    else:
        method = args.method
        if profile:
            extra.append(("profile", profile))
    return with_options(method, shortcuts + extra)


def _prompt_ids(args, tok):
    import torch

    if args.prompt is None and args.prompt_file is None:
        from .eval.passkey import passkey_prompt

        p = passkey_prompt(tok, args.context, depth=0.5, seed=args.seed)
        return p.input_ids, f"passkey retrieval, {p.input_ids.shape[1]} tokens, pass key {p.passkey} at depth 0.5"
    text = args.prompt if args.prompt is not None else open(args.prompt_file, encoding="utf-8").read()
    if getattr(tok, "chat_template", None) and not args.raw:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(text, return_tensors="pt").input_ids
    return ids.to(torch.long), f"{ids.shape[1]} tokens"


def cmd_run(args: argparse.Namespace) -> int:
    import torch
    from transformers import DynamicCache

    import kvshrink as ks
    from .report import memory_table

    spec = _method_spec(args)
    method = ks.build_method(spec)
    name = method.label()
    print(f"loading {args.model} ...", file=sys.stderr)
    model, tok = ks.load_model(args.model, dtype=args.dtype)
    ids, what = _prompt_ids(args, tok)
    print(f"model: {args.model}   method: {spec}   prompt: {what}")

    def generate(cache):
        clock = _Clock()
        with torch.no_grad():
            out = model.generate(ids, past_key_values=cache, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, streamer=clock)
        return out[0, ids.shape[1]:], clock

    # one-time costs (thread pools, the CPU kernel's library) outside both timed runs; the warm-up's 64 tokens are
    # not the user's prompt, so what a method says about them (a budget under its window) is not shown
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for warm in (method.make_cache(model), DynamicCache(config=model.config)):
            model.generate(ids[:, :64], past_key_values=warm, max_new_tokens=2, do_sample=False,
                           pad_token_id=tok.pad_token_id)
    cache = method.make_cache(model)
    tokens, timing = generate(cache)
    print(f"\n[{name}] {tok.decode(tokens, skip_special_tokens=True).strip()}")
    if args.compare:
        ref_tokens, ref = generate(DynamicCache(config=model.config))
        n = min(len(tokens), len(ref_tokens))
        same = int((tokens[:n] == ref_tokens[:n]).sum()) if n else 0
        print(f"[DynamicCache] {tok.decode(ref_tokens, skip_special_tokens=True).strip()}")
        print(f"\ngreedy tokens identical to DynamicCache: {same}/{max(len(tokens), len(ref_tokens))}")
        print(f"prefill: {timing.prefill:.2f} s ({name}) vs {ref.prefill:.2f} s (DynamicCache), "
              f"{timing.prefill / ref.prefill:.2f}x the time")
        if timing.decode_rate and ref.decode_rate:
            print(f"decode: {timing.decode_rate:.1f} tokens/s ({name}) vs {ref.decode_rate:.1f} tokens/s "
                  f"(DynamicCache), {timing.decode_rate / ref.decode_rate:.2f}x the speed")
    else:
        rate = f", decode {timing.decode_rate:.1f} tokens/s" if timing.decode_rate else ""
        print(f"\nprefill {timing.prefill:.2f} s{rate}")
    report = cache.memory_report()
    print()
    print(json.dumps(report, indent=2) if args.json else memory_table(report, layers=args.layers))
    return 0


class _Clock:
    """A `generate` streamer that only takes the time: the prompt arrives first (generation starts), then each new
    token; the first one closes the prefill, the rest are decoding steps."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    @property
    def prefill(self) -> float:
        return self.times[1] - self.times[0] if len(self.times) > 1 else float("nan")

    @property
    def decode_rate(self) -> float | None:
        steps = len(self.times) - 2
        return steps / (self.times[-1] - self.times[1]) if steps > 0 else None


def _ints(text: str, what: str) -> list[int]:
    from .eval.bench import parse_length

    try:
        return [parse_length(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"--{what}: {e}") from None


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.results import plot_results, results_table
    from .eval.runner import evaluate
    from .methods import with_options
    from .spec import split_specs

    methods = split_specs(args.methods) + [with_options("tada", [("profile", p)]) for p in args.profile] \
        + (split_specs(args.baseline) if args.baseline else [])
    text = None
    if args.text_file:
        with open(args.text_file, encoding="utf-8") as f:
            text = f.read()
    records = evaluate(
        args.model, methods, args.tasks, _ints(args.contexts, "contexts"), _ints(args.seeds, "seeds"),
        text=text, corpus=args.text_file, output=args.output, resume=args.resume, continuation=args.continuation,
        match_tokens=args.match_tokens, share_prefill=args.share_prefill, dtype=args.dtype,
    )
    print(results_table(records))
    print(f"\nrecords: {args.output}")
    if args.plot is None:  # beside the records, not in a fixed place another run's plot would overwrite
        args.plot = str(Path(args.output).with_suffix(".png"))
    if args.plot:
        try:
            print(f"plot: {plot_results(records, args.plot, title=f'{args.model}: quality against cache bytes')}")
        except RuntimeError as e:
            print(f"plot not written: {e}", file=sys.stderr)
            return 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .eval.bench import bench, bench_table, write_bench

    result = bench(args.model, args.methods, args.contexts.split(","), decode_tokens=args.decode_tokens,
                   repeats=args.repeats, dtype=args.dtype)
    print(bench_table(result))
    if args.output:
        js, md = write_bench(result, args.output)
        print(f"\nwritten: {js} and {md}")
    return 0


def _calibrate_layered(args: argparse.Namespace) -> int:
    from .joint import KEY_CODECS, SHARES, VALUE_CODECS, calibrate_joint

    if args.target_ratio is None or args.target_bytes is not None or args.target_bits is not None:
        raise ValueError("calibrate --method layered needs --target-ratio (a share of the 16-bit cache, e.g. 0.10)")
    split = lambda text, default: tuple(x for x in text.split(";") if x) if text else default  # noqa: E731
    profile = calibrate_joint(
        args.model, target_ratio=args.target_ratio, budget_context=args.budget_context,
        context=args.context or 2048, samples=2 if args.samples is None else args.samples, probes=args.probes,
        probe_style=args.probe_style, policy=args.policy or "snapkv", scored=args.scored, key_codecs=split(args.key_codecs, KEY_CODECS),
        value_codecs=split(args.value_codecs, VALUE_CODECS),
        shares=tuple(float(x) for x in args.shares.split(",")) if args.shares else SHARES, seed=args.seed,
        sensitivity_from=args.sensitivity_from, output=args.output)
    cal = profile.calibration
    print("layer | keys | values | policy")
    for i, r in enumerate(profile.layers):
        print(f"{i:5d} | {r.key} | {r.value} | {r.policy or 'every token'}")
    print(f"KL {cal['kl']['all']:.4f} (predicted {cal['predicted_kl']:.4f}), ratio {cal['measured_ratio']:.3f} at "
          f"{cal['budget_context']} tokens (target {cal['target_ratio']:g}), {cal['seconds']:.0f} s")
    for row in cal["uniform"]:
        print(f"uniform {row['key']} | {row['value']} | share {row['share']:g}: ratio {row['ratio']:.3f}, "
              f"KL {row['kl']['all']:.4f}")
    print(f"profile: {args.output}")
    return 0


def _pairing(args: argparse.Namespace) -> int:
    from .methods.pairing import pairing_profile

    if not args.policy or not args.codec:
        raise ValueError("calibrate --method pairing needs --policy and --codec (e.g. --policy kvzip:budget=0.45 "
                         "--codec tada:profile=P)")
    from .methods import parse_spec

    config = None
    if not parse_spec(args.codec)[1].get("profile"):  # else the codec profile names the model
        from transformers import AutoConfig

        from .models import resolve_model

        config = AutoConfig.from_pretrained(resolve_model(args.model), local_files_only=True)
    profile = pairing_profile(args.policy, args.codec, config)
    profile.save(args.output)
    print(f"pairing: {profile.options['policy']} + {profile.options['codec']}"
          f"{' with ' + str(len(profile.layers)) + ' layers of codec choices' if profile.layers else ''}; profile: "
          f"{args.output} (use: make_cache(model, profile=...) or --methods pairing:profile=...)")
    return 0


def _lowrank_recipe(args: argparse.Namespace, options: dict) -> int:
    from .bases import RECIPE_METHODS, lowrank_recipe
    from .profile import load_profile

    if args.method not in RECIPE_METHODS:
        raise ValueError(f"--bases makes a low-rank recipe: --method must be one of {', '.join(RECIPE_METHODS)}, "
                         f"got {args.method!r}")
    recipe = lowrank_recipe(load_profile(args.bases), args.method, **options)
    recipe.save(args.output)
    made = recipe.calibration["recipe"]
    print(f"{args.method} recipe: {', '.join(f'{k}={v}' for k, v in sorted(options.items())) or 'defaults'}; bases "
          f"cut from rank {made['from_rank']} to {made['rank']}, float16; profile: {args.output} "
          f"(use: make_cache(model, profile=...) or --method {args.method}:profile=...)")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate

    options = {}
    if args.option:
        from .methods import parse_spec

        _, options = parse_spec(("tada" if args.bases is None else args.method) + ":" + ",".join(args.option))
    if args.bases is not None:
        return _lowrank_recipe(args, options)
    if args.method == "layered":
        return _calibrate_layered(args)
    if args.method == "pairing":
        return _pairing(args)
    if args.method == "razor":
        from .models import load_model
        from .retrieval import retrieval_profile

        model, _ = load_model(args.model)
        profile = retrieval_profile(model, length=args.context or 256, samples=args.samples or 4, seed=args.seed)
        profile.save(args.output)
        echo, induction = profile.calibration["echo"], profile.calibration["induction"]
        print("layer | echo per KV head | induction per KV head")
        for i, (e, ind) in enumerate(zip(echo, induction)):
            print(f"{i:5d} | {' '.join(f'{x:.3f}' for x in e)} | {' '.join(f'{x:.3f}' for x in ind)}")
        print(f"retrieval-head scores of {args.model}; profile: {args.output} (use: razor:profile={args.output})")
        return 0
    if args.method != "tada":
        profile = calibrate(args.model, method=args.method, target_ratio=args.target_ratio,
                            target_bytes=args.target_bytes, target_bits=args.target_bits, samples=args.samples,
                            context=args.context, output=args.output, key_space=args.key_space)
        print("layer | key energy at D/8, D/4, D/2 | value energy")
        energy = profile.calibration["energy"]
        for i in range(profile.model["layers"]):
            if f"{i}/k" in energy:
                k, v = energy[f"{i}/k"], energy[f"{i}/v"]
                print(f"{i:5d} | {' '.join(f'{x:.3f}' for x in k.values())} | {' '.join(f'{x:.3f}' for x in v.values())}")
        print(f"bases for {args.method} ({'joint' if profile.options['joint'] else 'per head'}), "
              f"{profile.calibration['seconds']:.0f} s; profile: {args.output}")
        return 0
    if args.target_ratio is None and args.target_bytes is None and args.target_bits is None:
        raise ValueError("calibrate --method tada needs one of --target-ratio, --target-bytes, --target-bits")
    profile = calibrate(
        args.model, target_ratio=args.target_ratio, target_bytes=args.target_bytes, target_bits=args.target_bits,
        budget_context=args.budget_context, search=args.search, trials=args.trials, samples=args.samples,
        context=args.context, scored=args.scored, options=options, seed=args.seed, output=args.output,
        sensitivity_from=args.sensitivity_from, rotation=args.rotation, share_prefill=args.shared_prefill,
    )
    cal = profile.calibration
    print("layer | keys bits/mean | values bits/mean   (rot = rotation codec)")
    for i, c in enumerate(profile.layers):
        k = "rot " if c.key_rotate else f"{c.key_mean:4s}"
        v = "rot" if c.value_rotate else c.value_mean
        print(f"{i:5d} | {c.key_bits:2d} {k} | {c.value_bits:2d} {v}")
    for name in ("greedy", "random"):
        if name in cal:
            print(f"{name}: KL {cal[name]['kl']:.4f} in {cal[name]['seconds']:.0f} s")
    print(f"chosen: {cal['chosen']}, KL {cal['kl']:.4f}, ratio {profile.predicted_ratio:.3f} at "
          f"{cal['budget_context']} tokens (budget {cal['budget_bytes'] / cal['fp16_bytes']:.3f}), "
          f"{cal['seconds']:.0f} s")
    print(f"profile: {args.output}")
    return 0


def _list_recipes(table: dict) -> int:
    from .options import options_of
    from .report import markdown_table

    for name in sorted(table):
        cls = table[name]
        print(f"{name}: {cls.summary}")
        backends = getattr(cls, "backends", None)
        if backends:  # codecs: the decode attention paths they have per device
            print("attention: " + "; ".join(f"{dev}: {', '.join(paths)}" for dev, paths in backends.items()))
        opts = options_of(cls)
        if opts:
            print(markdown_table(["option", "type", "default", "meaning"],
                                 [[o["name"], o["type"], o["default"], o["help"]] for o in opts]))
        print()
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import METHODS

    return _list_recipes(METHODS)


def cmd_codecs(args: argparse.Namespace) -> int:
    from .codecs import BIT_WIDTHS, CODECS

    _list_recipes(CODECS)
    print("bit widths by number format: " + "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in BIT_WIDTHS.items()))
    print("a codec is the CODEC side of 'POLICY + CODEC' (e.g. 'snapkv:budget=0.25 + grouped:bits=4,axis=token'); "
          "the storing methods kivi, tada and turboquant choose codecs per layer")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serving import prepare, serve

    if args.prepare_only:
        served = prepare(args.model, args.method, args.profile, args.dir, args.continuous_batching)
        print(served.path)
        print(f"method: {served.spec}\nserve it with transformers' own server (no `kvshrink` field in responses): "
              f"transformers serve {served.path} --trust-remote-code --device cpu", file=sys.stderr)
        return 0
    serve(args.model, args.method, args.profile, host=args.host, port=args.port, device=args.device,
          dtype=args.dtype, root=args.dir, continuous_batching=args.continuous_batching, log_level=args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .eval.runner import DEFAULT_CONTEXTS, DEFAULT_METHODS, DEFAULT_SEEDS, DEFAULT_TASKS

    parser = argparse.ArgumentParser(prog="kvshrink", description="Compress the KV cache of transformers models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("lm-eval", help="EleutherAI lm-evaluation-harness with a kvshrink cache: `kvshrink lm-eval "
                                   "--model_args pretrained=NAME,method=SPEC --tasks TASK` (lm-eval's own options; "
                                   "needs kvshrink[lmeval])")

    run = sub.add_parser("run", help="generate with a compressed cache and print its memory report")
    run.add_argument("--model", default="smollm2-135m",
                     help="embedded name (smollm2-135m, gemma3-270m, qwen2.5-coder-1.5b), path or hub id")
    run.add_argument("--method", default="best",
                     help="method spec, e.g. 'kivi:bits=2,group=32' (see `kvshrink methods`), or a token policy "
                          "composed with a codec, 'POLICY + CODEC', e.g. 'tova:budget=0.5 + turboquant' (see `kvshrink "
                          "codecs`); default 'best': the best measured recipe for the model (SmolLM2: tada with the "
                          "shipped profile calibrated at 0.27 of fp16; other models: kivi:bits=4)")
    run.add_argument("--bits", type=int, help="shortcut for the method's bits option")
    run.add_argument("--group", type=int, help="shortcut for the method's group option")
    run.add_argument("--window", type=int, help="shortcut for the method's window option")
    run.add_argument("--sinks", type=int, help="shortcut for the method's sinks option")
    run.add_argument("-O", "--option", action="append", metavar="KEY=VALUE", help="any other method option")
    run.add_argument("--profile", help="profile from `kvshrink calibrate` (a path or a shipped name): alone, it builds "
                                       "whatever the profile describes; with --method, it is that method's profile")
    run.add_argument("--prompt", help="prompt text (default: a generated passkey-retrieval prompt)")
    run.add_argument("--prompt-file", help="read the prompt from this file")
    run.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's chat template")
    run.add_argument("--context", type=int, default=2000, help="length of the default passkey prompt in tokens")
    run.add_argument("--seed", type=int, default=0, help="seed of the default passkey prompt")
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--no-compare", dest="compare", action="store_false",
                     help="skip the reference run with transformers' DynamicCache")
    run.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                     help="model dtype (auto: the model's own: bfloat16 for qwen2.5-coder-1.5b where the CPU computes "
                          "bf16 natively, float32 otherwise and for the small models)")
    run.add_argument("--layers", action="store_true", help="print one row per layer in the memory report")
    run.add_argument("--json", action="store_true", help="print the memory report as JSON")
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser("eval", help="quality against bytes: ppl, kl, match, passkey through each method's cache")
    ev.add_argument("--model", default="smollm2-135m", help="embedded name, path or hub id")
    ev.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help="comma-separated method specs; options after a spec belong to it "
                         "(default: %(default)s)")
    ev.add_argument("--profile", action="append", default=[],
                    help="also evaluate tada with this profile (repeatable)")
    ev.add_argument("--baseline", help="peers run through the same tasks, e.g. 'hf-quanto:bits=4,hf-hqq:bits=4'")
    ev.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                    help="comma-separated tasks; 'ruler' = the eleven RULER-style tasks niah_single_1..fwe "
                         "(default: %(default)s)")
    ev.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                    help="model dtype (auto: the model's own: bfloat16 for qwen2.5-coder-1.5b where the CPU computes "
                          "bf16 natively, float32 otherwise and for the small models)")
    ev.add_argument("--no-shared-prefill", dest="share_prefill", action="store_false",
                    help="run every method's own prefill instead of replaying one prefill per prompt (same results, "
                         "slower; for checking)")
    ev.add_argument("--contexts", default=",".join(map(str, DEFAULT_CONTEXTS)),
                    help="context lengths in tokens, e.g. 2k,4k (default: %(default)s)")
    ev.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="seeds (default: %(default)s)")
    ev.add_argument("--continuation", type=int, default=128, help="tokens scored by ppl and kl (default: %(default)s)")
    ev.add_argument("--match-tokens", type=int, default=64, help="greedy tokens compared by match (default: %(default)s)")
    ev.add_argument("--text-file", help="held-out text for ppl/kl/match (default: the embedded corpus's last 20%%)")
    ev.add_argument("-o", "--output", default="results/eval.jsonl", help="JSONL records (default: %(default)s)")
    ev.add_argument("--plot", default=None,
                    help="PNG plot path, '' for none (default: the output's path with .png, e.g. results/eval.png)")
    ev.add_argument("--no-resume", dest="resume", action="store_false",
                    help="measure the cells asked for again even where the output file has them (appended: "
                         "readers take a cell's last record; the file's other records stay)")
    ev.set_defaults(func=cmd_eval)

    be = sub.add_parser("bench", help="prefill time, decode speed and memory against the plain cache")
    be.add_argument("--model", default="smollm2-135m")
    be.add_argument("--methods", default="kivi:bits=4,kivi:bits=2,tada:bits=2,tada:bits=2,mean=channel",
                    help="comma-separated method specs (default: %(default)s)")
    be.add_argument("--contexts", default="1k,4k", help="context lengths (default: %(default)s)")
    be.add_argument("--decode-tokens", type=int, default=32, help="decoding steps timed (default: %(default)s)")
    be.add_argument("--repeats", type=int, default=1)
    be.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                    help="model dtype (auto: bfloat16 for Qwen where the CPU computes bf16 natively, float32 otherwise "
                         "and for the small models)")
    be.add_argument("-o", "--output", default="benchmarks/results", help="directory for JSON + markdown, '' for none")
    be.set_defaults(func=cmd_bench)

    ca = sub.add_parser("calibrate", help="choose tada's bits per layer under a memory budget, fit the bases of "
                                          "the low-rank methods (--method tale|dynakv|lowrank), or measure "
                                          "retrieval heads (--method razor)")
    ca.add_argument("--model", default="smollm2-135m")
    ca.add_argument("--method", choices=("tada", "layered", "pairing", "tale", "dynakv", "lowrank", "razor"),
                    default="tada",
                    help="tada: per-layer bits (default); layered: per-layer codecs and token shares chosen "
                         "together (needs --target-ratio); pairing: write --policy + --codec as one profile (the "
                         "codec's profile copied in); tale/lowrank: per-head bases; dynakv: joint bases; razor: "
                         "echo/induction scores per KV head on repeated random tokens (--context: their length, "
                         "default 256; --samples: default 4)")
    ca.add_argument("--key-codecs", help="layered: key codec specs tried per layer, joined by ';' (default: grouped "
                                         "2/3/4 bits per channel, rotated 2/3/4 bits, exact)")
    ca.add_argument("--value-codecs", help="layered: value codec specs joined by ';' (default: grouped 2/3/4 bits "
                                           "per token, rotated 2/3/4 bits, exact)")
    ca.add_argument("--shares", help="layered: shares of the prompt's tokens a layer may keep, e.g. 1,0.5,0.25,0.125 "
                                     "(the default)")
    ca.add_argument("--probes", type=int, default=2,
                    help="layered: retrieval probes (a planted passphrase, asked for) beside the text windows "
                         "(default: %(default)s)")
    ca.add_argument("--policy",
                    help="layered: the retention policy whose share each layer chooses: snapkv (the default), or "
                         "snapkv:heads=adaptive (AdaKV's per-head budgets inside each layer; also floor=, observe=); "
                         "pairing: the token policy's spec, e.g. kvzip:budget=0.45")
    ca.add_argument("--codec", help="pairing: the codec side's spec, e.g. tada:profile=P (P's choices are copied in)")
    ca.add_argument("--probe-style", choices=("digits", "hex", "both"), default="digits",
                    help="layered: the probes' passphrase: digits (3 groups of 3), hex (4 groups of 4 hex digits, "
                         "UUID-like) or both, alternating (default: %(default)s)")
    ca.add_argument("--bases", metavar="PROFILE",
                    help="tale/dynakv/lowrank: write a recipe instead of fitting: these bases (cut to the largest "
                         "rank the levels use, float16) with the method options given by -O, one profile that "
                         "make_cache(model, profile=...) builds")
    ca.add_argument("--key-space", choices=("post_rope", "pre_rope"), default="post_rope",
                    help="low-rank bases: fit keys after the rotary embedding (default) or with it undone")
    target = ca.add_mutually_exclusive_group()
    target.add_argument("--target-ratio", type=float, help="bytes / 16-bit bytes at --budget-context tokens, e.g. 0.27")
    target.add_argument("--target-bytes", type=int, help="cache bytes at --budget-context tokens")
    target.add_argument("--target-bits", type=int, help="the bytes of uniform tada at this many bits, no mean")
    ca.add_argument("--budget-context", type=int, default=2048, help="context length the budget is for (default: %(default)s)")
    ca.add_argument("--search", choices=("greedy", "random", "both"), default="both",
                    help="sensitivity allocation, TaDA's random search, or both (default)")
    ca.add_argument("--trials", type=int, default=16, help="random-search trials (default: %(default)s)")
    ca.add_argument("--samples", type=int, help="calibration text windows (default: 2 for tada, 3 for bases)")
    ca.add_argument("--context", type=int, help="tokens per window (default: 512 for tada, 4096 for bases)")
    ca.add_argument("--scored", type=int, default=32, help="tokens scored per window (default: %(default)s)")
    ca.add_argument("--seed", type=int, default=0)
    ca.add_argument("--rotation", action="store_true",
                    help="tada: let a layer's keys or values take a rotation codec (Hadamard + Lloyd-Max, 2-4 bits)")
    ca.add_argument("--no-shared-prefill", dest="shared_prefill", action="store_false",
                    help="tada: run each window's prefill for every allocation instead of recording it once and "
                         "building each allocation's cache from the record (same KLs, slower)")
    ca.add_argument("--sensitivity-from", metavar="PROFILE",
                    help="layered/tada: reuse the layer sensitivities measured by this earlier profile (same model and "
                         "settings); layered measures only the candidates it did not")
    ca.add_argument("-O", "--option", action="append", metavar="KEY=VALUE",
                    help="tada options kept fixed (group, window, sinks, ...; exact_dtype defaults to float16); with "
                         "--bases, the low-rank method's options (target_ratio, levels, coeff_axis, ...)")
    ca.add_argument("-o", "--output", default="profile.json", help="profile file (default: %(default)s)")
    ca.set_defaults(func=cmd_calibrate)

    methods = sub.add_parser("methods", help="list the methods with their options and defaults")
    methods.set_defaults(func=cmd_methods)
    codecs = sub.add_parser("codecs", help="list the codecs (how stored tokens are coded) with their options")
    codecs.set_defaults(func=cmd_codecs)

    sv = sub.add_parser("serve", help="an OpenAI-compatible endpoint (transformers' server) answering through a "
                                      "fresh kvshrink cache per request; see docs/serve.md")
    sv.add_argument("--model", default="smollm2-135m", help="embedded name, .gguf file or local directory")
    which = sv.add_mutually_exclusive_group()
    which.add_argument("--method", help="method spec, e.g. 'kivi:bits=4' (default: the best measured recipe for "
                                        "the model, as `kvshrink run`)")
    which.add_argument("--profile", help="a profile from `kvshrink calibrate` (path or shipped name): its method "
                                         "with its per-layer settings")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--device", default="cpu", help="device the model runs on (transformers' --device)")
    sv.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                    help="model dtype (auto: as `kvshrink run` loads the model)")
    sv.add_argument("--dir", type=Path, help="where to write the served model directory (default: "
                                             "$KVSHRINK_CACHE/serve)")
    sv.add_argument("--prepare-only", action="store_true",
                    help="write the served directory, print its path and exit (for `transformers serve DIR "
                         "--trust-remote-code`)")
    sv.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    sv.add_argument("--continuous-batching", action="store_true",
                    help="not supported: transformers' continuous batching uses its own paged cache")
    sv.set_defaults(func=cmd_serve)
    return parser


def cmd_lm_eval(argv: list[str]) -> int:
    try:
        from .lmeval import main as lmeval_main
    except ImportError as e:
        print(f"kvshrink: error: {e}", file=sys.stderr)
        return 2
    return lmeval_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # everything after it is lm-eval's own command line
        return cmd_lm_eval(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        print(f"kvshrink: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # ModelNotAvailable and other environment problems: say what, not a traceback
        from .models import ModelNotAvailable

        if isinstance(e, ModelNotAvailable):
            print(f"kvshrink: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
