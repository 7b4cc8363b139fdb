"""LoRA: low-rank adapters on the linear layers of a frozen model (Hu et al., 2021), QLoRA-style over int8/int4.

Each targeted layer ``y = W x`` becomes ``y = W x + (alpha / r) * B A dropout(x)`` with ``A`` [r, in] and
``B`` [out, r]. ``B`` starts at zero, so a freshly wrapped model computes exactly what the original did; only
``A`` and ``B`` train. The base layer may be a plain ``nn.Linear`` (any float dtype) or one of the quantized
layers of ``codellama.quantize`` (``Int8Linear``, ``Int4Linear``), which hold no parameters at all.

Adapters are kept in float32 whatever the base dtype: they are small, and bf16 master weights for the only
trainable tensors would lose most small updates to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..errors import CodeLlamaError
from ..quantize import QuantLinear

# Names inside a ``TransformerBlock`` (model.py): attention.wq/wk/wv/wo and feed_forward.w1/w2/w3.
TARGETS: dict[str, str] = {
    "wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
    "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward",
}
DEFAULT_TARGETS: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update, scaled by ``alpha / rank``."""

    def __init__(self, base: nn.Module, rank: int, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, (nn.Linear, QuantLinear)):
            raise CodeLlamaError(f"LoRA wraps nn.Linear or a quantized linear layer, not {type(base).__name__}")
        if isinstance(base, nn.Linear) and base.bias is not None:
            raise CodeLlamaError("LoRA base layers must have no bias (Code Llama layers have none)")
        _check_hyper(rank, alpha, dropout)
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, dtype=torch.float32, device=device))
        # Same bound as nn.Linear's default init, so A's outputs have the scale of a fresh layer's.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        # A quantized base switches itself to its differentiable path while gradients flow (quantize.py).
        y = self.base(x)
        h = self.dropout(x).to(self.lora_A.dtype)
        update = (h @ self.lora_A.t()) @ self.lora_B.t()
        return y + (update * self.scaling).to(y.dtype)

    def delta_weight(self) -> Tensor:
        """The float32 [out, in] update ``scaling * B @ A`` that merging adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing base + update. A float base keeps its dtype; a quantized base is
        dequantized and the result is float32 (re-quantize afterwards if wanted)."""
        with torch.no_grad():
            if isinstance(self.base, QuantLinear):
                weight, dtype = self.base.dequantize(torch.float32), torch.float32
            else:
                weight, dtype = self.base.weight.float(), self.base.weight.dtype
            weight = (weight + self.delta_weight().to(weight.device)).to(dtype)
            layer = nn.Linear(self.in_features, self.out_features, bias=False, device=weight.device, dtype=dtype)
            layer.weight.copy_(weight)
        return layer

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"


def _check_hyper(rank: int, alpha: float, dropout: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise CodeLlamaError(f"LoRA rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise CodeLlamaError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise CodeLlamaError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def check_targets(targets: Iterable[str]) -> tuple[str, ...]:
    """The target names as a tuple, refusing unknown, duplicate or empty lists."""
    if isinstance(targets, str):  # "wq" would otherwise iterate as "w", "q"
        targets = (targets,)
    names = tuple(targets)
    if not names:
        raise CodeLlamaError(f"LoRA needs at least one target module (choose from {', '.join(TARGETS)})")
    for name in names:
        if name not in TARGETS:
            raise CodeLlamaError(f"unknown LoRA target {name!r} (choose from {', '.join(TARGETS)})")
    if len(set(names)) != len(names):
        raise CodeLlamaError(f"LoRA targets repeat a name: {', '.join(names)}")
    return names


def apply_lora(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS, rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0) -> nn.Module:
    """Wrap the ``targets`` linears of every block in ``LoRALinear`` and freeze everything else; in place,
    returns ``model``. Adapters are created on the base layer's device with a fresh random A (seed first for
    reproducibility)."""
    names = check_targets(targets)
    _check_hyper(rank, alpha, dropout)
    if has_lora(model):
        raise CodeLlamaError("the model already has LoRA adapters (merge them first)")
    layers = getattr(model, "layers", None)
    if layers is None:
        raise CodeLlamaError("apply_lora needs a Transformer (a model with .layers)")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in layers:
        for name in names:
            parent = getattr(block, TARGETS[name])
            setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout))
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain ``nn.Linear`` layers back; in place, returns
    ``model``. The result has the original parameter names, so it saves as an ordinary checkpoint.

    A float base keeps its dtype. A quantized (int8/int4) base is dequantized and the merged layer holds
    float32 weights: the update is generally not representable on the quantization grid, so merging into
    the quantized tensors would lose it. Merged parameters are trainable again (``requires_grad=True``)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, child_name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors (``...lora_A`` / ``...lora_B``), detached, under their names in ``model``."""
    return {k: v.detach() for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def load_lora_state_dict(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """Put adapter tensors saved by ``lora_state_dict`` into a model wrapped with the same targets and rank;
    the base weights are left alone. Missing, extra or mis-shaped adapters are refused, not half-loaded."""
    own = lora_state_dict(model)
    if set(state) != set(own):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shown = ", ".join([f"missing {k}" for k in missing[:2]] + [f"unexpected {k}" for k in extra[:2]])
        raise CodeLlamaError(f"LoRA adapters do not match this model ({shown})")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise CodeLlamaError(f"LoRA adapter {key} has shape {tuple(value.shape)}, "
                                 f"this model's is {tuple(own[key].shape)} (another rank?)")
    model.load_state_dict(state, strict=False)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer should see: the parameters that require gradients."""
    return [p for p in model.parameters() if p.requires_grad]


def trainable_report(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts. Quantized layers hold buffers, not parameters; their logical
    ``in x out`` weights count towards the total (frozen), so the ratio means the same for any base."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    return trainable, total


def trainable_report_line(model: nn.Module) -> str:
    trainable, total = trainable_report(model)
    share = 100.0 * trainable / total if total else 0.0
    return f"trainable parameters: {trainable:,} of {total:,} ({share:.4f}%)"
