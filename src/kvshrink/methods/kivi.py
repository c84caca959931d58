"""`kivi`: KIVI (Liu et al. 2024) - keys quantized per channel, values per token, a full-precision recent window."""
from __future__ import annotations

from dataclasses import dataclass

import warnings

import torch

from .. import attention, kernels
from ..codecs.quant import GroupCodec
from ..kernels import cpu, reference
from ..layers.composed import ComposedLayer
from ..models import head_dim_of, text_config
from .base import StoringMethod, option, register


_EXACT_DTYPES = {"model": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
_KERNELS = ("auto", "triton", "torch", "cpu")
_QDOT = ("float", "int8")


@register
@dataclass
class Kivi(StoringMethod):
    name = "kivi"
    summary = "asymmetric group quantization, keys per channel and values per token, recent window exact"

    bits: int = option(2, "code width for keys and values: 2, 3, 4, 8 (16 = fp16, no quantization)")
    key_bits: int = option(0, "code width for keys alone (0 = use `bits`)")
    value_bits: int = option(0, "code width for values alone (0 = use `bits`)")
    group: int = option(32, "elements sharing one fp16 scale and zero point (tokens for per-channel groups)")
    key_group: int = option(0, "group size for keys alone (0 = use `group`)")
    value_group: int = option(0, "group size for values alone (0 = use `group`)")
    window: int = option(32, "recent tokens kept in full precision (flushed in blocks of `group`)")
    sinks: int = option(4, "first tokens kept in full precision (attention sinks)")
    exact_dtype: str = option("model", "dtype of the exact window and sinks: 'model' (the model's own), "
                                       "'float16' or 'bfloat16' (what a 16-bit cache holds; halves them on fp32 models)")
    key_axis: str = option("channel", "key groups run along 'channel' (tokens of one channel) or 'token'")
    value_axis: str = option("token", "value groups run along 'token' (channels of one token) or 'channel'")
    kernel: str = option("auto", "decode attention and quantization: 'triton' (GPU kernels reading the packed "
                                 "codes), 'cpu' (a C++ kernel reading the packed codes on the CPU), 'torch' "
                                 "(decode the store, then SDPA) or 'auto' (triton on CUDA when installed, the CPU "
                                 "kernel for a model on the CPU, else torch)")
    qdot: str = option("float", "how the CPU kernel scores keys of per-channel groups without a head mean: 'float' "
                                "or 'int8' (the query rounded to int8 per head and key group, integer dot "
                                "products: VNNI or AVX2; faster, scores differ by the query's rounding)")

    def center(self) -> str:
        return "none"

    def specs(self, layer_idx: int | None = None) -> tuple[GroupCodec, GroupCodec]:
        """(key codec, value codec) of a layer (the same for every layer here; profiles vary them)."""
        try:
            return (GroupCodec(self.key_bits or self.bits, self.key_group or self.group, self.key_axis, self.center()),
                    GroupCodec(self.value_bits or self.bits, self.value_group or self.group, self.value_axis,
                               self.center()))
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None

    def layer_codecs(self, layer_idx: int):
        return self.specs(layer_idx)

    def exact_torch_dtype(self):
        return _EXACT_DTYPES[self.exact_dtype]

    def validate(self) -> None:
        self.specs()
        if self.exact_dtype not in _EXACT_DTYPES:
            raise ValueError(f"{self.name}: exact_dtype must be one of {', '.join(_EXACT_DTYPES)}, got {self.exact_dtype!r}")
        if self.kernel not in _KERNELS:
            raise ValueError(f"{self.name}: kernel must be one of {', '.join(_KERNELS)}, got {self.kernel!r}")
        if self.qdot not in _QDOT:
            raise ValueError(f"{self.name}: qdot must be one of {', '.join(_QDOT)}, got {self.qdot!r}")
        if self.qdot != "float" and self.kernel in ("torch", "triton"):
            raise ValueError(f"{self.name}: qdot={self.qdot!r} is an option of the CPU kernel, but kernel="
                             f"{self.kernel!r}: use kernel='cpu' or 'auto' (a model on the CPU), or qdot='float'")
        for arg in ("window", "sinks"):
            if getattr(self, arg) < 0:
                raise ValueError(f"{self.name}: {arg} must be >= 0, got {getattr(self, arg)}")

    def layer(self, layer_idx, sliding_window):
        key_codec, value_codec = self.specs(layer_idx)
        return ComposedLayer(key_codec, value_codec, window=self.window, sinks=self.sinks,
                             exact_dtype=_EXACT_DTYPES[self.exact_dtype], backend=self._layer_backend(layer_idx),
                             qdot=self.qdot if self._layer_backend(layer_idx) == "cpu" else "float",
                             layer_idx=layer_idx, sliding_window=sliding_window, shard=getattr(self, "_shard", None))

    def prepare(self, model_or_config):
        self._use_kernels = self._resolve_kernel(model_or_config)
        if self._use_kernels:
            attention.enable(model_or_config)
        if self.qdot != "float":
            self._check_qdot(model_or_config)

    def _check_qdot(self, model_or_config) -> None:
        """qdot='int8' where it cannot act: an error for a GPU model or a config (a setting that never applies), a
        warning where the CPU kernel is unavailable or no layer's keys are per-channel groups without a head mean."""
        if self._use_kernels is True:
            raise ValueError(f"{self.name}: qdot={self.qdot!r} is an option of the CPU kernel; this model decodes "
                             "with the Triton kernels: use qdot='float'")
        if self._use_kernels is False:
            if not hasattr(model_or_config, "set_attn_implementation"):
                raise ValueError(f"{self.name}: qdot={self.qdot!r} needs the CPU kernel, which a config cannot "
                                 "switch on (give make_cache the model)")
            warnings.warn(f"{self.name}: qdot={self.qdot!r} has no effect: the layers decode with the PyTorch path",
                          stacklevel=3)
            return
        layers = range(text_config(model_or_config).num_hidden_layers)
        if not any(reference.int8_keys(self.specs(i)[0]) for i in layers if self._layer_backend(i) == "cpu"):
            warnings.warn(f"{self.name}: qdot={self.qdot!r} changes no layer: it applies to keys of per-channel "
                          "groups without a head mean (key_axis='channel', mean 'none' or 'channel'), and no layer "
                          "here has them", stacklevel=3)

    def _layer_backend(self, layer_idx: int) -> str:
        """The decode backend of one layer: "torch" (decode, then SDPA), "triton" or "cpu"."""
        mode = getattr(self, "_use_kernels", False)
        if mode == "cpu" and layer_idx in getattr(self, "_cpu_fallback_layers", ()):
            return "torch"
        return {False: "torch", True: "triton", "cpu": "cpu"}[mode]

    def _resolve_kernel(self, model_or_config) -> bool | str:
        """Which decode path the layers take: True (Triton), "cpu" (the C++ kernel) or False (PyTorch). 'triton'
        insists (clear error when it cannot); 'auto' uses Triton for a model on CUDA with Triton installed (and says
        why not when it cannot), the CPU kernel for a model on the CPU (see `_resolve_cpu`), and the PyTorch path for
        a config (a config cannot switch a model's attention)."""
        if self.kernel == "torch":
            return False
        if self.kernel == "cpu":
            return self._resolve_cpu(model_or_config)
        is_model = hasattr(model_or_config, "set_attn_implementation")
        param = next(model_or_config.parameters(), None) if is_model else None
        device = param.device if param is not None else torch.device("cpu")
        if self.kernel == "auto" and is_model and device.type == "cpu":
            return self._resolve_cpu(model_or_config)  # the C++ kernel; one warning if it cannot be built
        text = text_config(model_or_config)
        if not is_model:
            why = "make_cache was given a config, not the model (the model's attention must be switched to kvshrink's)"
        else:
            why = kernels.unusable(device, [(f"layer {i} {what}", spec) for i in range(text.num_hidden_layers)
                                            for what, spec in zip(("keys", "values"), self.specs(i))],
                                   head_dim_of(text), insisted=self.kernel == "triton")
        if why is None:
            return True
        if self.kernel == "triton":
            raise ValueError(f"{self.name}: kernel='triton' cannot be used: {why}")
        if device.type == "cuda":
            warnings.warn(f"{self.name}: decoding with the PyTorch path (kernel='auto'): {why}", stacklevel=3)
        return False

    def _resolve_cpu(self, model_or_config) -> bool | str:
        """kernel='cpu': "cpu" when the CPU kernel can serve at least one layer, else False. A model elsewhere than
        the CPU, or a config instead of the model, is an error; a kernel that cannot be built or loaded falls back
        to the PyTorch path with one warning per process; layers whose layout it does not cover (rotation codecs)
        use the PyTorch path, named in a warning."""
        if not hasattr(model_or_config, "set_attn_implementation"):
            raise ValueError(f"{self.name}: kernel='cpu' cannot be used: make_cache was given a config, not the model "
                             "(the model's attention must be switched to kvshrink's)")
        param = next(model_or_config.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        if device.type != "cpu":
            raise ValueError(f"{self.name}: kernel='cpu' needs a model on the CPU, this one is on {device} "
                             "(use kernel='triton' or 'auto' on CUDA)")
        why = cpu.unavailable()
        if why is not None:
            cpu.warn_unavailable(why, stacklevel=4)
            return False
        text = text_config(model_or_config)
        head_dim = head_dim_of(text)
        skipped = {}
        for i in range(text.num_hidden_layers):
            for what, spec in zip(("keys", "values"), self.specs(i)):
                reason = cpu.unsupported(spec, head_dim)
                if reason and i not in skipped:
                    skipped[i] = f"{what}: {reason}"
        self._cpu_fallback_layers = set(skipped)
        if skipped:
            first = next(iter(skipped.items()))
            warnings.warn(f"{self.name}: kernel={self.kernel!r} decodes layer(s) {sorted(skipped)} with the PyTorch path "
                          f"(layer {first[0]} {first[1]})", stacklevel=4)
        return "cpu" if len(skipped) < text.num_hidden_layers else False
