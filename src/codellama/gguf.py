"""GGUF, llama.cpp's file format: read LLaMA-architecture files into our ``Transformer`` and ``Tokenizer``, and
write f32 / f16 / q8_0 files that llama.cpp loads.

Layout facts this module relies on (llama.cpp's own converter for LLaMA writes files this way):
- Tensor names: ``token_embd``, ``blk.N.attn_q|attn_k|attn_v|attn_output``, ``blk.N.ffn_gate|ffn_down|ffn_up``,
  ``blk.N.attn_norm|ffn_norm``, ``output_norm``, ``output`` (all ``.weight``).
- q/k rows are in Meta's interleaved rotary order: the converter undoes Hugging Face's rotate-half permutation, and
  llama.cpp applies "normal" (adjacent-pair) RoPE to LLaMA. Our model uses that order too, so q/k map unchanged.
- GGUF lists dimensions fastest-first (``ne[0]`` is the row length); the ``gguf`` package's reader and writer
  reverse them, so a numpy array there has the PyTorch shape ``[out_features, in_features]``.
- Quantized tensors are rows of fixed-size blocks; the dequantizers below decode whole tensors at once.

The ``gguf`` package (the reader/writer shipped with llama.cpp) is an optional dependency: ``pip install gguf``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import ModelConfig
from .errors import CodeLlamaError
from .tokenizer import Tokenizer

ARCHITECTURE = "llama"

# ---- names ----------------------------------------------------------------------------------------
_GLOBAL_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}
_LAYER_NAMES = {
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_GLOBAL_BACK = {v: k for k, v in _GLOBAL_NAMES.items()}
_LAYER_BACK = {v: k for k, v in _LAYER_NAMES.items()}
_LAYER_RE = re.compile(r"^(?:layers|blk)\.(\d+)\.(.+)$")


def to_gguf_name(name: str) -> str:
    """Our (Meta) parameter name -> llama.cpp tensor name."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise CodeLlamaError(f"parameter {name!r} has no GGUF name")


def from_gguf_name(name: str) -> str | None:
    """llama.cpp tensor name -> ours; None for tensors LLaMA files may carry that we recompute (rope tables)."""
    if name in _GLOBAL_BACK:
        return _GLOBAL_BACK[name]
    if name == "rope_freqs.weight" or name.endswith(".attn_rot_embd.weight"):
        return None
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_BACK:
        return f"layers.{m.group(1)}.{_LAYER_BACK[m.group(2)]}"
    raise CodeLlamaError(f"GGUF tensor {name!r} is not part of a LLaMA model")


# ---- dequantization -------------------------------------------------------------------------------
# Block layouts (bytes) from ggml's block_* structs: every block starts or ends with float16 scales.
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


# ---- reading --------------------------------------------------------------------------------------
def _require_gguf():
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise CodeLlamaError("GGUF support needs the 'gguf' package: pip install gguf "
                             "(or pip install 'codellama[gguf]')") from None
    return gguf


@dataclass
class GGUFFile:
    """An opened GGUF file: metadata as plain Python values, tensors by llama.cpp name."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, Any]  # name -> gguf.ReaderTensor

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def file_type(self) -> str:
        """The dominant stored type of the 2-D weights ("F16", "Q4_K", ...)."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            if len(t.shape) == 2:
                counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
        return max(counts, key=counts.get) if counts else "F32"


