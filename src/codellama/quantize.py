"""Weight-only quantization of every linear layer: int8 per output channel, int4 in groups of 32/64/128/256.

Formats (what is stored, device-independent):
- int8: ``weight_int8`` int8 [N, K] and ``scales`` [N]; w = q * scale (symmetric, scale = max|w_row| / 127).
- int4: ``weight_int4`` uint8 [N, K/2] (element 2j in the low nibble, 2j+1 in the high one), ``scales`` and
  ``zeros`` [N, K/G] in bfloat16; w = (q - 8) * scale + zero with q in 0..15 (asymmetric min/max per group).
  This is the convention of PyTorch's int4 kernels, so the stored values feed them without re-rounding.

Matmuls use PyTorch's packed kernels where they exist (``_weight_int8pack_mm``, ``_weight_int4pack_mm`` /
``_weight_int4pack_mm_for_cpu``). They run in bfloat16 activations: on CPU their float32 paths are scalar and
several times slower than a plain float32 matmul, while the bfloat16 ones are vectorised. Each layer checks the
kernel against the dequantizing fallback once, on first use on a device, and keeps the fallback if the kernel
is missing, refuses the shape, or disagrees — so results are correct on any device, fast where possible.

Quantized checkpoints are directories like the native layout: ``params.json``, ``model.safetensors`` (the
tensors above plus the unquantized embedding and norms), ``quantization.json`` and ``tokenizer.model``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint_files import confined_file
from .config import ModelConfig
from .config_validation import shown, shown_name
from .errors import CodeLlamaError
from .quantized_files import FORMAT_VERSION, QUANT_FILE, WEIGHTS_FILE, check_stored, read_config, read_record
from .safetensors_io import read_safetensors_header

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
KERNEL_DTYPE = torch.bfloat16  # activations for the packed kernels (see the module docstring)
# The kernel and the fallback see the same weights; they differ by bfloat16 rounding of activations and
# accumulation order. A kernel further off than this relative to the output's scale is treated as broken.
_KERNEL_CHECK_RTOL = 0.05

_kernels_enabled = True


def _agrees(got: Tensor, want: Tensor) -> bool:
    """A kernel's probe output against the fallback's: finite and within ``_KERNEL_CHECK_RTOL`` of its scale."""
    scale = want.abs().max().clamp(min=1e-6)
    return bool(torch.isfinite(got).all()) and float((got - want).abs().max() / scale) <= _KERNEL_CHECK_RTOL


def _int8_decode_kernels_on() -> bool:
    # CODELLAMA_INT8_DECODE_KERNEL=0: no fbgemm copy of the weights (see Int8Linear._decode_kernel).
    return _kernels_enabled and os.environ.get("CODELLAMA_INT8_DECODE_KERNEL", "1") != "0"


def _fast_bf16_gemm(device: torch.device) -> bool:
    if device.type != "cpu":
        return device.type == "cuda"
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def set_kernels(enabled: bool) -> None:
    """Turn the packed kernels on or off globally (off: always the dequantizing fallback); for tests/benchmarks."""
    global _kernels_enabled
    _kernels_enabled = bool(enabled)


# ---- quantizers ---------------------------------------------------------------------------------------
def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: (q int8 [N, K], scales float32 [N])."""
    w = w.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-10) / 127
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return q.to(dtype) * scales.to(dtype)[:, None]


