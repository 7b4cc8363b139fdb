"""GGUF, llama.cpp's file format: read LLaMA-architecture files into our ``Transformer`` and ``Tokenizer``, and
write f32 / f16 / q8_0 files that llama.cpp loads.

Layout facts this module relies on (llama.cpp's own converter for LLaMA writes files this way):
- Tensor names: ``token_embd``, ``blk.N.attn_q|attn_k|attn_v|attn_output``, ``blk.N.ffn_gate|ffn_down|ffn_up``,
  ``blk.N.attn_norm|ffn_norm``, ``output_norm``, ``output`` (all ``.weight``).
- q/k rows are in Meta's interleaved rotary order: the converter undoes Hugging Face's rotate-half permutation, and
  llama.cpp applies "normal" (adjacent-pair) RoPE to LLaMA. Our model uses that order too, so q/k map unchanged.
- GGUF lists dimensions fastest-first (``ne[0]`` is the row length); our reader (``gguf_reader``) and the
  ``gguf`` package's writer reverse them, so shapes here are PyTorch's ``[out_features, in_features]``.
- Quantized tensors are rows of fixed-size blocks, decoded by ``gguf_quants``.

Reading needs nothing beyond numpy (``gguf_reader`` validates every size against the file); writing uses the
``gguf`` package shipped with llama.cpp, an optional dependency: ``pip install gguf``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .checkpoint_files import expected_shapes
from .config import ModelConfig
from .config_validation import LIMITS, clean_name, shown, shown_name
from .errors import CodeLlamaError
from .gguf_quants import DEQUANTIZERS, QK_K, SUPPORTED_TYPES, dequantize, quantize_q8_0  # noqa: F401 (re-exported)
from .gguf_reader import GGUFFile, Unreadable, read_gguf
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


def from_gguf_name(name: str, path: Path | None = None) -> str | None:
    """llama.cpp tensor name -> ours; None for tensors LLaMA files may carry that we recompute (rope tables)."""
    if name in _GLOBAL_BACK:
        return _GLOBAL_BACK[name]
    if name == "rope_freqs.weight" or name.endswith(".attn_rot_embd.weight"):
        return None
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_BACK:
        return f"layers.{m.group(1)}.{_LAYER_BACK[m.group(2)]}"
    raise CodeLlamaError((f"{path}: " if path else "") + f"GGUF tensor {shown(name, 80)} is not part of a LLaMA model")


# ---- reading --------------------------------------------------------------------------------------
def _require_gguf():
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise CodeLlamaError("GGUF support needs the 'gguf' package: pip install gguf "
                             "(or pip install 'codellama[gguf]')") from None
    return gguf


def _meta(f: GGUFFile, key: str, default: Any = ..., kind: type | tuple[type, ...] = (int, float)) -> Any:
    value = f.metadata.get(key, default)
    if value is ...:
        raise CodeLlamaError(f"{f.path}: GGUF metadata lacks {key!r}")
    if isinstance(value, Unreadable):
        raise CodeLlamaError(f"{f.path}: GGUF metadata {key!r} is unreadable ({value.why})")
    if value is not None and value is not default and not isinstance(value, kind):
        raise CodeLlamaError(f"{f.path}: GGUF metadata {key!r} has unexpected value {shown(value)}")
    return value


# Our config field -> the GGUF key that states it, for messages.
_GGUF_KEYS = {"dim": "llama.embedding_length", "n_layers": "llama.block_count",
              "n_heads": "llama.attention.head_count", "n_kv_heads": "llama.attention.head_count_kv",
              "vocab_size": "llama.vocab_size", "hidden_dim": "llama.feed_forward_length",
              "norm_eps": "llama.attention.layer_norm_rms_epsilon", "rope_theta": "llama.rope.freq_base",
              "max_seq_len": "llama.context_length"}


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    """Hyper-parameters from ``llama.*`` metadata (rope.freq_base included: Code Llama needs 1e6, not 1e4)."""
    arch = f.get("general.architecture")
    if not isinstance(arch, str) or arch != ARCHITECTURE:  # (metadata may hold arrays: compare strings only)
        raise CodeLlamaError(f"{f.path}: GGUF architecture {shown(arch)} is not supported; only "
                             f"{ARCHITECTURE!r} (Llama / Code Llama) files can be loaded")
    scaling = f.get(f"{ARCHITECTURE}.rope.scaling.type")
    if scaling is not None and not (isinstance(scaling, str) and scaling == "none"):
        raise CodeLlamaError(f"{f.path}: RoPE scaling {shown(scaling)} is not supported (Code Llama uses none)")
    values = {field: _meta(f, key, None) for field, key in _GGUF_KEYS.items()}
    for field in ("dim", "n_layers", "n_heads", "hidden_dim"):
        if values[field] is None:
            raise CodeLlamaError(f"{f.path}: GGUF metadata lacks {_GGUF_KEYS[field]!r}")
    if values["vocab_size"] is None:
        tokens, embedding = f.get("tokenizer.ggml.tokens"), f.tensors.get("token_embd.weight")
        if isinstance(tokens, list):
            values["vocab_size"] = len(tokens)
        elif embedding is not None and len(embedding.dims) == 2:
            values["vocab_size"] = embedding.shape[0]
        else:
            raise CodeLlamaError(f"{f.path}: cannot tell the vocabulary size (no llama.vocab_size, no tokens)")
    defaults = {"norm_eps": 1e-5, "rope_theta": 10_000.0, "max_seq_len": 16384}  # llama.cpp's when absent
    values.update({k: v for k, v in defaults.items() if values[k] is None})
    config = ModelConfig.checked(str(f.path), values, _GGUF_KEYS)  # types and ranges before any arithmetic
    rope_dims = _meta(f, f"{ARCHITECTURE}.rope.dimension_count", config.head_dim)
    if rope_dims != config.head_dim:
        raise CodeLlamaError(f"{f.path}: partial rotary embeddings ({shown(rope_dims)} of {config.head_dim} dims) "
                             "are not supported")
    config.name = clean_name(f.get("general.name"))
    return config


def tensor_from_gguf(f: GGUFFile, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """One tensor, decoded to ``dtype`` with the PyTorch shape ([out, in] for weights)."""
    t = f.tensors[name]
    raw = f.data(name)
    if t.type_name in ("F32", "F16"):
        out = torch.from_numpy(raw.view(np.float32 if t.type_name == "F32" else np.float16).copy()).reshape(t.shape)
    else:
        out = dequantize(raw, t.type_name, t.shape)
    return out.to(dtype)


def _tensor_plan(f: GGUFFile, config: ModelConfig) -> dict[str, str]:
    """Our tensor name -> the file's, after checking every name, shape and type against the config; nothing
    is decoded or built before the whole file is known to fit."""
    expected = expected_shapes(config)
    present: dict[str, str] = {}
    for gname in f.tensors:
        ours = from_gguf_name(gname, f.path)
        if ours is not None:
            present[ours] = gname
    if "output.weight" not in present and "tok_embeddings.weight" in present:
        # llama.cpp falls back to the embedding when a file has no output matrix (tied weights).
        present["output.weight"] = present["tok_embeddings.weight"]
    missing = [k for k in expected if k not in present]
    if missing:
        raise CodeLlamaError(f"{f.path}: GGUF file lacks tensors: {', '.join(to_gguf_name(m) for m in missing[:4])}"
                             + (f" ... ({len(missing)} in all)" if len(missing) > 4 else ""))
    extra = [present[k] for k in present if k not in expected]
    if extra:
        raise CodeLlamaError(f"{f.path}: GGUF tensor {shown_name(extra[0])} is not part of a model with "
                             f"{config.n_layers} layers")
    for ours, gname in present.items():
        t = f.tensors[gname]
        if t.shape != expected[ours]:
            raise CodeLlamaError(f"{f.path}: GGUF tensor {gname} has shape {t.shape}, "
                                 f"expected {expected[ours]} from the metadata")
        if t.type_name not in SUPPORTED_TYPES:
            raise CodeLlamaError(f"{f.path}: GGUF tensor {gname} has unsupported GGUF tensor type {t.type_name} "
                                 f"(supported: {', '.join(SUPPORTED_TYPES)})")
    return present


def load_gguf_model(path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    max_seq_len: int | None = None, quantize: str | None = None, group_size: int = 32):
    """A ``Transformer`` with the weights of a LLaMA GGUF file, dequantized to ``dtype``.

    With ``quantize`` ("int8" / "int4") each linear weight is re-quantized as soon as it is decoded, so a
    Q4_K file becomes an int4 model without ever holding the whole model in float."""
    from dataclasses import replace

    from torch import nn

    from .model import Transformer

    f = read_gguf(path)
    config = config_from_gguf(f)
    if max_seq_len is not None:
        config = replace(config, max_seq_len=max_seq_len)
    present = _tensor_plan(f, config)
    with torch.device("meta"):
        model = Transformer(config)
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


_TOKEN_TYPES = range(1, 7)  # SentencePiece's NORMAL=1 ... BYTE=6, which GGUF's token types reuse


def _token_id(f: GGUFFile, key: str, default: int, n_tokens: int, allow_none: bool = False) -> int:
    value = _meta(f, key, default, kind=int)
    if isinstance(value, bool) or not (0 <= value < n_tokens or (allow_none and value == -1)):
        raise CodeLlamaError(f"{f.path}: GGUF metadata {key!r} = {shown(value)} is not a token id "
                             f"(0..{n_tokens - 1})")
    return value


def _tokenizer_arrays(f: GGUFFile) -> tuple[list[str], list[float], list[int]]:
    """tokens, scores and types, checked: one entry each per token, scores finite-or-not floats, known types."""
    tokens = _meta(f, "tokenizer.ggml.tokens", kind=list)
    if not 1 <= len(tokens) <= LIMITS.max_vocab:
        raise CodeLlamaError(f"{f.path}: GGUF vocabulary of {len(tokens)} tokens is out of range "
                             f"(1..{LIMITS.max_vocab})")
    scores = _meta(f, "tokenizer.ggml.scores", None, kind=np.ndarray)
    types = _meta(f, "tokenizer.ggml.token_type", None, kind=np.ndarray)
    scores = [0.0] * len(tokens) if scores is None else scores
    types = [1] * len(tokens) if types is None else types
    if not (len(tokens) == len(scores) == len(types)):
        raise CodeLlamaError(f"{f.path}: GGUF tokenizer arrays disagree in length "
                             f"({len(tokens)} tokens, {len(scores)} scores, {len(types)} types)")
    if isinstance(scores, np.ndarray) and scores.dtype.kind not in "fiu":
        raise CodeLlamaError(f"{f.path}: GGUF tokenizer.ggml.scores must be numbers")
    if isinstance(types, np.ndarray):
        if types.dtype.kind not in "iu":
            raise CodeLlamaError(f"{f.path}: GGUF tokenizer.ggml.token_type must be integers")
        bad = types[(types < 1) | (types > 6)]
        if bad.size:
            raise CodeLlamaError(f"{f.path}: GGUF token type {int(bad[0])} is not one of 1..6")
    return list(tokens), [float(s) for s in scores], [int(t) for t in types]


def tokenizer_proto_from_gguf(f: GGUFFile) -> bytes:
    """A serialized SentencePiece ModelProto rebuilt from ``tokenizer.ggml.*``: pieces, scores and types are all
    a BPE SentencePiece model needs to encode; the normalizer is Llama's (identity, dummy prefix, spaces kept)."""
    from sentencepiece import sentencepiece_model_pb2

    model = f.get("tokenizer.ggml.model")
    if model is None:
        raise CodeLlamaError(f"{f.path}: GGUF file has no tokenizer metadata; pass a tokenizer.model")
    if not isinstance(model, str) or model != "llama":
        raise CodeLlamaError(f"{f.path}: GGUF tokenizer model {shown(model)} is not supported; only SentencePiece "
                             "('llama') vocabularies can be rebuilt — pass a tokenizer.model")
    tokens, scores, types = _tokenizer_arrays(f)
    n = len(tokens)
    proto = sentencepiece_model_pb2.ModelProto()
    ts = proto.trainer_spec
    ts.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    ts.vocab_size = n
    # GGUF token types use SentencePiece's numbering (NORMAL=1 ... BYTE=6), so they carry over unchanged.
    ts.byte_fallback = 6 in types
    ts.unk_id = _token_id(f, "tokenizer.ggml.unknown_token_id", types.index(2) if 2 in types else 0, n)
    ts.bos_id = _token_id(f, "tokenizer.ggml.bos_token_id", min(1, n - 1), n)
    ts.eos_id = _token_id(f, "tokenizer.ggml.eos_token_id", min(2, n - 1), n)
    pad = _token_id(f, "tokenizer.ggml.padding_token_id", -1, n, allow_none=True)
    # llama.cpp converters often write pad = unk (id 0) for Llama; SentencePiece forbids reusing an id.
    ts.pad_id = -1 if pad in (ts.unk_id, ts.bos_id, ts.eos_id) else pad
    for key, idx in (("unk_piece", ts.unk_id), ("bos_piece", ts.bos_id), ("eos_piece", ts.eos_id),
                     ("pad_piece", ts.pad_id)):
        if 0 <= idx < n:
            setattr(ts, key, tokens[idx])
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = _meta(f, "tokenizer.ggml.add_space_prefix", True, kind=bool)
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    for piece, score, kind in zip(tokens, scores, types):
        p = proto.pieces.add()
        p.piece, p.score, p.type = piece, score, kind
    return proto.SerializeToString()