def read_gguf(path: str | Path) -> GGUFFile:
    """Open ``path`` with llama.cpp's reader; malformed or truncated files give one-line errors."""
    gguf = _require_gguf()
    path = Path(path)
    if not path.is_file():
        raise CodeLlamaError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CodeLlamaError(f"{path} is not a GGUF file (bad magic)")
    try:
        reader = gguf.GGUFReader(path)
    except ValueError as e:
        msg = str(e)
        m = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", msg)
        if m:
            raise CodeLlamaError(f"{path}: unknown GGUF tensor type id {m.group(1)} "
                                 f"(supported: {', '.join(SUPPORTED_TYPES)})") from None
        raise CodeLlamaError(f"{path}: malformed or truncated GGUF file ({msg})") from None
    except (IndexError, OverflowError, UnicodeDecodeError, TypeError, KeyError) as e:
        # The reader walks a memory map: a cut-off header shows up as an out-of-range read.
        raise CodeLlamaError(f"{path}: malformed or truncated GGUF file ({type(e).__name__}: {e})") from None
    tensors = {}
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if end > size:
            raise CodeLlamaError(f"{path}: truncated GGUF file: tensor {t.name} ends at byte {end} "
                                 f"but the file has {size} bytes")
        tensors[t.name] = t
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            metadata[key] = field.contents()
        except Exception as e:  # an undecodable value: keep going, it matters only if we need that key
            metadata[key] = _Unreadable(f"{type(e).__name__}: {e}")
    return GGUFFile(path=path, metadata=metadata, tensors=tensors)


class _Unreadable:
    def __init__(self, why: str):
        self.why = why


