"""``codellama`` command line: a thin layer over the Python API. Every subcommand is a ``_add_*`` function
that declares its arguments and a ``cmd_*`` function that calls the API."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from .errors import CodeLlamaError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as for every other bad input
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


# ---- info ------------------------------------------------------------------------------------------
def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show a checkpoint's config, size and memory needs")
    p.add_argument("path", nargs="?", default=None, help="checkpoint directory or released model name "
                   "(e.g. CodeLlama-34b); default: the embedded model")
    p.add_argument("--context", type=int, default=None, help="context length for the KV-cache estimate")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> None:
    import torch

    from .api import DEFAULT_MODEL_DIR, resolve_dtype
    from .checkpoint import describe_checkpoint

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
    print(f"memory       {m['dtype']}: weights {_human_bytes(m['weights'])} + KV cache "
          f"{_human_bytes(m['kv_cache'])} ({m['context']} tokens x {m['batch']}) = {_human_bytes(m['total'])}")


# ---- convert ---------------------------------------------------------------------------------------
def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="rewrite a checkpoint in the Meta, HF or native layout")
    p.add_argument("src", help="checkpoint directory (Meta, HF or native layout)")
    p.add_argument("dst", help="new directory to write (must not exist or be empty)")
    p.add_argument("--to", required=True, choices=("meta", "hf", "native"), help="layout to write")
    p.add_argument("--shards", type=int, default=1, help="model-parallel files to split into (Meta layout only)")
    p.add_argument("--dtype", default=None, help="cast to float32, bfloat16 or float16 (default: keep the stored dtype)")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> None:
    import torch

    from .api import resolve_dtype
    from .checkpoint import convert, describe_checkpoint

    dtype = resolve_dtype(args.dtype, torch.device("cpu")) if args.dtype is not None else None
    out = convert(args.src, args.dst, to=args.to, shards=args.shards, dtype=dtype)
    info = describe_checkpoint(out)
    print(f"wrote {out}: {info['format']} layout, {info['dtype']}, {len(info['files'])} files "
          f"({', '.join(info['files'])})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="codellama", description="Code Llama: run, infill, chat, serve, train, evaluate.")
    parser.add_argument("--version", action="version", version="codellama " + __import__("codellama").__version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in (_add_info, _add_convert,):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        args.func(args)
    except CodeLlamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # an internal bug: still one line unless asked for the traceback
        if os.environ.get("CODELLAMA_DEBUG"):
            raise
        print(f"error: internal error: {type(e).__name__}: {e} (set CODELLAMA_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