def load_gguf_tokenizer(path: str | Path) -> Tokenizer:
    f = read_gguf(path)
    proto = tokenizer_proto_from_gguf(f)
    try:
        return Tokenizer(proto)
    except CodeLlamaError as e:  # SentencePiece's own refusal (duplicate or empty pieces ...): one line
        raise CodeLlamaError(f"{f.path}: the GGUF vocabulary is not a valid SentencePiece model "
                             f"({shown_name(str(e).splitlines()[0] if str(e) else '', 120)})") from None


def describe_gguf(path: str | Path) -> dict[str, Any]:
    f = read_gguf(path)
    config = config_from_gguf(f)
    _tensor_plan(f, config)  # what a load would check, minus the decoding
    return {"config": config, "format": "gguf", "dtype": f.file_type(), "files": [str(f.path)]}


# ---- writing --------------------------------------------------------------------------------------
OUTTYPES = ("f32", "f16", "q8_0", "q4_0")


def save_gguf(model, tokenizer: Tokenizer, path: str | Path, *, outtype: str = "f16", name: str = "") -> Path:
    """Write ``model`` and ``tokenizer`` as a LLaMA GGUF with the keys and tensor names of llama.cpp's converter.

    ``outtype``: f32; f16 (2-D weights in float16); q8_0 / q4_0 (2-D weights whose rows are a multiple of 32 in
    Q8_0 / Q4_0 — Q4_0 by gguf-py's reference quantizer — the rest in f16). Norm vectors stay float32, as in
    llama.cpp's files."""
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
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[outtype])
    if outtype in ("q8_0", "q4_0"):
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
        elif outtype == "q4_0" and t.shape[-1] % 32 == 0:
            q4 = gguf.GGMLQuantizationType.Q4_0
            w.add_tensor(gname, gguf.quants.quantize(t.numpy(), q4), raw_dtype=q4)
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
