"""Decode attention over the packed store on the CPU: a C++ extension (`cpu_attention.cpp`), built on first use.

`packed_attention` has the contract of `kernels.packed_attention` (the Triton kernel) and of its reference
`kernels.reference.packed_attention`: a few query tokens over a layer's packed store plus its full-precision tokens.
It never decodes the store to a tensor: each (sequence, KV head, block of tokens) unpacks its codes a tile at a
time, applies scales, zero points and means, and keeps a running softmax for all query heads of the KV head;
the blocks run in parallel (at::parallel_for) and are merged at the end (flash-decoding). Per-channel key groups
without a head mean fold the group's scales into the query (q.k = sum (q*s) code + sum q*z).

The extension is compiled once per machine, torch version and source with `torch.utils.cpp_extension` (ninja and
a C++ compiler with OpenMP, e.g. g++) into the kvshrink cache directory (`$KVSHRINK_CACHE`, default
`~/.cache/kvshrink`), and loaded from there afterwards without compiling. When it cannot be built or loaded
(no compiler, no ninja, `KVSHRINK_CPU_KERNEL=0`), kvshrink warns once and decodes with the PyTorch path.
"""
from __future__ import annotations

import hashlib
import math
import os
import platform
import shutil
import sys
import time
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from ..codecs.base import BIT_WIDTHS
from ..codecs.quant import GroupCodec
from ..codecs import quant, rotation
from ..codecs.rotation import RotationCodec, gaussian_codebook, hadamard_block
from ..codecs.store import PagedStore
from ..models import cache_dir
from . import ROW_KINDS, reference
from .reference import check_mask

CPU_BITS = BIT_WIDTHS["uniform"]
SOURCE = Path(__file__).with_name("cpu_attention.cpp")
# the source as this process imported it: what it builds and names its build after, even if the file changes later
# (a library built from newer source would not take this wrapper's arguments)
_SOURCE_BYTES = SOURCE.read_bytes()
ENV = "KVSHRINK_CPU_KERNEL"  # "0": never build or load the extension (the PyTorch path decodes)
_NAME = "kvshrink_cpu_attention"
FLAGS_ENV = "KVSHRINK_CPU_KERNEL_CFLAGS"  # compiler flags added to the build's (e.g. "-mno-avx512f": an AVX2 build)
_CFLAGS = ["-O3", "-fopenmp", "-march=native"] + os.environ.get(FLAGS_ENV, "").split()
_LDFLAGS = ["-fopenmp"]
_STALE_BUILD_S = 3600  # a build folder older than this was left by a killed build
_warned = False
_NONE = torch.empty(0)
_EXACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # exact tokens the op reads as they are
# how the kernel scores keys of per-channel groups without a head mean (kivi, tada mean=channel/none): "float"
# (the folded fp32 query) or "int8" (the folded query rounded to int8 per query row and key group, integer dot
# products: VNNI where the CPU has it, else AVX2, else plain loops, all giving the same bits); the three int8 paths
# by name, for tests and benchmarks
QDOT = {"float": 0, "int8": 1, "int8-avx2": 2, "int8-vnni": 3, "int8-plain": 4}