def _meta(f: GGUFFile, key: str, default: Any = ..., kind: type | tuple[type, ...] = (int, float)) -> Any:
    value = f.metadata.get(key, default)
    if value is ...:
        raise CodeLlamaError(f"{f.path}: GGUF metadata lacks {key!r}")
    if isinstance(value, _Unreadable):
        raise CodeLlamaError(f"{f.path}: GGUF metadata {key!r} is unreadable ({value.why})")
    if value is not None and value is not default and not isinstance(value, kind):
        raise CodeLlamaError(f"{f.path}: GGUF metadata {key!r} has unexpected value {value!r}")
    return value


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    """Hyper-parameters from ``llama.*`` metadata (rope.freq_base included: Code Llama needs 1e6, not 1e4)."""
    arch = f.get("general.architecture")
    if arch != ARCHITECTURE:
        raise CodeLlamaError(f"{f.path}: GGUF architecture {arch!r} is not supported; only {ARCHITECTURE!r} "
                             "(Llama / Code Llama) files can be loaded")
    a = ARCHITECTURE
    dim = _meta(f, f"{a}.embedding_length", kind=int)
    n_heads = _meta(f, f"{a}.attention.head_count", kind=int)
    n_kv = _meta(f, f"{a}.attention.head_count_kv", n_heads, kind=int)
    rope_dims = _meta(f, f"{a}.rope.dimension_count", dim // n_heads, kind=int)
    if rope_dims != dim // n_heads:
        raise CodeLlamaError(f"{f.path}: partial rotary embeddings ({rope_dims} of {dim // n_heads} dims) "
                             "are not supported")
    scaling = f.get(f"{a}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise CodeLlamaError(f"{f.path}: RoPE scaling {scaling!r} is not supported (Code Llama uses none)")
    vocab = _meta(f, f"{a}.vocab_size", None, kind=int)
    if vocab is None:
        tokens = f.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if isinstance(tokens, list) else int(f.tensors["token_embd.weight"].shape[-1])
    return ModelConfig(
        dim=dim, n_layers=_meta(f, f"{a}.block_count", kind=int), n_heads=n_heads, n_kv_heads=n_kv,
        vocab_size=vocab, hidden_dim=_meta(f, f"{a}.feed_forward_length", kind=int),
        norm_eps=float(_meta(f, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        # llama.cpp's default when the key is absent is Llama's 10,000.
        rope_theta=float(_meta(f, f"{a}.rope.freq_base", 10_000.0)),
        max_seq_len=_meta(f, f"{a}.context_length", 16384, kind=int),
        name=str(f.get("general.name") or ""),
    )


def tensor_from_gguf(f: GGUFFile, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """One tensor, decoded to ``dtype`` with the PyTorch shape ([out, in] for weights)."""
    t = f.tensors[name]
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    kind = t.tensor_type.name
    if kind in ("F32", "F16"):
        out = torch.from_numpy(np.array(t.data, copy=True)).reshape(shape)
    else:
        out = dequantize(t.data, kind, shape)
    return out.to(dtype)


def load_gguf_model(path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    max_seq_len: int | None = None, quantize: str | None = None, group_size: int = 32):
    """A ``Transformer`` with the weights of a LLaMA GGUF file, dequantized to ``dtype``.

    With ``quantize`` ("int8" / "int4") each linear weight is re-quantized as soon as it is decoded, so a
    Q4_K file becomes an int4 model without ever holding the whole model in float."""
    from torch import nn

    from .model import Transformer

    f = read_gguf(path)
    config = config_from_gguf(f)
    if max_seq_len is not None:
        config.max_seq_len = max_seq_len
    with torch.device("meta"):
        model = Transformer(config)
    expected = dict(model.state_dict())
    present: dict[str, str] = {}
    for gname in f.tensors:
        ours = from_gguf_name(gname)
        if ours is not None:
            present[ours] = gname
    if "output.weight" not in present and "tok_embeddings.weight" in present:
        # llama.cpp falls back to the embedding when a file has no output matrix (tied weights).
        present["output.weight"] = present["tok_embeddings.weight"]
    missing = sorted(set(expected) - set(present))
    if missing:
        raise CodeLlamaError(f"{f.path}: GGUF file lacks tensors: {', '.join(to_gguf_name(m) for m in missing[:4])}"
                             + (" ..." if len(missing) > 4 else ""))
    for ours, gname in present.items():  # every shape before any decoding: fail fast on a mismatched file
        shape = tuple(int(d) for d in reversed(f.tensors[gname].shape.tolist()))
        if shape != tuple(expected[ours].shape):
            raise CodeLlamaError(f"{f.path}: GGUF tensor {gname} has shape {shape}, "
                                 f"expected {tuple(expected[ours].shape)} from the metadata")
    linears = {name for name, m in model.named_modules() if type(m) is nn.Linear}
    if quantize is not None:
        from .quantize import quantize_weight
    state: dict[str, Tensor] = {}
    for ours, gname in present.items():
        module = ours.removesuffix(".weight")
        if quantize is not None and module in linears:
            layer = quantize_weight(tensor_from_gguf(f, gname, torch.float32), quantize, group_size, dtype)
            parent, _, child = module.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
        else:
            state[ours] = tensor_from_gguf(f, gname, dtype).to(device)
    model.load_state_dict(state, strict=quantize is None, assign=True)
    return model.to(device).eval()


def tokenizer_proto_from_gguf(f: GGUFFile) -> bytes:
    """A serialized SentencePiece ModelProto rebuilt from ``tokenizer.ggml.*``: pieces, scores and types are all
    a BPE SentencePiece model needs to encode; the normalizer is Llama's (identity, dummy prefix, spaces kept)."""
    from sentencepiece import sentencepiece_model_pb2

    model = f.get("tokenizer.ggml.model")
    if model is None:
        raise CodeLlamaError(f"{f.path}: GGUF file has no tokenizer metadata; pass a tokenizer.model")
    if model != "llama":
        raise CodeLlamaError(f"{f.path}: GGUF tokenizer model {model!r} is not supported; only SentencePiece "
                             "('llama') vocabularies can be rebuilt — pass a tokenizer.model")
    tokens = _meta(f, "tokenizer.ggml.tokens", kind=list)
    scores = _meta(f, "tokenizer.ggml.scores", [0.0] * len(tokens), kind=list)
    types = _meta(f, "tokenizer.ggml.token_type", [1] * len(tokens), kind=list)
    if not (len(tokens) == len(scores) == len(types)):
        raise CodeLlamaError(f"{f.path}: GGUF tokenizer arrays disagree in length "
                             f"({len(tokens)} tokens, {len(scores)} scores, {len(types)} types)")
    proto = sentencepiece_model_pb2.ModelProto()
    ts = proto.trainer_spec
    ts.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    # GGUF token types use SentencePiece's numbering (NORMAL=1 ... BYTE=6), so they carry over unchanged.
    ts.byte_fallback = 6 in types
    ts.unk_id = _meta(f, "tokenizer.ggml.unknown_token_id", types.index(2) if 2 in types else 0, kind=int)
    ts.bos_id = _meta(f, "tokenizer.ggml.bos_token_id", 1, kind=int)
    ts.eos_id = _meta(f, "tokenizer.ggml.eos_token_id", 2, kind=int)
    pad = _meta(f, "tokenizer.ggml.padding_token_id", -1, kind=int)
    # llama.cpp converters often write pad = unk (id 0) for Llama; SentencePiece forbids reusing an id.
    ts.pad_id = -1 if pad in (ts.unk_id, ts.bos_id, ts.eos_id) else pad
    for key, idx in (("unk_piece", ts.unk_id), ("bos_piece", ts.bos_id), ("eos_piece", ts.eos_id),
                     ("pad_piece", ts.pad_id)):
        if 0 <= idx < len(tokens):
            setattr(ts, key, tokens[idx])
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    for piece, score, kind in zip(tokens, scores, types):
        p = proto.pieces.add()
        p.piece, p.score, p.type = piece, float(score), int(kind)
    return proto.SerializeToString()


def load_gguf_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer(tokenizer_proto_from_gguf(read_gguf(path)))


def describe_gguf(path: str | Path) -> dict[str, Any]:
    f = read_gguf(path)
    return {"config": config_from_gguf(f), "format": "gguf", "dtype": f.file_type(), "files": [str(f.path)]}


# ---- writing --------------------------------------------------------------------------------------
OUTTYPES = ("f32", "f16", "q8_0")


def save_gguf(model, tokenizer: Tokenizer, path: str | Path, *, outtype: str = "f16", name: str = "") -> Path:
    """Write ``model`` and ``tokenizer`` as a LLaMA GGUF with the keys and tensor names of llama.cpp's converter.

    ``outtype``: f32; f16 (2-D weights in float16); q8_0 (2-D weights whose rows are a multiple of 32 in Q8_0,
    the rest in f16). Norm vectors stay float32, as in llama.cpp's files."""
    gguf = _require_gguf()
    if outtype not in OUTTYPES:
        raise CodeLlamaError(f"unknown GGUF output type {outtype!r} (use {', '.join(OUTTYPES)})")
    c: ModelConfig = model.config
    if tokenizer.n_words > c.vocab_size:
        raise CodeLlamaError(f"tokenizer has {tokenizer.n_words} pieces but the model's vocabulary is {c.vocab_size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, ARCHITECTURE)
    w.add_name(name or c.name or path.stem)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    if outtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.ffn_hidden)
    w.add_rope_dimension_count(c.head_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    _add_tokenizer(w, gguf, tokenizer, c.vocab_size)

    for ours, tensor in model.state_dict().items():
        gname = to_gguf_name(ours)
        t = tensor.detach().float().cpu()
        if t.dim() == 1 or outtype == "f32":
            w.add_tensor(gname, t.numpy())
        elif outtype == "q8_0" and t.shape[-1] % 32 == 0:
            w.add_tensor(gname, quantize_q8_0(t), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, t.to(torch.float16).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_tokenizer(w, gguf, tokenizer: Tokenizer, vocab_size: int) -> None:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.model_proto)
    tokens = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    # The embedding may have more rows than pieces (a padded vocabulary); llama.cpp requires one token per row.
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_unk_token_id(tokenizer.sp.unk_id())
    if tokenizer.pad_id >= 0:
        w.add_pad_token_id(tokenizer.pad_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(bool(proto.normalizer_spec.add_dummy_prefix))
    # FIM and end-of-infill ids, so llama.cpp's infill path finds Code Llama's sentinels.
    fim = {"fim_pre": tokenizer.prefix_id, "fim_suf": tokenizer.suffix_id, "fim_mid": tokenizer.middle_id}
    for key, idx in fim.items():
        if idx is not None:
            w.add_uint32(f"tokenizer.ggml.{key}_token_id", idx)
    if tokenizer.eot_id is not None:
        w.add_eot_token_id(tokenizer.eot_id)


__all__ = [
    "OUTTYPES", "SUPPORTED_TYPES", "GGUFFile", "read_gguf", "config_from_gguf", "tensor_from_gguf", "dequantize",
    "quantize_q8_0", "load_gguf_model", "load_gguf_tokenizer", "tokenizer_proto_from_gguf", "describe_gguf",
    "save_gguf", "to_gguf_name", "from_gguf_name",
]
