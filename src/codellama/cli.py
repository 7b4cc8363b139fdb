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
    from .api import DEFAULT_MODEL_DIR, resolve_dtype
    from .checkpoint import describe_checkpoint

    import torch
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    info = describe_checkpoint(args.path if args.path is not None else DEFAULT_MODEL_DIR)
    config = info["config"]
    mem = config.memory_estimate(args.context, args.batch, dtype)
    result = {"name": config.name or str(args.path), "format": info["format"],
              "checkpoint_dtype": info.get("dtype"), "files": info.get("files", []),
              "params": config.num_params(), "config": config.to_params() | {"hidden_dim": config.ffn_hidden},
              "memory": {"dtype": str(dtype).removeprefix("torch."),
                         "context": args.context or config.max_seq_len, "batch": args.batch, **mem}}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"model        {result['name']}  ({result['format']} checkpoint)")
    print(f"parameters   {result['params'] / 1e9:.3f}B ({result['params']:,})")
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "rope_theta", "norm_eps"):
        print(f"{key:<12} {result['config'].get(key, config.n_heads)}")
    print(f"max_seq_len  {config.max_seq_len}")
    if result["checkpoint_dtype"]:
        print(f"stored dtype {result['checkpoint_dtype']}")
    m = result["memory"]
    print(f"memory       {m['dtype']}: weights {_human_bytes(m['weights'])} + KV cache "
          f"{_human_bytes(m['kv_cache'])} ({m['context']} tokens x {m['batch']}) = {_human_bytes(m['total'])}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="codellama", description="Code Llama: run, infill, chat, serve, train, evaluate.")
    parser.add_argument("--version", action="version", version="codellama " + __import__("codellama").__version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in (_add_info,):
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
