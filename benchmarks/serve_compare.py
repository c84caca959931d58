"""`kvshrink serve` against `transformers serve` with its default cache: bytes and seconds per request, same prompts.

Starts both servers on free loopback ports (transformers' own CLI on the converted model directory, and `kvshrink
serve` on the same weights), sends each the same pass-key prompts of about `--context` tokens in turn (alternating,
so load from other processes falls on both alike), and records per request: wall seconds seen by the client, the
server process's CPU seconds (less sensitive to other load), the tokens, the KV-cache bytes (kvshrink's from its
`kvshrink` response field; transformers' `DynamicCache` computed from the model config, since it stores every
token's keys and values in the model dtype), and the server process's resident and peak memory. Writes one JSON
record.

    python benchmarks/serve_compare.py --context 4096 --requests 3 --max-tokens 16 \
        -o benchmarks/results/serve-compare-smollm2.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

QUESTION = "What is the pass key? Answer with the number only."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict, timeout: float = 900) -> tuple[dict, float]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout) as r:
        answer = json.loads(r.read())
    return answer, time.perf_counter() - start


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads, so far (less sensitive to other load than wall
    time)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_healthy(port: int, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"server on port {port} did not answer /health in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def passkey_text(tok, context: int, seed: int) -> tuple[str, str]:
    """(message, pass key): filler prose from kvshrink's evaluation corpus with a pass key at half depth, about
    `context` tokens once the chat template is applied."""
    from kvshrink.eval import corpus

    evaluation_text = getattr(corpus, "evaluation_text", None) or corpus.pydoc_text  # renamed in the core refactor
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = f"\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
    text = evaluation_text()
    filler = tok(text[rng.randint(0, len(text) // 2):][:context * 8], add_special_tokens=False).input_ids
    overhead = len(tok.apply_chat_template([{"role": "user", "content": needle + QUESTION}],
                                           add_generation_prompt=True, return_dict=True)["input_ids"])
    filler = filler[:context - overhead]
    half = len(filler) // 2
    return f"{tok.decode(filler[:half])}{needle}{tok.decode(filler[half:])}\n\n{QUESTION}", key


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--profile", default="smollm2-135m-tada-0.27")
    ap.add_argument("--context", type=int, default=4096, help="prompt length in tokens, chat template included")
    ap.add_argument("--requests", type=int, default=3, help="prompts (seeds) sent to each server")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("-o", "--output", default="benchmarks/results/serve-compare-smollm2.json")
    args = ap.parse_args(argv)

    import torch
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    import kvshrink
    from kvshrink.io import atomic_write_text
    from kvshrink.models import default_dtype, head_dim_of, resolve_model, text_config

    source = resolve_model(args.model)
    dtype = default_dtype(args.model)
    cfg = text_config(AutoConfig.from_pretrained(source))
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    dynamic_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim_of(cfg) * dtype_bytes
    tok = AutoTokenizer.from_pretrained(source)
    prompts = [passkey_text(tok, args.context, seed) for seed in range(args.requests)]
    dtype_name = str(dtype).removeprefix("torch.")

    tmp = Path(tempfile.mkdtemp(prefix="serve-compare-"))
    transformers_cli = Path(sys.executable).with_name("transformers")
    servers = {
        "transformers serve (DynamicCache)": [str(transformers_cli), "serve", str(source), "--device", "cpu",
                                              "--dtype", dtype_name, "--host", "127.0.0.1"],
        f"kvshrink serve --profile {args.profile}": [sys.executable, "-m", "kvshrink.cli", "serve", "--model",
                                                     args.model, "--profile", args.profile, "--dtype", dtype_name,
                                                     "--host", "127.0.0.1", "--dir", str(tmp / "served")],
    }
    procs: dict[str, tuple[subprocess.Popen, int, Path]] = {}
    rows = []
    try:
        for name, command in servers.items():
            port, log = free_port(), tmp / f"{len(procs)}.log"
            with open(log, "wb") as out:
                procs[name] = (subprocess.Popen(command + ["--port", str(port)], stdout=out,
                                                stderr=subprocess.STDOUT), port, log)
        for name, (proc, port, log) in procs.items():
            wait_healthy(port, proc, log)
            post(port, {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, "temperature": 0})
            print(f"{name}: ready on port {port}", file=sys.stderr)
        for seed, (text, key) in enumerate(prompts):
            order = list(procs.items()) if seed % 2 == 0 else list(reversed(procs.items()))
            for name, (proc, port, _) in order:
                cpu_before = cpu_seconds(proc.pid)
                answer, seconds = post(port, {"messages": [{"role": "user", "content": text}],
                                              "max_tokens": args.max_tokens, "temperature": 0})
                cpu = cpu_seconds(proc.pid) - cpu_before
                usage, report = answer["usage"], answer.get("kvshrink")
                tokens = usage["prompt_tokens"] + usage["completion_tokens"] - 1  # the last token is never cached
                row = {"server": name, "seed": seed, "prompt_tokens": usage["prompt_tokens"],
                       "completion_tokens": usage["completion_tokens"], "seconds": round(seconds, 2),
                       "cpu_seconds": round(cpu, 2),
                       "cache_tokens": tokens, "answer": answer["choices"][0]["message"]["content"],
                       "passkey": key, "passkey_found": key in answer["choices"][0]["message"]["content"],
                       **{k.lower(): v for k, v in memory_kib(proc.pid).items()}}
                if report is not None:
                    row.update(cache_nbytes=report["nbytes"], cache_bytes_source="kvshrink field (measured)",
                               fp16_nbytes=report["fp16_nbytes"], ratio_fp16=report["ratio"])
                else:
                    row.update(cache_nbytes=tokens * dynamic_per_token,
                               cache_bytes_source=f"DynamicCache, {dtype_name}: tokens x {dynamic_per_token} bytes")
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "answer"}), file=sys.stderr)
    finally:
        for proc, _, _ in procs.values():
            proc.terminate()
        for proc, _, _ in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    summary = {}
    for name in servers:
        mine = [r for r in rows if r["server"] == name]
        summary[name] = {"seconds_mean": round(statistics.mean(r["seconds"] for r in mine), 2),
                         "cpu_seconds_mean": round(statistics.mean(r["cpu_seconds"] for r in mine), 2),
                         "cache_nbytes_mean": round(statistics.mean(r["cache_nbytes"] for r in mine)),
                         "peak_rss_mib": round(max(r["vmhwm"] for r in mine) / 1024, 1),
                         "passkeys_found": sum(r["passkey_found"] for r in mine), "requests": len(mine)}
    record = {"benchmark": "serve_compare", "model": args.model, "dtype": dtype_name, "context": args.context,
              "max_tokens": args.max_tokens, "requests": args.requests, "profile": args.profile,
              "kvshrink": kvshrink.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "summary": summary, "rows": rows}
    atomic_write_text(args.output, json.dumps(record, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"written: {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
