"""Checkpoints on disk: load, save, convert and describe the three layouts Code Llama weights come in.

- **meta**: ``params.json`` + ``consolidated.NN.pth`` (one file per model-parallel rank, as Meta ships them);
- **native**: ``params.json`` + ``model.safetensors`` with the same (Meta) tensor names, one file;
- **hf**: ``config.json`` + ``model*.safetensors`` (optionally sharded with an index) or ``pytorch_model*.bin``,
  with HF tensor names and the q/k rows permuted so that HF's rotate-half RoPE applies.

Loading builds the model on the ``meta`` device and assigns the tensors, reading the files one layer at a
time (every file is re-opened memory-mapped per layer), so the process never holds two full copies of the
weights: a checkpoint whose dtype and device already match is not copied at all.

Which files make up a layout and how each is opened safely (only files inside the directory, weights-only
unpickling, validated safetensors headers) lives in ``checkpoint_files``; before anything is built, the config
(validated by ``config_validation``) must imply exactly the tensors the files hold: names, shapes, float dtypes.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from .checkpoint_files import (NATIVE_WEIGHTS, TOKENIZER_FILE, TensorInfo, atomic_output, check_float_dtype,
                               checkpoint_dir, confined_file, detect_format, expected_shapes, file_index,
                               hf_weight_files, meta_shards, read_config_json, read_tensors,
                               refuse_non_empty_output)
from .config import ModelConfig
from .config_validation import clean_name, shown, shown_name
from .errors import CodeLlamaError
from .model import Transformer
from .tokenizer import Tokenizer

FORMATS = ("meta", "native", "hf")
# Tensors that some checkpoints carry but our model recomputes: Meta's precomputed ``rope.freqs`` and old HF
# ``rotary_emb.inv_freq`` buffers.
_IGNORED = re.compile(r"(^|\.)(rope\.freqs|rotary_emb\.inv_freq)$")
# How Meta splits each weight across model-parallel ranks (fairscale): column-parallel layers on the output
# rows (dim 0), row-parallel layers on the input columns (dim 1), the embedding on its feature dim (dim 1);
# norms are replicated (None).
_SHARD_DIM = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1, "output": 0}
_HF_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_HF_TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
HF_MAX_SHARD_BYTES = 5 * 1024**3  # HF's own default shard size for save_pretrained
MAX_TOKENIZER_BYTES = 64 * 2**20


# ---- tensor names and the q/k permutation ----------------------------------------------------------------
def meta_to_hf_name(name: str) -> str:
    """``layers.3.attention.wq.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
    if m and m.group(2) in _HF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_HF_LAYER_NAMES[m.group(2)]}.weight"
    base = name.removesuffix(".weight")
    if base in _HF_TOP_NAMES and name.endswith(".weight"):
        return _HF_TOP_NAMES[base] + ".weight"
    raise CodeLlamaError(f"no HF name for tensor {name!r}")


