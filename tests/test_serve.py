"""`kvshrink serve`: the served directory, the custom generate, the handler's checks, and the real server over HTTP.

The server tests start `kvshrink serve` on a free loopback port with the embedded SmolLM2 and the shipped 0.27
profile, and compare its answers with `kvshrink run`'s for the same prompt and method.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

import kvshrink as ks
from kvshrink.cli import main
from kvshrink.serving import ServeError, prepare, prepare_model_dir
from kvshrink.serving.generation import REQUEST_ATTR, ReportingStreamer, generate_with_cache
from kvshrink.serving.ledger import LEDGER, ReportLedger

PROFILE = "smollm2-135m-tada-0.27"


# ---- pieces, on a tiny random model -------------------------------------------------------------------------------

def test_ledger_takes_once_and_drops_the_oldest_past_capacity():
    ledger = ReportLedger(capacity=2)
    for i in range(3):
        ledger.put(f"r{i}", {"n": i})
    assert len(ledger) == 2
    assert ledger.take("r0") is None  # dropped: nobody took it and two newer ones came
    assert ledger.take("r2") == {"n": 2}
    assert ledger.take("r2") is None
    with pytest.raises(ValueError, match="capacity"):
        ReportLedger(capacity=0)


@pytest.fixture
def tiny_dir(tmp_path):
    """A local model directory holding a saved tiny Llama, with a custom generate of its own to be replaced."""
    model = tiny_llama()
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    (path / "custom_generate").mkdir()
    (path / "custom_generate" / "generate.py").write_text("raise RuntimeError('not kvshrink')\n")
    return path


def test_prepared_dir_links_the_model_and_writes_a_custom_generate(tiny_dir, tmp_path):
    served = prepare_model_dir(str(tiny_dir), "kivi:bits=4", root=tmp_path / "serve")
    assert served.path.parent == tmp_path / "serve" and served.source == tiny_dir.resolve()
    for name in ("config.json", "model.safetensors"):
        assert (served.path / name).is_symlink() and (served.path / name).resolve() == (tiny_dir / name).resolve()
    text = (served.path / "custom_generate" / "generate.py").read_text()
    assert "SPEC = 'kivi:bits=4'" in text and "not kvshrink" not in text
    assert (served.path / "custom_generate" / "requirements.txt").read_text().split() == ["kvshrink"]
    before = (served.path / "custom_generate" / "generate.py").stat().st_mtime_ns
    again = prepare_model_dir(str(tiny_dir), "kivi:bits=4", root=tmp_path / "serve")
    assert again.path == served.path and (again.path / "custom_generate/generate.py").stat().st_mtime_ns == before
    other = prepare_model_dir(str(tiny_dir), "kivi:bits=2", root=tmp_path / "serve")
    assert other.path != served.path  # one directory per method
    assert sorted(p.name for p in (tmp_path / "serve").iterdir()) == sorted([served.path.name, other.path.name])


def test_prepare_only_prints_the_directory_for_transformers_serve(tiny_dir, tmp_path, capsys):
    assert main(["serve", "--model", str(tiny_dir), "--method", "kivi:bits=4", "--prepare-only",
                 "--dir", str(tmp_path / "serve")]) == 0
    out, err = capsys.readouterr()
    path = Path(out.strip())
    assert path.parent == tmp_path / "serve" and (path / "custom_generate" / "generate.py").is_file()
    assert f"transformers serve {path} --trust-remote-code" in err


def _ids():
    return torch.tensor([[1, 5, 9, 23, 42, 17, 8, 64, 3, 11, 7, 30]])


def test_custom_generate_is_bound_on_load_and_matches_a_kvshrink_cache(tiny_dir, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    served = prepare_model_dir(str(tiny_dir), "kivi:bits=2,group=8,window=4,sinks=1", root=tmp_path / "serve")
    model = AutoModelForCausalLM.from_pretrained(served.path, trust_remote_code=True).eval()
    assert "generate" in model.__dict__  # transformers bound the directory's custom generate
    with torch.no_grad():
        ref = type(model).generate(model, _ids(), past_key_values=ks.make_cache(model, served.spec),
                                   max_new_tokens=12, min_new_tokens=12, do_sample=False)
        dyn = type(model).generate(model, _ids(), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        with caplog.at_level("INFO", logger="kvshrink.serve"):
            out = model.generate(_ids(), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(out, ref)
    assert not torch.equal(out[:, 12:], dyn[:, 12:])  # 2-bit codes change this random model's tokens: a real cache
    assert any("kivi:bits=2,group=8,window=4,sinks=1" in r.getMessage() and "23 tokens" in r.getMessage()
               for r in caplog.records)


def test_generate_with_cache_clears_cache_implementation_and_files_the_report():
    from transformers import GenerationConfig

    model = tiny_llama()
    config = GenerationConfig(max_new_tokens=6, min_new_tokens=6, do_sample=False, cache_implementation="static",
                              pad_token_id=0)
    setattr(config, REQUEST_ATTR, "req-1")
    with torch.no_grad():
        out = generate_with_cache(model, _ids(), spec="kivi:bits=4,group=8", generation_config=config)
        ref = model.generate(_ids(), past_key_values=ks.make_cache(model, "kivi:bits=4,group=8"), max_new_tokens=6,
                             min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    assert config.cache_implementation == "static" and getattr(config, REQUEST_ATTR) == "req-1"  # caller's intact
    report = LEDGER.take("req-1")
    assert report is not None and report["method"] == "kivi:bits=4,group=8" and report["tokens"] == 12 + 6 - 1
    assert set(report) == {"method", "ratio", "nbytes", "fp16_nbytes", "tokens"}


def test_a_stream_ends_after_its_report_is_filed():
    from transformers import GenerationConfig

    class Recorder:
        def __init__(self):
            self.tokens, self.report_at_end = [], "unset"

        def put(self, value):
            self.tokens.append(value)

        def end(self):
            self.report_at_end = LEDGER.take("req-stream")

    model, streamer = tiny_llama(), Recorder()
    config = GenerationConfig(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    setattr(config, REQUEST_ATTR, "req-stream")
    with torch.no_grad():
        generate_with_cache(model, _ids(), spec="kivi:bits=4,group=8", generation_config=config, streamer=streamer)
    assert len(streamer.tokens) == 1 + 5  # the prompt, then each new token
    assert streamer.report_at_end is not None and streamer.report_at_end["tokens"] == 12 + 5 - 1
    ends = []
    ReportingStreamer(Recorder(), lambda: ends.append("report")).end()
    assert ends == ["report"]


def test_chat_body_checks_name_the_bad_value():
    pytest.importorskip("fastapi")
    from fastapi import HTTPException

    from kvshrink.serving.handler import check_chat_body

    good = [{"role": "user", "content": "hi"}]
    check_chat_body({"messages": good, "max_tokens": 8192}, 8192)
    check_chat_body({"messages": good}, 8192)
    for body, words in [({"messages": []}, "non-empty"), ({}, "non-empty"), ({"messages": ["hi"]}, "messages[0]"),
                        ({"messages": good, "max_tokens": 0}, "from 1 to 8192"),
                        ({"messages": good, "max_tokens": 8193}, "got 8193"),
                        ({"messages": good, "max_completion_tokens": True}, "max_completion_tokens"),
                        ({"messages": good, "max_tokens": "5"}, "integer")]:
        with pytest.raises(HTTPException) as e:
            check_chat_body(body, 8192)
        assert e.value.status_code == 400 and words in e.value.detail


def test_what_cannot_be_served_is_an_error(tmp_path, capsys):
    assert main(["serve", "--method", "kivi:bits=4", "--continuous-batching"]) == 2
    assert "--continuous-batching is not supported" in capsys.readouterr().err
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ServeError, match=re.escape(str(bad))):
        prepare(str(bad), "kivi:bits=4", root=tmp_path)
    with pytest.raises(ServeError, match="local directory"):
        prepare("some-org/some-model-not-here", "kivi:bits=4", root=tmp_path)
    with pytest.raises(ValueError, match="unknown method 'nosuch'"):
        prepare(str(tmp_path), "nosuch", root=tmp_path)
    with pytest.raises(SystemExit):
        main(["serve", "--method", "kivi:bits=4", "--profile", PROFILE])


# ---- the real server, over HTTP -----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _post(port: int, body: bytes | dict, timeout: float = 120) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class Server:
    def __init__(self, port: int, proc: subprocess.Popen, log: Path):
        self.port, self.proc, self.log = port, proc, log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`kvshrink serve --profile <shipped 0.27>` on a free loopback port; stopped, and its port checked free, after
    the module's tests whatever they did."""
    try:
        ks.load_model  # noqa: B018
        from kvshrink.models import resolve_model

        resolve_model("smollm2-135m")
    except ks.ModelNotAvailable as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
    pytest.importorskip("uvicorn")
    tmp = tmp_path_factory.mktemp("serve")
    port, log = _free_port(), tmp / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kvshrink.cli", "serve", "--profile", PROFILE, "--host",
                                 "127.0.0.1", "--port", str(port), "--dir", str(tmp / "models")],
                                stdout=out, stderr=subprocess.STDOUT)
    srv = Server(port, proc, log)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"kvshrink serve exited with {proc.returncode}:\n{srv.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"kvshrink serve did not answer /health in 180 s:\n{srv.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        assert not _port_open(port), f"port {port} still answers after the server was stopped"


def _run_answer(capsys, prompt: str, max_new_tokens: int) -> str:
    """What `kvshrink run` answers for the prompt with the same profile (chat template, greedy)."""
    capsys.readouterr()
    assert main(["run", "--prompt", prompt, "--method", f"tada:profile={PROFILE}", "--no-compare",
                 "--max-new-tokens", str(max_new_tokens)]) == 0
    printed = capsys.readouterr().out
    found = re.search(r"^\[tada\] (.*?)\n\nprefill ", printed, re.S | re.M)
    assert found and found.group(1).strip(), printed
    return found.group(1)


LONG_PROMPT = " ".join(f"Locker {i} in the north hall holds a {colour} umbrella and code {1000 + 37 * i}."
                       for i, colour in zip(range(1, 51), ["red", "blue", "green", "grey", "white"] * 10)) \
    + " Which code does locker 42 have? Answer with the number."
SHORT_PROMPT = "Name three colours of the rainbow."


@pytest.mark.model
def test_chat_completion_equals_kvshrink_run_and_reports_the_cache(server, capsys):
    status, body = _post(server.port, {"model": "smollm2-135m", "messages": [{"role": "user", "content": LONG_PROMPT}],
                                       "max_tokens": 8, "temperature": 0})
    assert status == 200, body
    answer = body["choices"][0]["message"]["content"]
    assert answer.strip() == _run_answer(capsys, LONG_PROMPT, 8)
    report, usage = body["kvshrink"], body["usage"]
    assert report["method"].startswith("tada:profile=") and report["method"].endswith(f"{PROFILE}.json")
    assert usage["prompt_tokens"] > 1000  # long enough for the exact window to be a small share
    assert report["tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] - 1
    assert report["ratio"] <= 0.30 and report["nbytes"] == pytest.approx(report["ratio"] * report["fp16_nbytes"])
    assert f"request {body['id']}: {report['method']}, {report['tokens']} tokens" in server.log_text()


@pytest.mark.model
def test_streamed_and_plain_answers_through_the_openai_client(server, capsys):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0,
                           timeout=120)
    messages = [{"role": "user", "content": SHORT_PROMPT}]
    plain = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=8,
                                                 temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = _run_answer(capsys, SHORT_PROMPT, 8)
    assert plain.choices[0].message.content.strip() == expected
    assert streamed.strip() == expected
    last = chunks[-1]
    assert last.choices[0].finish_reason in ("stop", "length")
    assert all("kvshrink" not in (c.model_extra or {}) for c in chunks[:-1])
    report, plain_report = last.model_extra["kvshrink"], plain.model_extra["kvshrink"]
    assert report == plain_report  # same prompt, same tokens, same cache bytes
    assert report["tokens"] == last.usage.prompt_tokens + last.usage.completion_tokens - 1


BAD_REQUESTS = [
    ({"messages": [], "max_tokens": 4}, 400, "non-empty"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "from 1 to 8192"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 9}, 400, "from 1 to 8192"),
    (b'{"messages": [{"role": "user", "content": "hi"}', 422, "JSON decode error"),
    ({"messages": [{"role": "user", "content": "hi"}], "no_such_field": 1}, 422, "no_such_field"),
]


@pytest.mark.model
def test_bad_requests_get_errors_and_leave_the_server_serving(server):
    for body, status, words in BAD_REQUESTS:
        got, answer = _post(server.port, body)
        assert got == status and words in json.dumps(answer), (body, answer)
    assert server.proc.poll() is None
    ok, answer = _post(server.port, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert ok == 200 and answer["usage"]["completion_tokens"] >= 1 and "kvshrink" in answer