def unsupported(spec, head_dim: int) -> str | None:
    """Why the CPU kernel cannot serve this codec's layout, or None when it can: the `grouped` layout, and the
    `rotated` codec's (Lloyd-Max codes and their norms, fp8 with a scale, uniform groups: the query is rotated once
    per KV head, the values' weighted sum rotated back once)."""
    if isinstance(spec, RotationCodec):
        if spec.quantizer == "uniform" and spec.bits != 16 and head_dim % spec.group:
            return f"uniform groups of {spec.group} do not divide head_dim={head_dim}"
        return None
    if not isinstance(spec, GroupCodec):
        return f"the {getattr(spec, 'name', type(spec).__name__)} codec has no CPU kernel yet"
    if spec.bits not in CPU_BITS:
        return f"bits must be one of {CPU_BITS} for the CPU kernel, got {spec.bits}"
    if head_dim < 1:
        return f"head_dim must be positive, got {head_dim}"
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build_dir() -> Path:
    """Where the extension for this source, torch, Python, compiler flags and CPU is built and kept."""
    key = hashlib.sha256()
    for part in (_SOURCE_BYTES, torch.__version__.encode(), sys.version.encode(), " ".join(_CFLAGS).encode(),
                 platform.machine().encode(), _cpu_flags().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / "extensions" / f"cpu_attention-{key.hexdigest()[:16]}"


def _with_build_tools_on_path() -> None:
    """ninja from the `ninja` package and the virtual environment's bin dir (not on PATH unless activated)."""
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja

        dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    path = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([d for d in dirs if d not in path] + path)


@lru_cache(maxsize=1)
def _load():
    """The compiled op (building it first when needed); raises RuntimeError saying why it is unavailable."""
    if os.environ.get(ENV, "1") == "0":
        raise RuntimeError(f"disabled by {ENV}=0")
    directory = build_dir()
    lib = directory / f"{_NAME}.so"
    if lib.exists():
        torch.ops.load_library(str(lib))
    else:
        _build(directory, lib)  # loads it too
    rotation.set_native_ops(torch.ops.kvshrink_cpu)  # the decode step's flush of rotated codes, same bits
    quant.set_native_ops(torch.ops.kvshrink_cpu)  # and of grouped codes
    return torch.ops.kvshrink_cpu.packed_attention


@lru_cache(maxsize=1)
def qdot_paths() -> list[str]:
    """The `qdot` names this build of the kernel can run (building it first when needed)."""
    _load()
    modes = torch.ops.kvshrink_cpu.int8_modes()
    return [name for name, bit in QDOT.items() if modes >> bit & 1]


def int8_path() -> str:
    """The integer dot product `qdot="int8"` takes in this build: "vnni", "avx2" or "plain"."""
    paths = qdot_paths()
    return next(p for p in ("vnni", "avx2", "plain") if f"int8-{p}" in paths)


def _build(directory: Path, lib: Path) -> None:
    """Compile in a folder of this process's own (no lock for a killed build to leave behind), load the library,
    then move it into place atomically and remove builds of older sources."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler}) on PATH to build it (install g++)")
    _with_build_tools_on_path()
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is needed to build it: pip install ninja")
    work = directory / f"build-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"kvshrink: building the CPU attention kernel in {directory} (once)", file=sys.stderr)
    try:
        source = work / SOURCE.name
        source.write_bytes(_SOURCE_BYTES)
        cpp_extension.load(_NAME, [str(source)], extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS,
                           build_directory=str(work), is_python_module=False, verbose=False)
    except Exception as e:  # the compiler's output is in the message: keep it beside the build
        log = directory / "build-error.log"
        log.write_text(str(e))
        shutil.rmtree(work, ignore_errors=True)
        last = [line for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__]
        raise RuntimeError(f"building it failed ({last[0][:200]}; full output in {log})") from None
    tmp = directory / f".{_NAME}-{os.getpid()}.so"
    shutil.copy2(work / f"{_NAME}.so", tmp)
    os.replace(tmp, lib)
    shutil.rmtree(work, ignore_errors=True)
    for old in directory.parent.glob("cpu_attention-*"):
        if old != directory:
            shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob("build-*"):  # left by killed builds
        if stale.is_dir() and time.time() - stale.stat().st_mtime > _STALE_BUILD_S:
            shutil.rmtree(stale, ignore_errors=True)


def unavailable() -> str | None:
    """Why the CPU kernel cannot be used in this process (None when it can); builds it on first call if needed."""
    try:
        _load()
    except Exception as e:  # noqa: BLE001 - any failure to build or load means the PyTorch path
        return str(e) or type(e).__name__
    return None


def available() -> bool:
    """Whether the compiled CPU kernel can be used (building it on first call if needed)."""
    return unavailable() is None


def warn_unavailable(reason: str, stacklevel: int = 2) -> None:
    """The one warning per process that decoding falls back to the PyTorch path."""
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(f"kvshrink: the CPU attention kernel is unavailable ({reason}); decode steps decode the whole "
                  "store and run SDPA instead (the PyTorch path: same results, slower)", stacklevel=stacklevel + 1)


def _store_args(store: PagedStore, head_dim: int) -> tuple:
    """The store's declared fields page by page, its fixed channel mean and the layout's parameters, as the C++
    side takes them: (codes, scale, zero, head mean, channel mean, bits, axis, group, kind, norms, codebook)."""
    codec = store.codec
    names = {f.name for f in store.layout.fields} if store.layout is not None else set()
    pages = lambda n: store.page_list(n) if n in names else []  # noqa: E731
    cm = store.state.get("channel_mean")
    cm = _NONE if cm is None else cm.contiguous()
    if isinstance(codec, RotationCodec):
        if codec.bits == 16 or codec.quantizer == "uniform":  # the grouped layout, over the rotated vectors
            group = codec.group if codec.bits != 16 else head_dim
            return (pages("codes"), pages("scale"), pages("zero"), [], cm, codec.bits, 0, group, 0, [], _NONE)
        book = gaussian_codebook(codec.bits)[0].contiguous() if codec.quantizer == "lloydmax" else _NONE
        return (pages("codes"), [], [], [], cm, codec.bits, 0, head_dim, ROW_KINDS[codec.quantizer], pages("norms"),
                book)
    return (pages("codes"), pages("scale"), pages("zero"), pages("head_mean"), cm, codec.bits,
            1 if codec.axis == "channel" else 0, codec.group, 0, [], _NONE)


def split_tokens(tokens: int, units: int, spec_k: GroupCodec, spec_v: GroupCodec) -> int:
    """Stored tokens per parallel work unit: enough units for every thread (four each, a whole number of units per
    thread where that is possible, for balance), at least 256 tokens each, a multiple of 64 and of the per-channel
    groups. `units` is the number of (sequence, KV head) pairs, each cut into that many splits."""
    align = math.lcm(64, spec_k.tokens_per_unit, spec_v.tokens_per_unit)
    threads, units = torch.get_num_threads(), max(units, 1)
    splits = -(-4 * threads // units)
    for extra in range(threads):  # the smallest count that gives every thread the same number of splits
        if (units * (splits + extra)) % threads == 0:
            splits += extra
            break
    size = max(256, -(-tokens // splits))
    return -(-size // align) * align


def packed_attention(query: torch.Tensor, key_store: PagedStore, value_store: PagedStore,
                     exact_keys: torch.Tensor, exact_values: torch.Tensor, exact_index: torch.Tensor,
                     key0: int, mask: torch.Tensor | None = None, scaling: float | None = None,
                     causal: bool = True, block_tokens: int | None = None, qdot: str = "float") -> torch.Tensor:
    """`kernels.packed_attention` on CPU tensors (same arguments and result); see `kernels.reference` for the rules.

    block_tokens: stored tokens per parallel work unit (default: `split_tokens`). qdot: "float" or "int8" (see
    `QDOT`; "int8" changes only keys of per-channel groups without a head mean). Without the compiled extension,
    warns once and computes the reference (decode the store, dense attention; its int8 emulation for "int8").
    """
    if qdot not in QDOT:
        raise ValueError(f"qdot must be one of {', '.join(QDOT)}, got {qdot!r}")
    b, hq, qn, d = query.shape
    hkv = exact_keys.shape[1]
    if query.device.type != "cpu":
        raise ValueError(f"the CPU kernel needs CPU tensors, the query is on {query.device}")
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    key_args, key_signs = _plan(key_store, d, hkv)  # checked once per change of the store's pages
    value_args, value_signs = _plan(value_store, d, hkv)
    if key_store.tokens != value_store.tokens:
        raise ValueError(f"the key store holds {key_store.tokens} tokens but the value store {value_store.tokens}")
    t_store = key_store.tokens
    te = exact_keys.shape[2]
    tkeys = te + t_store
    mask = check_mask(mask, tkeys, b, qn)  # [b, qn, tkeys], unit stride along the keys (the reference takes it too)
    why = unavailable()
    if why is not None:
        warn_unavailable(why)
        return reference.packed_attention(query, key_store, value_store, exact_keys, exact_values, exact_index,
                                          key0, mask=mask, scaling=scaling, causal=causal,
                                          qdot="float" if qdot == "float" else "int8")
    op = _load()
    if qdot not in ("float", "int8") and qdot not in qdot_paths():
        raise ValueError(f"qdot={qdot!r} is not built into this kernel (this CPU's build runs: "
                         f"{', '.join(qdot_paths())})")
    scaling = d ** -0.5 if scaling is None else scaling
    q = query if query.dtype == torch.float32 else query.float()  # the kernel applies `scaling`
    # rotated codes are read in their rotated space: the kernel turns the query and the exact keys with the keys'
    # rotation, the exact values with the values', and the output back once per query head
    block = hadamard_block(d) if key_signs.numel() or value_signs.numel() else 0
    q = q.contiguous()
    if mask is not None:
        mask_b, mask_q = mask.stride(0), mask.stride(1)
    else:
        mask, mask_b, mask_q = _NONE, 0, 0
    split = block_tokens or _cached_split(key_store, value_store, b * hkv)
    if t_store and (key_store.fills != value_store.fills or key_store.page_tokens != value_store.page_tokens):
        raise ValueError(f"the key and value stores are paged differently ({key_store.fills} vs {value_store.fills})")
    out = torch.empty_like(q)
    # the op widens 16-bit exact tokens itself (keys and values of one dtype) and reads int32 or int64 positions
    same = exact_keys.dtype == exact_values.dtype and exact_keys.dtype in _EXACT_DTYPES
    exact = lambda t: (t if same else t.float()).contiguous()  # noqa: E731
    op(out, q, *key_args, *value_args, t_store,
       key_store.page_tokens, key_store.fills, exact(exact_keys), exact(exact_values),
       (exact_index if exact_index.dtype in (torch.int32, torch.int64) else exact_index.long()).contiguous(),
       key0, mask, mask_b, mask_q, causal, split, key_signs, value_signs, block, QDOT[qdot], float(scaling))
    return out if query.dtype == torch.float32 else out.to(query.dtype)


def append_finite(keys: torch.Tensor, values: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A decode step's tokens appended to an exact window in one call: ([keys ; key_states], [values ;
    value_states]) along the tokens in the window's dtype (rounded as `.to` rounds), or None, with nothing written,
    when a state is not finite or the op cannot take these tensors (no extension, other dtypes or devices): the
    caller then checks and joins them itself (the same result, and the error naming the first bad value)."""
    tensors = (keys, values, key_states, value_states)
    if (any(t.device.type != "cpu" or t.dtype not in _EXACT_DTYPES or t.dim() != 4 for t in tensors)
            or not (keys.is_contiguous() and values.is_contiguous()) or unavailable() is not None):
        return None
    joined = torch.ops.kvshrink_cpu.append_finite(keys, values, key_states, value_states)
    return (joined[0], joined[1]) if joined else None


def _plan(store: PagedStore, head_dim: int, heads: int) -> tuple[tuple, torch.Tensor]:
    """The store checked against the query's head_dim, its `_store_args` and rotation signs (`_signs`), kept with
    the store's page lists until its pages change (every decoding step reads every layer's stores; all of this
    changes only when tokens are stored or dropped). Raises ValueError for a store the kernel cannot read."""
    def make():
        why = unsupported(store.codec, head_dim)
        if why:
            raise ValueError(f"{store.name}: {why}")
        if store.tokens and store.head_dim != head_dim:
            raise ValueError(f"{store.name}: head_dim {store.head_dim} differs from the query's {head_dim}")
        return _store_args(store, head_dim), _signs(store, heads, head_dim)

    return _kept(store, ("cpu kernel plan", head_dim, heads), make)


def _cached_split(key_store: PagedStore, value_store: PagedStore, units: int) -> int:
    """`split_tokens` for the stores' tokens, kept with the key store's pages (and this process's thread count)."""
    key = ("cpu kernel split", units, torch.get_num_threads(), value_store.codec.tokens_per_unit)
    return _kept(key_store, key, lambda: split_tokens(key_store.tokens, units, key_store.codec, value_store.codec))


def _kept(store: PagedStore, key: tuple, make):
    """make(), kept in the store's cache under a "pages" key: forgotten whenever its pages change (a store without
    a cache computes it every time)."""
    cache = getattr(store, "cache", None)
    if cache is None:
        return make()
    key = ("pages", *key)
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _signs(store: PagedStore, heads: int, d: int) -> torch.Tensor:
    """The signs [heads, d] of a store's rotation, float32 and contiguous (empty: its codes are not rotated)."""
    codec = store.codec
    if isinstance(codec, RotationCodec) and codec.rotate:
        return codec.signs(store, heads, d).float().contiguous()
    return _NONE