def quantize_int4(w: Tensor, group_size: int = 32) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric group-wise int4: (packed uint8 [N, K/2], scales bf16 [N, K/G], zeros bf16 [N, K/G]).

    Each group of ``group_size`` input columns maps [min, max] onto 0..15; q is rounded against the stored
    (bfloat16) scale and zero, so dequantization reproduces exactly what was optimised."""
    n, k = w.shape
    if k % group_size:
        raise CodeLlamaError(f"int4 group size {group_size} does not divide the row length {k}")
    g = w.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo).clamp(min=1e-6) / 15).to(torch.bfloat16)
    zeros = (lo + 8 * scales.float()).to(torch.bfloat16)
    s, z = scales.float().unsqueeze(-1), zeros.float().unsqueeze(-1)
    q = torch.round((g - z) / s + 8).clamp(0, 15).to(torch.uint8).reshape(n, k)
    return pack_int4(q), scales, zeros


def pack_int4(q: Tensor) -> Tensor:
    """uint8 values 0..15 [N, K] -> [N, K/2] with column 2j in the low nibble and 2j+1 in the high nibble."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: Tensor) -> Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: Tensor, scales: Tensor, zeros: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    n, groups = scales.shape
    w = unpack_int4(packed).reshape(n, groups, -1).to(dtype)
    # In place: this runs per prefill call on the whole weight, so no extra full-size temporaries.
    w.sub_(8).mul_(scales.to(dtype).unsqueeze(-1)).add_(zeros.to(dtype).unsqueeze(-1))
    return w.reshape(n, -1)


def _aligned(t: Tensor) -> Tensor:
    """``t`` contiguous at a 64-byte boundary. The CPU int8 kernel uses aligned vector loads and crashes the
    process (SIGSEGV) on tensors that merely start 8 bytes in, as safetensors' loaders can hand out."""
    t = t.contiguous()
    return t if t.data_ptr() % 64 == 0 else t.clone()


