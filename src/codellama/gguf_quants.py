"""Decoding llama.cpp's block-quantized tensor types (and encoding Q8_0 for export).

Block layouts (bytes) follow ggml's ``block_*`` structs: every block starts or ends with float16 scales.
Quantized tensors are rows of fixed-size blocks; the decoders take whole tensors at once, as [blocks, bytes].
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .errors import CodeLlamaError

QK_K = 256  # super-block size of the k-quants


def _f16(blocks: Tensor, start: int) -> Tensor:
    """The float16 stored at byte ``start`` of each block, as float32 [nb, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _dequant_q8_0(b: Tensor) -> Tensor:  # d f16 | qs int8[32]
    return _f16(b, 0) * b[:, 2:].contiguous().view(torch.int8).float()


def _dequant_q4_0(b: Tensor) -> Tensor:  # d f16 | qs u8[16]: low nibbles are elements 0-15, high 16-31
    qs = b[:, 2:]
    q = torch.cat((qs & 0xF, qs >> 4), dim=1).float() - 8
    return _f16(b, 0) * q


def _k_scales_mins(s: Tensor) -> tuple[Tensor, Tensor]:
    """Unpack the 12 bytes of 6-bit scales and mins of Q4_K/Q5_K into [nb, 8] each."""
    s = s.int()
    sc = torch.cat((s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)), dim=1)
    mn = torch.cat((s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)), dim=1)
    return sc.float(), mn.float()


def _dequant_q4_k(b: Tensor) -> Tensor:  # d, dmin f16 | scales u8[12] | qs u8[128]
    nb = b.shape[0]
    sc, mn = _k_scales_mins(b[:, 4:16])
    qs = b[:, 16:].reshape(nb, 4, 1, 32)
    # Each 32-byte chunk holds two 32-element sub-blocks: low nibbles first, then high nibbles.
    q = torch.cat((qs & 0xF, qs >> 4), dim=2).reshape(nb, 8, 32).float()
    y = (_f16(b, 0) * sc).unsqueeze(-1) * q - (_f16(b, 2) * mn).unsqueeze(-1)
    return y.reshape(nb, QK_K)


def _dequant_q5_k(b: Tensor) -> Tensor:  # d, dmin f16 | scales u8[12] | qh u8[32] | qs u8[128]
    nb = b.shape[0]
    sc, mn = _k_scales_mins(b[:, 4:16])
    qh = b[:, 16:48].int().unsqueeze(1)  # bit j of qh[l] is the fifth bit of element l of sub-block j
    qs = b[:, 48:].reshape(nb, 4, 1, 32)
    low = torch.cat((qs & 0xF, qs >> 4), dim=2).reshape(nb, 8, 32).int()
    high = (qh >> torch.arange(8, dtype=torch.int32).view(1, 8, 1)) & 1
    q = (low | (high << 4)).float()
    y = (_f16(b, 0) * sc).unsqueeze(-1) * q - (_f16(b, 2) * mn).unsqueeze(-1)
    return y.reshape(nb, QK_K)


def _dequant_q6_k(b: Tensor) -> Tensor:  # ql u8[128] | qh u8[64] | scales i8[16] | d f16
    nb = b.shape[0]
    ql = b[:, :128].reshape(nb, 2, 2, 32).int()  # [half, first/second 32 bytes, l]
    qh = b[:, 128:192].reshape(nb, 2, 1, 32).int()
    # Within each 128-element half: quarter 0 = low nibbles of ql[0:32], 1 = low of ql[32:64],
    # 2 = high nibbles of ql[0:32], 3 = high of ql[32:64]; quarter i takes bits 2i..2i+1 of qh.
    low = torch.cat((ql & 0xF, ql >> 4), dim=2)  # [nb, 2, 4, 32]
    high = (qh >> (2 * torch.arange(4, dtype=torch.int32).view(1, 1, 4, 1))) & 3
    q = ((low | (high << 4)) - 32).float().reshape(nb, 16, 16)
    scales = b[:, 192:208].contiguous().view(torch.int8).float().unsqueeze(-1)  # one per 16 elements
    return (_f16(b, 208).unsqueeze(-1) * scales * q).reshape(nb, QK_K)


def _dequant_bf16(b: Tensor) -> Tensor:
    return (b.contiguous().view(torch.int16).int() << 16).view(torch.float32)


# type name -> (elements per block, bytes per block, decoder of [nb, bytes] uint8 -> [nb, elements] float32)
DEQUANTIZERS = {
    "Q8_0": (32, 34, _dequant_q8_0),
    "Q4_0": (32, 18, _dequant_q4_0),
    "Q4_K": (256, 144, _dequant_q4_k),
    "Q5_K": (256, 176, _dequant_q5_k),
    "Q6_K": (256, 210, _dequant_q6_k),
    "BF16": (1, 2, _dequant_bf16),
}
SUPPORTED_TYPES = ("F32", "F16", *DEQUANTIZERS)


def dequantize(data: np.ndarray | Tensor, type_name: str, shape: tuple[int, ...]) -> Tensor:
    """Decode raw GGUF tensor bytes of ``type_name`` into a float32 tensor of PyTorch ``shape``."""
    if type_name not in DEQUANTIZERS:
        raise CodeLlamaError(f"unsupported GGUF tensor type {type_name} (supported: {', '.join(SUPPORTED_TYPES)})")
    block, nbytes, decode = DEQUANTIZERS[type_name]
    raw = torch.from_numpy(np.array(data, copy=True)).view(torch.uint8).reshape(-1, nbytes)
    return decode(raw).reshape(shape)


# ---- quantization (export) ------------------------------------------------------------------------
def quantize_q8_0(w: Tensor) -> np.ndarray:
    """Rows of ``w`` [..., K] (K a multiple of 32) as Q8_0 blocks, uint8 [..., K/32*34], as ggml's reference does:
    d = max|x| / 127 per 32 values, q = round-half-away(x / d), d stored as float16."""
    w = w.detach().float().cpu()
    lead, k = w.shape[:-1], w.shape[-1]
    blocks = w.reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    x = blocks * inv
    q = (torch.sign(x) * torch.floor(x.abs() + 0.5)).clamp(-127, 127).to(torch.int8)  # C roundf, not banker's
    packed = torch.cat((d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)), dim=1)
    return packed.reshape(*lead, k // 32 * 34).numpy()


__all__ = ["QK_K", "DEQUANTIZERS", "SUPPORTED_TYPES", "dequantize", "quantize_q8_0"]
