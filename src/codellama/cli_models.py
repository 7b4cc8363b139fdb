"""``codellama info / convert / quantize``: commands that describe or rewrite checkpoints. Outputs are written
to a temporary sibling and renamed into place when complete, so a failure leaves nothing behind."""

from __future__ import annotations

import json

from .errors import CodeLlamaError


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


# ---- info ------------------------------------------------------------------------------------------
def add_info(sub) -> None:
    p = sub.add_parser("info", help="show a checkpoint's config, size and memory needs")
    p.add_argument("path", nargs="?", default=None, help="checkpoint directory or released model name "
                   "(e.g. CodeLlama-34b); default: the embedded model")
    p.add_argument("--model", default=None, help="the same as PATH, as in the other commands")
    p.add_argument("--context", type=int, default=None, help="context length for the KV-cache estimate")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> None:
    import torch

    from .api import DEFAULT_MODEL_DIR, resolve_dtype
    from .checkpoint import describe_checkpoint

    if args.path is not None and args.model is not None:
        raise CodeLlamaError("give the checkpoint either as PATH or as --model, not both")
    args.path = args.path if args.path is not None else args.model
    if args.path is None and not DEFAULT_MODEL_DIR.is_dir():
        raise CodeLlamaError("the embedded default model is not installed; pass a checkpoint directory "
                             "or a released model name (e.g. CodeLlama-7b)")
    if (args.context is not None and args.context < 1) or args.batch < 1:
        raise CodeLlamaError("--context and --batch must be positive")
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    info = describe_checkpoint(args.path if args.path is not None else DEFAULT_MODEL_DIR)
    config = info["config"]
    mem = config.memory_estimate(args.context, args.batch, dtype)
    result = {"name": config.name or str(args.path), "format": info["format"], "shards": info.get("shards"),
              "checkpoint_dtype": info.get("dtype"), "files": info.get("files", []),
              "params": config.num_params(),
              "config": config.to_params() | {"n_kv_heads": config.n_kv_heads, "hidden_dim": config.ffn_hidden,
                                              "max_seq_len": config.max_seq_len},
              "memory": {"dtype": str(dtype).removeprefix("torch."),
                         "context": args.context or config.max_seq_len, "batch": args.batch, **mem}}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    if result["format"] == "released config":
        kind = "released config, no weights read"
    else:
        kind = f"{result['format']} checkpoint" + (f", {result['shards']} shards" if (result["shards"] or 1) > 1 else "")
    print(f"model        {result['name']}  ({kind})")
    print(f"parameters   {result['params'] / 1e9:.3f}B ({result['params']:,})")
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "rope_theta", "norm_eps",
                "max_seq_len"):
        print(f"{key:<12} {result['config'][key]}")
    if result["checkpoint_dtype"]:
        print(f"stored dtype {result['checkpoint_dtype']}")
    if result["files"]:
        print(f"files        {' '.join(result['files'])}")
    m = result["memory"]
    print(f"memory       {m['dtype']}: weights {human_bytes(m['weights'])} + KV cache "
          f"{human_bytes(m['kv_cache'])} ({m['context']} tokens x {m['batch']}) = {human_bytes(m['total'])}")


# ---- convert ---------------------------------------------------------------------------------------
def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="rewrite a checkpoint in the Meta, HF or native layout, or as GGUF")
    p.add_argument("src", help="checkpoint directory (Meta, HF or native layout) or a .gguf file")
    p.add_argument("dst", help="new directory to write (must not exist or be empty), or a .gguf file")
    p.add_argument("--to", required=True, choices=("meta", "hf", "native", "gguf"), help="layout to write")
    p.add_argument("--outtype", default="f16", choices=("f32", "f16", "q8_0", "q4_0"),
                   help="GGUF tensor type for 2-D weights (--to gguf; default f16)")
    p.add_argument("--shards", type=int, default=1, help="model-parallel files to split into (Meta layout only)")
    p.add_argument("--dtype", default=None, help="cast to float32, bfloat16 or float16 (default: keep the stored dtype)")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> None:
    import torch

    from .api import resolve_dtype
    from .checkpoint import convert, describe_checkpoint

    dtype = resolve_dtype(args.dtype, torch.device("cpu")) if args.dtype is not None else None
    out = convert(args.src, args.dst, to=args.to, shards=args.shards, dtype=dtype, outtype=args.outtype)
    info = describe_checkpoint(out)
    print(f"wrote {out}: {info['format']} layout, {info['dtype']}, {len(info['files'])} files "
          f"({', '.join(info['files'])})")


# ---- quantize --------------------------------------------------------------------------------------
def add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="weight-only int8 / int4 quantization of every linear layer")
    p.add_argument("src", help="checkpoint directory (any layout) or a .gguf file")
    p.add_argument("dst", help="directory to write (params.json, model.safetensors, quantization.json)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--int8", dest="mode", action="store_const", const="int8", help="int8, one scale per row")
    mode.add_argument("--int4", dest="mode", action="store_const", const="int4", help="int4 in groups")
    p.add_argument("--group-size", type=int, default=32, choices=(32, 64, 128, 256),
                   help="int4 group size (default 32)")
    p.add_argument("--output", default=None, choices=("int8", "int4", "none"),
                   help="quantization of the output projection (default: as the rest; none keeps it in float)")
    p.add_argument("--dtype", default="float32", help="activation / embedding dtype stored (default float32)")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args) -> None:
    from pathlib import Path

    from .api import load
    from .checkpoint import atomic_output, refuse_non_empty_output
    from .quantize import quantization_summary, save_quantized

    src, dst = Path(args.src).expanduser(), Path(args.dst).expanduser()
    if dst.resolve() == src.resolve():
        raise CodeLlamaError("the destination must differ from the source checkpoint")
    refuse_non_empty_output(dst)  # as convert does: stale files of another layout would confuse loading
    if args.output is None:
        llama = load(src, device="cpu", dtype=args.dtype, quantize=args.mode, group_size=args.group_size)
    else:
        from .quantize import quantize_model
        llama = load(src, device="cpu", dtype=args.dtype)
        quantize_model(llama.model, args.mode, args.group_size, output=args.output)
    with atomic_output(dst) as tmp:  # renamed into place only once complete
        save_quantized(llama.model, tmp, mode=args.mode, group_size=args.group_size if args.mode == "int4" else None)
        (tmp / "tokenizer.model").write_bytes(llama.tokenizer.model_proto)
    out = dst
    summary = quantization_summary(llama.model)
    kinds: dict[str, int] = {}
    for kind in summary["layers"].values():
        kinds[kind] = kinds.get(kind, 0) + 1
    print(f"wrote {out}: {', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))} layers, "
          f"weights {human_bytes(summary['weight_bytes'])}")