# ---- layers -------------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """Base of the quantized linears. ``weight`` is an empty buffer that only carries the layer's compute
    dtype and device, so code asking a Linear for ``.weight.dtype`` / ``.weight.device`` keeps working."""

    mode = ""
    kernel_max_rows = 16  # above this many rows (prefill), CPUs with native bf16 GEMM dequantize instead

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(0, dtype=dtype, device=device), persistent=False)
        self._kernel_state: dict[str, Any] = {}  # device -> packed kernel operands, or None for the fallback

    # Quantization parameters define the weights, so casting the model (``.to(torch.bfloat16)``) must not
    # round them: they follow the model's device but keep their own dtype. Only ``weight`` takes the cast.
    _keep_dtype: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers[name] for name in self._keep_dtype if self._buffers.get(name) is not None}
        out = super()._apply(fn, recurse)
        for name, original in kept.items():
            self._buffers[name] = original.to(self._buffers[name].device)
        self._kernel_state = {}  # moved or cast: re-pack (and re-check) on the next forward
        return out

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        raise NotImplementedError

    def _fallback(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _pack(self) -> Any:
        raise NotImplementedError

    def input_grad(self, grad: Tensor) -> Tensor:
        """d(loss)/dx for y = x W^T, given d(loss)/dy: ``grad @ W`` with W dequantized on the fly."""
        return grad @ self.dequantize(grad.dtype)

    def _kernel(self, x: Tensor, packed: Any) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            # Training through a frozen quantized layer (LoRA/QLoRA): gradients must reach the layers before this
            # one. Plain autograd through the dequantizing fallback would save each dequantized weight for the
            # backward pass (a whole bf16 copy of the model); this dequantizes again in backward instead.
            return _FrozenQuantLinear.apply(x, self)
        packed = self._kernel_for(x.device) if _kernels_enabled else None
        if packed is None:
            return self._fallback(x)
        shape = x.shape
        if x.numel() == shape[-1] and x.device.type == "cpu":  # one row: a batch-1 decode step
            decode = self._decode_kernel()
            if decode is not None:
                return decode(x.reshape(1, -1).float()).reshape(*shape[:-1], self.out_features).to(x.dtype)
        x2 = x.reshape(-1, shape[-1]).to(KERNEL_DTYPE)
        if x2.shape[0] > self.kernel_max_rows and _fast_bf16_gemm(x.device):
            # Prefill: the packed kernels are GEMV-shaped and lose to dequantizing once into a bfloat16 GEMM
            # (768x2048 weight, 128 rows, 1 thread of an EPYC: int8 kernel 4.0 ms vs dequantize + bf16 GEMM
            # 1.2 ms; int4 3.7 ms vs 2.6 ms). Below the threshold the kernels win (int4: up to ~64 rows).
            y = self._fallback(x2)
        else:
            y = self._kernel(_aligned(x2), packed)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _decode_kernel(self) -> Any:
        """A faster CPU kernel for one row of activations, or None (the default: the packed kernel serves)."""
        return None

    def _kernel_for(self, device: torch.device) -> Any:
        key = str(device)
        if key not in self._kernel_state:
            self._kernel_state[key] = self._try_kernel(device)
        return self._kernel_state[key]

    @torch.no_grad()
    def _try_kernel(self, device: torch.device) -> Any:
        """Packed operands if the kernel runs here and matches the fallback on a probe input, else None."""
        try:
            packed = self._pack()
            gen = torch.Generator().manual_seed(0)
            probe = torch.randn(2, self.in_features, generator=gen).to(device)
            got = self._kernel(probe.to(KERNEL_DTYPE), packed).float()
            want = self._fallback(probe.float()).float()
        except (RuntimeError, NotImplementedError, AttributeError, TypeError, ValueError):
            return None
        return packed if _agrees(got, want) else None

    def uses_kernel(self, device: torch.device | str | None = None) -> bool:
        device = torch.device(device) if device is not None else self.weight.device
        return _kernels_enabled and self._kernel_for(device) is not None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.mode}"


class _FrozenQuantLinear(torch.autograd.Function):
    """A quantized layer under autograd: the output from the fallback, the input's gradient from the weights
    dequantized again in backward. Nothing weight-sized is saved, so a QLoRA step holds only the quantized base."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: "QuantLinear") -> Tensor:
        ctx.layer = layer
        with torch.no_grad():
            return layer._fallback(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.layer.input_grad(grad), None


class Int8Linear(QuantLinear):
    mode = "int8"
    _keep_dtype = ("scales",)

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(in_features, out_features, dtype, device)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls.from_weight(linear.weight)

    @classmethod
    def from_weight(cls, w: Tensor, dtype: torch.dtype | None = None) -> "Int8Linear":
        """``dtype``: the activation dtype (default: ``w``'s)."""
        layer = cls(w.shape[1], w.shape[0], dtype or w.dtype, w.device)
        layer.weight_int8, scales = quantize_int8(w)
        layer.scales = scales.to(w.device)
        return layer

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_int8(self.weight_int8, self.scales, dtype or self.weight.dtype)

    def _fallback(self, x: Tensor) -> Tensor:
        # Scaling the output columns is exact algebra and avoids materialising the scaled weight.
        return F.linear(x, self.weight_int8.to(x.dtype)) * self.scales.to(x.dtype)

    def input_grad(self, grad: Tensor) -> Tensor:
        return (grad * self.scales.to(grad.dtype)) @ self.weight_int8.to(grad.dtype)

    def _pack(self) -> Any:
        op = torch.ops.aten._weight_int8pack_mm
        return op, _aligned(self.weight_int8), self.scales.to(KERNEL_DTYPE)

    def _kernel(self, x: Tensor, packed: Any) -> Tensor:
        op, w, s = packed
        return op(x, w, s)

    def _decode_kernel(self) -> Any:
        if not _int8_decode_kernels_on():
            return None  # the memory-lean choice: no second copy of the weights (see below)
        # fbgemm's dynamic int8 linear (PyTorch's x86 quantized engine): the row is quantized to int8 on the fly,
        # as llama.cpp's q8_0 path quantizes its activations, and the product runs on the CPU's integer dot
        # instructions (AVX2 / AVX-512 VNNI) instead of dequantizing weights to bf16 — 1.74x the packed bf16
        # kernel on one core of the development machine (12 layers of the 110M config: 4.3 vs 7.4 ms). Checked
        # once against the fallback like every kernel; the stored int8 weights and scales are used as they are.
        # fbgemm packs its own copy of the weights: decoding holds the int8 weights twice (for a large model on a
        # small machine, CODELLAMA_INT8_DECODE_KERNEL=0 keeps one copy and the packed bf16 kernel).
        if "cpu-decode" not in self._kernel_state:
            self._kernel_state["cpu-decode"] = self._try_decode_kernel()
        return self._kernel_state["cpu-decode"]

    def _try_decode_kernel(self) -> Any:
        return int8_row_kernel(self.weight_int8, self.scales)


@torch.no_grad()
def int8_row_kernel(weight_int8: Tensor, scales: Tensor) -> Any:
    """fbgemm's dynamic int8 linear for one row of float32 activations (``Int8Linear._decode_kernel``), over int8
    weights [N, K] with per-row ``scales``: a callable x [1, K] -> [1, N], or None where the engine is missing or
    the kernel disagrees with the dequantizing product on a probe row."""
    import warnings

    if "x86" not in torch.backends.quantized.supported_engines and \
            "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    try:
        with warnings.catch_warnings():  # quantized tensors are deprecated as a user API; the op is not
            warnings.simplefilter("ignore")
            zeros = torch.zeros(weight_int8.shape[0], dtype=torch.long)
            weight = torch._make_per_channel_quantized_tensor(weight_int8.cpu(), scales.cpu().double(), zeros, 0)
            packed = torch.ops.quantized.linear_prepack(weight, None)

        def decode(x: Tensor) -> Tensor:
            return torch.ops.quantized.linear_dynamic(x, packed, False)
        probe = torch.randn(1, weight_int8.shape[1], generator=torch.Generator().manual_seed(1))
        got, want = decode(probe), F.linear(probe, weight_int8.float()) * scales.float()
    except (RuntimeError, NotImplementedError, AttributeError, TypeError, ValueError):
        return None
    return decode if _agrees(got, want) else None


def fused_int8_row_kernel(layers: list[nn.Module]) -> Any:
    """One ``int8_row_kernel`` for several int8 layers reading the same input (q|k|v, w1|w3): one product per
    decode step instead of three or two. fbgemm packs its own copy, so the concatenation is freed at once and the
    layers' own row kernels are never built; None unless every layer is an ``Int8Linear`` the kernel applies to."""
    if not _int8_decode_kernels_on():
        return None
    if not all(type(m) is Int8Linear and m.weight_int8.device.type == "cpu" for m in layers) or \
            len({m.in_features for m in layers}) != 1:
        return None
    return int8_row_kernel(torch.cat([m.weight_int8 for m in layers]), torch.cat([m.scales for m in layers]))


class Int4Linear(QuantLinear):
    mode = "int4"
    kernel_max_rows = 64
    _keep_dtype = ("scales", "zeros")

    def __init__(self, in_features: int, out_features: int, group_size: int = 32,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__(in_features, out_features, dtype, device)
        if group_size not in GROUP_SIZES:
            raise CodeLlamaError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")
        if in_features % group_size:
            raise CodeLlamaError(f"int4 group size {group_size} does not divide the row length {in_features}")
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("weight_int4", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                        device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.bfloat16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.bfloat16, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> "Int4Linear":
        return cls.from_weight(linear.weight, group_size)

    @classmethod
    def from_weight(cls, w: Tensor, group_size: int = 32, dtype: torch.dtype | None = None) -> "Int4Linear":
        layer = cls(w.shape[1], w.shape[0], group_size, dtype or w.dtype, w.device)
        layer.weight_int4, layer.scales, layer.zeros = quantize_int4(w, group_size)
        return layer

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_int4(self.weight_int4, self.scales, self.zeros, dtype or self.weight.dtype)

    def _fallback(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize(x.dtype))

    def _pack(self) -> Any:
        q = unpack_int4(self.weight_int4)
        # [K/G, N, 2] scale/zero pairs, the layout both int4 kernels take.
        sz = torch.stack((self.scales, self.zeros), dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
        if q.device.type == "cpu":
            w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            return torch.ops.aten._weight_int4pack_mm_for_cpu, w, sz
        # CUDA tinygemm takes uint8 pairs with the even column in the high nibble; the probe in
        # ``_try_kernel`` verifies this against the fallback before it is ever used.
        pairs = ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8)
        w = torch.ops.aten._convert_weight_to_int4pack(pairs, 8)
        return torch.ops.aten._weight_int4pack_mm, w, sz

    def _kernel(self, x: Tensor, packed: Any) -> Tensor:
        op, w, sz = packed
        return op(x, w, self.group_size, sz)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


# ---- whole models -------------------------------------------------------------------------------------
def quantize_model(model: nn.Module, mode: str, group_size: int = 32, output: str | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` in place by its quantized version; returns the model.

    ``output`` overrides the mode of the output projection (``model.output``): ``"int8"``, or ``"none"`` to
    keep it in full precision, as llama.cpp's mixed formats keep it at higher precision than the rest.
    int4 layers whose row length the group size does not divide are stored as int8 instead (reported by
    ``quantization_summary``)."""
    _check_mode(mode, group_size)
    if output not in (None, "int8", "int4", "none"):
        raise CodeLlamaError(f"unknown output-layer quantization {output!r} (use int8, int4 or none)")
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            if child.bias is not None:
                raise CodeLlamaError(f"{parent_name}.{child_name} has a bias; Code Llama layers have none")
            layer_mode = output if (output and parent_name == "" and child_name == "output") else mode
            if layer_mode == "none":
                continue
            setattr(parent, child_name, quantize_weight(child.weight, layer_mode, group_size))
    return model


def quantize_weight(w: Tensor, mode: str, group_size: int = 32, dtype: torch.dtype | None = None) -> QuantLinear:
    """A quantized linear layer computing ``x @ w.T`` (``w`` [out, in]) in activation ``dtype``; int4 falls
    back to int8 where ``group_size`` does not divide the row length."""
    _check_mode(mode, group_size)
    if mode == "int4" and w.shape[1] % group_size == 0:
        return Int4Linear.from_weight(w, group_size, dtype)
    return Int8Linear.from_weight(w, dtype)


def _check_mode(mode: str, group_size: int | None) -> None:
    if mode not in MODES:
        raise CodeLlamaError(f"unknown quantization {mode!r} (use {', '.join(MODES)})")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise CodeLlamaError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")


def quantization_summary(model: nn.Module) -> dict[str, Any]:
    """Which layers are quantized how, and the bytes the weights take (quantized + full-precision tensors)."""
    layers: dict[str, str] = {}
    nbytes = 0
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            layers[name] = module.mode + (f"/g{module.group_size}" if isinstance(module, Int4Linear) else "")
    for t in model.state_dict().values():
        nbytes += t.numel() * t.element_size()
    return {"layers": layers, "weight_bytes": nbytes}


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


# ---- checkpoints --------------------------------------------------------------------------------------
def is_quantized_checkpoint(path: str | Path) -> bool:
    return (Path(path).expanduser() / QUANT_FILE).is_file()


def save_quantized(model: nn.Module, out_dir: str | Path, *, tokenizer: str | Path | None = None,
                   mode: str | None = None, group_size: int | None = None) -> Path:
    """Write a quantized ``model`` as params.json + model.safetensors + quantization.json (+ tokenizer.model)."""
    from safetensors.torch import save_file

    if not is_quantized(model):
        raise CodeLlamaError("the model is not quantized; call quantize_model first")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CodeLlamaError(f"output path {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    config: ModelConfig = model.config
    dtype = model.tok_embeddings.weight.dtype
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    (out / "params.json").write_text(json.dumps(config.to_params() | {"max_seq_len": config.max_seq_len},
                                                indent=2) + "\n")
    summary = quantization_summary(model)
    info = {"format_version": FORMAT_VERSION, "mode": mode or _dominant_mode(summary["layers"]),
            "group_size": group_size, "dtype": str(dtype).removeprefix("torch."), "layers": summary["layers"]}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt", "codellama_quantization": info["mode"]})
    (out / QUANT_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if tokenizer is not None:
        tok = Path(tokenizer)
        if not tok.is_file():
            raise CodeLlamaError(f"tokenizer not found: {tok}")
        if tok.resolve() != (out / "tokenizer.model").resolve():
            shutil.copyfile(tok, out / "tokenizer.model")
    return out


def _dominant_mode(layers: dict[str, str]) -> str:
    modes = [v.split("/")[0] for v in layers.values()]
    return max(set(modes), key=modes.count) if modes else "int8"


def _quantized_skeleton(root: Path, config: ModelConfig, layers: dict[str, str], dtype: torch.dtype) -> nn.Module:
    """The model of ``config`` on the meta device with the recorded layers swapped for quantized ones."""
    from .model import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    for name, kind in layers.items():
        parent_name, _, child_name = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            parent = None
        old = getattr(parent, child_name, None) if parent is not None else None
        if not isinstance(old, nn.Linear):
            raise CodeLlamaError(f"{root}: quantized layer {shown_name(name)} does not exist in this model")
        group = kind.removeprefix("int4/g")
        if kind == "int8":
            new: QuantLinear = Int8Linear(old.in_features, old.out_features, dtype, "meta")
        elif kind.startswith("int4/g") and group.isdigit() and int(group) in GROUP_SIZES \
                and old.in_features % int(group) == 0:
            new = Int4Linear(old.in_features, old.out_features, int(group), dtype, "meta")
        else:
            raise CodeLlamaError(f"{root}: unknown quantization {shown(kind)} for layer {shown_name(name)}")
        setattr(parent, child_name, new)
    return model


def load_quantized(path: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                   max_seq_len: int | None = None) -> nn.Module:
    """A quantized checkpoint written by ``save_quantized``; ``dtype`` is the activation dtype."""
    from dataclasses import replace

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(path).expanduser()
    info = read_record(root)
    config = read_config(root)
    if max_seq_len is not None:
        config = replace(config, max_seq_len=max_seq_len)
    weights = confined_file(root, WEIGHTS_FILE, "weights file")
    stored = read_safetensors_header(weights)
    device = torch.device("cpu") if device is None else torch.device(device)
    dtype = dtype or getattr(torch, info.get("dtype", "float32"))
    model = _quantized_skeleton(root, config, info["layers"], dtype)
    expected = model.state_dict()
    check_stored(root, stored, expected)
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError) as e:
        raise CodeLlamaError(f"cannot read {weights}: {e}") from None
    for name, t in state.items():
        if expected[name].is_floating_point() and not name.endswith(("scales", "zeros")):
            state[name] = t.to(dtype)
        else:
            state[name] = _aligned(t)
    model.load_state_dict(state, strict=True, assign=True)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.weight = torch.empty(0, dtype=dtype)
    return model.to(device).eval()


def describe_quantized(path: str | Path) -> dict[str, Any]:
    """``describe_checkpoint``'s record for a quantized directory: its JSON files and the weights' header,
    checked against each other like a load would (no tensor data is read)."""
    root = Path(path).expanduser()
    info = read_record(root)
    config = read_config(root)
    stored = read_safetensors_header(confined_file(root, WEIGHTS_FILE, "weights file"))
    dtype = getattr(torch, info.get("dtype", "float32"))
    check_stored(root, stored, _quantized_skeleton(root, config, info["layers"], dtype).state_dict())
    mode = info.get("mode", "?") + (f"/g{info['group_size']}" if info.get("group_size") else "")
    files = [p.name for p in (root / "params.json", root / WEIGHTS_FILE, root / QUANT_FILE, root / "tokenizer.model")
             if p.is_file()]
    return {"config": config, "format": f"quantized {mode}", "dtype": info.get("dtype"), "files": files,
            "shards": None}


__all__ = [
    "MODES", "GROUP_SIZES", "quantize_int8", "dequantize_int8", "quantize_int4", "dequantize_int4",
    "pack_int4", "unpack_int4", "Int8Linear", "Int4Linear", "QuantLinear", "quantize_model",
    "quantization_summary", "is_quantized", "is_quantized_checkpoint", "save_quantized", "load_quantized",
    "set_kernels",
]