def hf_to_meta_name(name: str) -> str | None:
    """The inverse of ``meta_to_hf_name``; None for a name that is not part of a Llama checkpoint."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
    if m:
        for ours, theirs in _HF_LAYER_NAMES.items():
            if m.group(2) == theirs:
                return f"layers.{m.group(1)}.{ours}.weight"
        return None
    for ours, theirs in _HF_TOP_NAMES.items():
        if name == theirs + ".weight":
            return ours + ".weight"
    return None


def permute_to_hf(w: Tensor, n_heads: int) -> Tensor:
    """Reorder q/k rows from Meta's interleaved RoPE pairs (x0 y0 x1 y1 ...) to HF's halves (x0 x1 ... y0 y1 ...)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(w: Tensor, n_heads: int) -> Tensor:
    """The inverse of ``permute_to_hf``: HF's rotate-half row order back to Meta's interleaved pairs."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _qk_heads(name: str, config: ModelConfig) -> int | None:
    if name.endswith("attention.wq.weight"):
        return config.n_heads
    if name.endswith("attention.wk.weight"):
        return config.n_kv_heads
    return None


@dataclass
class _Part:
    file: Path
    name: str  # the tensor's name inside ``file``


@dataclass
class _Plan:
    """Where each of our tensors comes from and how to put it together."""
    format: str
    config: ModelConfig
    files: list[Path]
    parts: dict[str, list[_Part]] = field(default_factory=dict)  # our name -> one part per shard
    infos: dict[tuple[Path, str], TensorInfo] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)


def _config_from_params(root: Path, params: dict[str, Any], vocab_from: TensorInfo | None) -> ModelConfig:
    overrides = {}
    if params.get("vocab_size", -1) in (-1, None) and vocab_from is not None and len(vocab_from.shape) == 2:
        overrides["vocab_size"] = vocab_from.shape[0]  # Llama params.json say -1: the embedding knows
    config = ModelConfig.from_params(params, source=str(root / "params.json"), **overrides)
    config.name = clean_name(params.get("name")) or root.resolve().name
    return config


def _plan(root: Path, fmt: str) -> _Plan:
    if fmt in ("meta", "native"):
        params = read_config_json(root, "params.json")
        files = meta_shards(root) if fmt == "meta" else [confined_file(root, NATIVE_WEIGHTS, "weights file")]
        # The config first: it is small, and a refused one should not cost reading every shard.
        first = file_index(files[0])
        config = _config_from_params(root, params, first.get("tok_embeddings.weight"))
        infos = {files[0]: first} | {f: file_index(f) for f in files[1:]}
        plan = _Plan(fmt, config, files)
        for f in files:
            for name, info in infos[f].items():
                plan.infos[(f, name)] = info
        for name in infos[files[0]]:
            if _IGNORED.search(name):
                continue
            plan.parts[name] = [_Part(f, name) for f in files]
        for f in files[1:]:
            # A tensor present in some shards only is a broken download; say which shard lacks it.
            for name in sorted(set(infos[files[0]]) ^ set(infos[f])):
                if not _IGNORED.search(name):
                    lacking = f if name in infos[files[0]] else files[0]
                    raise CodeLlamaError(f"tensor {shown_name(name)} is missing from {lacking.name} but present in "
                                         "other shards")
        return plan

    hf_config = read_config_json(root, "config.json")
    config = ModelConfig.from_hf(hf_config, source=str(root / "config.json"))
    config.name = root.resolve().name
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and head_dim != config.head_dim:
        raise CodeLlamaError(f"{root / 'config.json'}: head_dim {shown(head_dim)} != hidden_size / "
                             f"num_attention_heads ({config.head_dim}); not a Llama 2 layout")
    files, weight_map = hf_weight_files(root)
    plan = _Plan("hf", config, files)
    for f in files:
        for name, info in file_index(f).items():
            if weight_map is not None and weight_map.get(name, f.name) != f.name:
                continue  # a duplicate the index does not point at
            plan.infos[(f, name)] = info
            if _IGNORED.search(name):
                continue
            ours = hf_to_meta_name(name)
            if ours is None:
                plan.unexpected.append(f"{shown_name(name)} ({f.name})")
            else:
                plan.parts[ours] = [_Part(f, name)]
    if "output.weight" not in plan.parts and hf_config.get("tie_word_embeddings") is True \
            and "tok_embeddings.weight" in plan.parts:
        plan.parts["output.weight"] = plan.parts["tok_embeddings.weight"]
    return plan


def _listed(names: list[str]) -> str:
    return ", ".join(shown_name(n, 60) for n in names[:5]) + \
        (f", ... ({len(names)} in all)" if len(names) > 5 else "")


def _check_plan(plan: _Plan, root: Path) -> None:
    """The config's tensors (names, shapes, float dtypes) against the files' headers, before anything is built."""
    expected = expected_shapes(plan.config)
    missing = [k for k in expected if k not in plan.parts]
    unexpected = [k for k in plan.parts if k not in expected] + plan.unexpected
    if missing:
        raise CodeLlamaError(f"checkpoint {root} is missing tensors: {_listed(missing)}")
    if unexpected:
        raise CodeLlamaError(f"checkpoint {root} has unexpected tensors: {_listed(unexpected)}")
    for name, parts in plan.parts.items():
        want = list(expected[name])
        dim = _SHARD_DIM.get(name.split(".")[-2]) if len(parts) > 1 else None
        if dim is not None:
            if want[dim] % len(parts):
                raise CodeLlamaError(f"tensor {name}: size {want[dim]} cannot be split over {len(parts)} shards")
            want[dim] //= len(parts)
        for part in parts:
            info = plan.infos[(part.file, part.name)]
            if tuple(info.shape) != tuple(want):
                what = "shard shape" if len(parts) > 1 else "shape"
                raise CodeLlamaError(f"tensor {shown_name(part.name)} in {part.file.name} has shape "
                                     f"{shown(tuple(info.shape), 80)} but the config expects {what} {tuple(want)}")
            check_float_dtype(part.name, part.file, info.dtype)


def _layer_of(name: str) -> int:
    m = re.match(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _assemble(name: str, tensors: list[Tensor], config: ModelConfig, fmt: str) -> Tensor:
    if len(tensors) > 1:
        dim = _SHARD_DIM.get(name.split(".")[-2])
        # Replicated norms: every rank holds the same vector; keep (a copy of, so no map stays alive) rank 0's.
        t = tensors[0].clone() if dim is None else torch.cat(tensors, dim=dim)
    else:
        t = tensors[0]
    if fmt == "hf" and (heads := _qk_heads(name, config)) is not None:
        t = permute_from_hf(t, heads)
    return t


def load_model(path: str | Path, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               max_seq_len: int | None = None) -> Transformer:
    """Load a Meta, native or HF checkpoint directory into a ``Transformer`` (in eval mode).

    ``dtype=None`` keeps the stored dtype (that of the embedding); ``device=None`` means CPU."""
    if _is_gguf(path):  # a llama.cpp file: dequantized to ``dtype`` (float32 by default)
        from .gguf import load_gguf_model
        return load_gguf_model(Path(path).expanduser(), device=device or "cpu", dtype=dtype or torch.float32,
                               max_seq_len=max_seq_len)
    if _is_quantized_dir(path):  # written by ``codellama quantize``: stays int8/int4
        from .quantize import load_quantized
        return load_quantized(path, device=device, dtype=dtype, max_seq_len=max_seq_len)
    plan = _checked_plan(path, max_seq_len)
    from .api import resolve_device, resolve_dtype  # api imports this module lazily: no cycle

    device = torch.device("cpu") if device is None else resolve_device(device)
    dtype = _stored_dtype(plan) if dtype is None else resolve_dtype(dtype, device)
    state = dict(_stream(plan, device, dtype))
    with torch.device("meta"):
        model = Transformer(plan.config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _checked_plan(path: str | Path, max_seq_len: int | None = None) -> _Plan:
    root = checkpoint_dir(path)
    plan = _plan(root, detect_format(root))
    if max_seq_len is not None:
        plan.config = replace(plan.config, max_seq_len=max_seq_len)  # validated like the file's own value
    _check_plan(plan, root)
    return plan


def _stored_dtype(plan: _Plan) -> torch.dtype:
    first = plan.parts["tok_embeddings.weight"][0]
    return getattr(torch, plan.infos[(first.file, first.name)].dtype)


def _stream(plan: _Plan, device: torch.device, dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
    """Our tensors, named as in ``Transformer``, cast to ``dtype`` on ``device``, layer by layer.

    Open the files, take one layer's tensors, merge shards / undo the HF permutation, cast and move, then close
    the files, so at most one layer is held twice. Tensors used as stored (one part, same dtype, CPU) stay views
    of their memory map, and are read in a separate opening from the ones that get copied: a map stays alive as
    long as one view does, and with it every page read through it."""
    def used_as_stored(name: str) -> bool:
        parts = plan.parts[name]
        return (len(parts) == 1 and device.type == "cpu"
                and not (plan.format == "hf" and _qk_heads(name, plan.config) is not None)
                and plan.infos[(parts[0].file, parts[0].name)].dtype == _dtype_name(dtype))

    groups: dict[tuple[int, bool], list[str]] = {}
    for name in plan.parts:
        groups.setdefault((_layer_of(name), used_as_stored(name)), []).append(name)
    for names in groups.values():
        wanted: dict[Path, set[str]] = {}
        for name in names:
            for part in plan.parts[name]:
                wanted.setdefault(part.file, set()).add(part.name)
        loaded = {f: read_tensors(f, sorted(ns)) for f, ns in wanted.items()}
        for name in names:
            t = _assemble(name, [loaded[p.file][p.name] for p in plan.parts[name]], plan.config, plan.format)
            yield name, t.to(device=device, dtype=dtype)
        del loaded


def stream_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, max_seq_len: int | None = None
                      ) -> tuple[ModelConfig, Iterator[tuple[str, Tensor]]]:
    """A Meta, native or HF checkpoint directory as its config and a stream of its tensors on the CPU (our
    names, ``dtype``), one layer at a time, checked before the first tensor is read. What a sharded trainer
    uses to materialise only its own slice of each tensor without ever holding the whole model."""
    plan = _checked_plan(path, max_seq_len)
    return plan.config, _stream(plan, torch.device("cpu"), dtype)


def shard_dim(name: str) -> int | None:
    """The dim a model-parallel rank splits tensor ``name`` on (Meta's layout, which tensor parallelism keeps);
    None for replicated tensors (the norms)."""
    parts = name.split(".")
    return _SHARD_DIM.get(parts[-2]) if len(parts) >= 2 else None


def rank_slice(name: str, t: Tensor, rank: int, world: int) -> Tensor:
    """Rank ``rank`` of ``world``'s contiguous share of the full tensor ``t`` (a view; the whole for replicas)."""
    dim = shard_dim(name)
    if dim is None or world == 1:
        return t
    size = t.shape[dim] // world
    return t.narrow(dim, rank * size, size)


def stream_rank(path: str | Path, rank: int, world: int, dtype: torch.dtype = torch.float32,
                max_seq_len: int | None = None) -> tuple[ModelConfig, list[Path], Iterator[tuple[str, Tensor]]]:
    """Rank ``rank`` of ``world``'s share of every tensor of a checkpoint directory, on the CPU, one layer at a time:
    the config, the files this rank reads, and the stream. The tensors are views of the files' memory maps where
    possible (in the stored dtype then: copy each into its destination, which casts, before taking the next).

    A Meta download with ``world`` model-parallel shards is read directly: rank r opens consolidated.r.pth and
    nothing else (each of its tensors is already the rank's share). Any other layout (one file, HF, native, or a
    different number of shards) is assembled a layer at a time from memory maps and sliced."""
    plan = _checked_plan(path, max_seq_len)
    if plan.format == "meta" and len(plan.files) == world and world > 1:
        own = plan.files[rank]

        def own_shard() -> Iterator[tuple[str, Tensor]]:
            groups: dict[int, list[str]] = {}
            for name in plan.parts:
                groups.setdefault(_layer_of(name), []).append(name)
            for names in groups.values():
                loaded = read_tensors(own, names)
                for name in names:
                    yield name, loaded.pop(name)
                del loaded
        return plan.config, [own], own_shard()

    def sliced() -> Iterator[tuple[str, Tensor]]:
        for name, t in _stream(plan, torch.device("cpu"), dtype):
            yield name, rank_slice(name, t, rank, world)
    return plan.config, list(plan.files), sliced()


def load_tokenizer(path: str | Path | None, tokenizer: str | Path | None = None) -> Tokenizer:
    """``tokenizer`` (a ``.model`` file or a directory holding ``tokenizer.model``) or ``path/tokenizer.model``."""
    if tokenizer is not None:
        candidate = Path(tokenizer).expanduser()
        if candidate.is_dir():
            candidate = candidate / TOKENIZER_FILE
        if not candidate.is_file():
            raise CodeLlamaError(f"tokenizer not found: {candidate}")
        return Tokenizer(candidate)
    if path is None:
        raise CodeLlamaError("no tokenizer given")
    if _is_gguf(path):  # rebuilt from the file's tokenizer.ggml.* metadata
        from .gguf import load_gguf_tokenizer
        return load_gguf_tokenizer(Path(path).expanduser())
    root = Path(path).expanduser()
    if root.is_file() and root.suffix == ".model":
        return Tokenizer(root)
    if not (root.is_dir() and (root / TOKENIZER_FILE).exists()):
        raise CodeLlamaError(f"no {TOKENIZER_FILE} in {root}; pass the tokenizer path explicitly (--tokenizer)")
    candidate = confined_file(root, TOKENIZER_FILE, "tokenizer")
    if candidate.stat().st_size > MAX_TOKENIZER_BYTES:  # read whole: real ones are 0.5-4 MB
        raise CodeLlamaError(f"{candidate} is larger than {MAX_TOKENIZER_BYTES // 2**20} MiB: not a tokenizer model")
    return Tokenizer(candidate)


# ---- saving and converting -----------------------------------------------------------------------------
def _owned(t: Tensor) -> Tensor:
    """A contiguous tensor that owns its storage: views into a larger storage (mmap-loaded checkpoints,
    shard slices) would otherwise be written whole by ``torch.save`` or refused by safetensors."""
    t = t.detach().contiguous()
    if t.untyped_storage().nbytes() != t.nbytes or t.storage_offset() != 0:
        t = t.clone()
    return t


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_checkpoint(model: Transformer, out_dir: str | Path, *, format: str = "native",
                    tokenizer: str | Path | None = None, shards: int = 1, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a checkpoint directory in ``format`` (``native``, ``meta`` or ``hf``); returns it.

    ``shards`` > 1 splits the weights over that many model-parallel files (Meta layout only); ``dtype``
    casts on the way out; ``tokenizer`` is copied in as ``tokenizer.model``."""
    if format not in FORMATS:
        raise CodeLlamaError(f"unknown checkpoint format {format!r} (use {', '.join(FORMATS)})")
    if shards < 1:
        raise CodeLlamaError(f"shards must be at least 1, got {shards}")
    if shards > 1 and format != "meta":
        raise CodeLlamaError("model-parallel shards exist only in the Meta layout (--to meta)")
    config = model.config
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CodeLlamaError(f"output path {out} exists and is not a directory")
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise CodeLlamaError(f"tokenizer not found: {tokenizer}")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items()}
    dtype = dtype or state["tok_embeddings.weight"].dtype

    def prepared(name: str) -> Tensor:
        return state[name].detach().to(device="cpu", dtype=dtype)

    if format == "meta":
        _save_meta(out, config, state, prepared, shards)
    elif format == "native":
        from safetensors.torch import save_file
        params = config.to_params() | {"max_seq_len": config.max_seq_len}
        (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        save_file({k: _owned(prepared(k)) for k in state}, str(out / NATIVE_WEIGHTS), metadata={"format": "pt"})
    else:
        _save_hf(out, config, state, prepared, dtype)
    if tokenizer is not None and Path(tokenizer).resolve() != (out / TOKENIZER_FILE).resolve():
        shutil.copyfile(tokenizer, out / TOKENIZER_FILE)
    return out


def _save_meta(out: Path, config: ModelConfig, state: dict[str, Tensor], prepared, shards: int) -> None:
    for name, t in state.items():
        dim = _SHARD_DIM.get(name.split(".")[-2])
        if shards > 1 and dim is not None and t.shape[dim] % shards:
            raise CodeLlamaError(f"tensor {name} of shape {tuple(t.shape)} cannot be split over {shards} shards "
                                 f"(dim {dim} is not a multiple of {shards})")
    # Meta's loader passes params.json as keyword arguments next to its own max_seq_len, so that key stays out.
    (out / "params.json").write_text(json.dumps(config.to_params(), indent=2) + "\n")
    for old in out.glob("consolidated.*.pth"):
        old.unlink()  # a stale rank from an earlier save would be merged into this one
    for rank in range(shards):
        shard: dict[str, Tensor] = {}
        for name in state:
            t = prepared(name)
            dim = _SHARD_DIM.get(name.split(".")[-2])
            if shards > 1 and dim is not None:
                t = t.chunk(shards, dim=dim)[rank]
            shard[name] = _owned(t)
        torch.save(shard, out / f"consolidated.{rank:02d}.pth")
        del shard


def _save_hf(out: Path, config: ModelConfig, state: dict[str, Tensor], prepared, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file
    hf_config = config.to_hf()
    hf_config["torch_dtype"] = hf_config["dtype"] = _dtype_name(dtype)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    for old in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    # Group tensors into files of at most HF_MAX_SHARD_BYTES, converting one file's worth at a time.
    itemsize = torch.empty((), dtype=dtype).element_size()
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * itemsize
        if groups[-1] and size + nbytes > HF_MAX_SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, names in enumerate(groups):
        fname = NATIVE_WEIGHTS if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            t = prepared(name)
            if (heads := _qk_heads(name, config)) is not None:
                t = permute_to_hf(t, heads)
            tensors[meta_to_hf_name(name)] = _owned(t)
            weight_map[meta_to_hf_name(name)] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    if len(groups) > 1:
        total = sum(t.numel() for t in state.values()) * itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def convert(src: str | Path, dst: str | Path, to: str = "native", shards: int = 1,
            dtype: torch.dtype | None = None, outtype: str = "f16") -> Path:
    """Rewrite the checkpoint ``src`` in layout ``to``; the tokenizer travels along. Without ``dtype`` the
    tensors keep their stored dtype, so Meta -> HF -> Meta is bit-exact. ``to="gguf"`` writes the file ``dst``
    in ``outtype`` (f32, f16 or q8_0); a ``.gguf`` ``src`` converts to any directory layout. The output is
    written to a temporary sibling and renamed into place only when complete: a failure leaves nothing."""
    if to != "gguf" and to not in FORMATS:
        raise CodeLlamaError(f"unknown checkpoint format {to!r} (use {', '.join(FORMATS)}, gguf)")
    if to != "gguf" and _is_gguf(dst):  # would write a directory named *.gguf, then fail to find the file
        raise CodeLlamaError(f"the output {shown_name(str(dst))} is named like a GGUF file but --to is {to}; "
                             "use --to gguf, or a directory name for the other layouts")
    if _is_quantized_dir(src):
        raise CodeLlamaError(f"{shown_name(str(src))} is a quantized checkpoint (codellama quantize); converting "
                             "it is not supported: convert the original float checkpoint, then quantize the result")
    if to == "gguf" or _is_gguf(src):
        return _convert_gguf(src, dst, to, shards, dtype, outtype)
    src_dir, dst_dir = checkpoint_dir(src), Path(dst).expanduser()
    if dst_dir.exists() and dst_dir.resolve() == src_dir.resolve():
        raise CodeLlamaError("the destination must differ from the source checkpoint")
    refuse_non_empty_output(dst_dir)
    # Copied along, so it must really be the checkpoint's: a symlink to a file elsewhere would leak that file.
    tok = confined_file(src_dir, TOKENIZER_FILE, "tokenizer") if (src_dir / TOKENIZER_FILE).exists() else None
    model = load_model(src_dir)
    with atomic_output(dst_dir) as tmp:
        save_checkpoint(model, tmp, format=to, tokenizer=tok, shards=shards, dtype=dtype)
    return dst_dir


def _is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def _is_quantized_dir(path: str | Path) -> bool:
    return (Path(path).expanduser() / "quantization.json").is_file()


def _convert_gguf(src: str | Path, dst: str | Path, to: str, shards: int, dtype: torch.dtype | None,
                  outtype: str) -> Path:
    """GGUF in or out (see ``gguf.py``): the rebuilt SentencePiece model travels as ``tokenizer.model``."""
    from .gguf import save_gguf
    dst_path = Path(dst).expanduser()
    if dst_path.exists() and dst_path.resolve() == Path(src).expanduser().resolve():
        raise CodeLlamaError("the destination must differ from the source checkpoint")
    if to == "gguf" and not _is_gguf(dst_path):
        raise CodeLlamaError(f"a GGUF output needs a .gguf file name, got {dst_path}")
    if to != "gguf":
        refuse_non_empty_output(dst_path)
    model = load_model(src, dtype=dtype)
    tok = load_tokenizer(src)
    with atomic_output(dst_path) as tmp:
        if to == "gguf":
            save_gguf(model, tok, tmp, outtype=outtype)
        else:
            save_checkpoint(model, tmp, format=to, shards=shards, dtype=dtype)
            (tmp / TOKENIZER_FILE).write_bytes(tok.model_proto)
    return dst_path


# ---- describing without loading ------------------------------------------------------------------------
def describe_checkpoint(path_or_name: str | Path) -> dict[str, Any]:
    """``{"config", "format", "dtype", "files", "shards"}`` read from headers and params only; a released
    model name (``CodeLlama-34b-Instruct``) gives its published config with format ``"released config"``."""
    root = Path(path_or_name).expanduser()
    if not root.exists():
        try:
            config = ModelConfig.from_name(str(path_or_name))
        except CodeLlamaError:
            raise CodeLlamaError(f"{shown_name(str(path_or_name))} is neither a checkpoint directory nor a released "
                                 "model name "
                                 "(e.g. CodeLlama-7b, CodeLlama-34b-Python, CodeLlama-70b-Instruct)") from None
        return {"config": config, "format": "released config", "dtype": None, "files": [], "shards": None}
    if _is_gguf(root):
        from .gguf import describe_gguf
        return describe_gguf(root) | {"shards": None}
    if _is_quantized_dir(root):
        from .quantize import describe_quantized
        return describe_quantized(root)
    root = checkpoint_dir(root)
    fmt = detect_format(root)
    plan = _plan(root, fmt)
    _check_plan(plan, root)  # a description of a checkpoint that cannot load would be a lie
    first = plan.parts["tok_embeddings.weight"]
    dtype = plan.infos[(first[0].file, first[0].name)].dtype
    listed = [root / ("params.json" if fmt != "hf" else "config.json"), *plan.files]
    if (root / TOKENIZER_FILE).is_file():
        listed.append(root / TOKENIZER_FILE)
    return {"config": plan.config, "format": fmt, "dtype": dtype,
            "files": [p.name for p in listed], "shards": len(plan.files) if fmt == "meta" else None}
