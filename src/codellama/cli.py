"""``codellama`` command line: a thin layer over the Python API. Every subcommand is an ``add_*`` function
that declares its arguments and a ``cmd_*`` function that calls the API: info/convert/quantize live in
``cli_models.py``, complete/infill/chat in ``cli_generate.py``, eval in ``evaluation/command.py``. Nothing
here imports torch at start-up, so ``--help`` and ``--version`` answer at once."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Sequence

from .cli_generate import add_chat, add_complete, add_infill, default_threads, load_for_generation
from .cli_models import add_convert, add_info, add_quantize
from .errors import CodeLlamaError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as for every other bad input
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


# ---- train -----------------------------------------------------------------------------------------------
def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train with a recipe (code training with FIM, long-context fine-tuning)")
    p.add_argument("recipe", help="a recipe .toml file or a bundled recipe name "
                                     "(tiny-pretrain, tiny-pretrain-wide, tiny-lcft)")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--init", default=None, metavar="PATH",
                   help="start from this checkpoint (Meta, HF, native, GGUF, or a training run); overrides "
                        "the recipe's init_from; its tokenizer is used")
    p.add_argument("--plan", action="store_true",
                   help="print the per-rank memory plan of the run and exit (exit 2 if it cannot fit)")
    p.add_argument("--nproc", type=int, default=None,
                   help="world size for --plan (default: torchrun's WORLD_SIZE, else 1)")
    p.add_argument("--out-dir", default=None, help="override the recipe's out_dir")
    p.add_argument("--max-steps", type=int, default=None, help="override the recipe's max_steps")
    p.add_argument("--device", default=None, help="override the recipe's device (auto, cpu, cuda)")
    p.add_argument("--until-step", type=int, default=None,
                   help="stop after this step (checkpointed) without changing the schedule; resume later")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the JSONL log is still written)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (overrides the recipe's num_threads; default: the recipe's, else torch's)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> None:
    from .training.trainer import load_recipe, train

    if args.threads is not None and args.threads < 1:
        raise CodeLlamaError(f"--threads must be >= 1, got {args.threads}")
    if args.nproc is not None and args.nproc < 1:
        raise CodeLlamaError(f"--nproc must be >= 1, got {args.nproc}")
    config = load_recipe(args.recipe, out_dir=args.out_dir, max_steps=args.max_steps, device=args.device,
                         progress=False if args.no_progress else None, num_threads=args.threads,
                         init_from=args.init)
    if args.plan:
        from .training.plan import memory_plan
        plan = memory_plan(config, world_size=args.nproc)
        print(plan.table())
        plan.check()
        return
    summary = train(config, resume=args.resume, until_step=args.until_step)
    if summary.get("rank", 0) == 0:
        print(json.dumps(summary, indent=2))


# ---- serve -----------------------------------------------------------------------------------------
def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="HTTP server: OpenAI /v1/completions, /v1/chat/completions, llama.cpp /infill")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model to use instead of the checkpoint's")
    p.add_argument("--name", default=None, help="model id reported by /v1/models (default: the checkpoint's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (0 picks a free one; default 8080)")
    p.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64, help="sequences that may wait for a slot; beyond, 503")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per sequence (prompt + completion; default: the model's max_seq_len)")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on max_tokens / n_predict (default: context)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="request body limit (default 4 MiB)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body may take to arrive; slower ones get 408 (default 30)")
    p.add_argument("--max-connections", type=int, default=512,
                   help="open connections and requests at once; beyond, new requests get 503 (default 512)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the model (default: $OMP_NUM_THREADS if set, else half the CPUs, "
                        "at most 4, as the other commands)")
    p.add_argument("--api-key", default=os.environ.get("CODELLAMA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $CODELLAMA_API_KEY; none: open)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU)")
    p.add_argument("--max-seq-len", type=int, default=None, help="raise the model's context length")
    p.add_argument("--quantize", default=None, choices=("int8", "int4"), help="quantize linear weights on load")
    p.add_argument("--kv-cache-dtype", default=None, choices=("auto", "int8"),
                   help="KV cache storage: auto (the model's dtype, default) or int8 (about half of bf16's memory)")
    p.add_argument("--draft", default=None, metavar="PATH",
                   help="speculative decoding with this draft model (requests then run one at a time)")
    p.add_argument("--speculative-k", type=int, default=4, metavar="K", help="tokens the --draft proposes per round")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> None:
    for name in ("max_batch_size", "context", "max_tokens", "max_body_bytes", "threads", "max_connections"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CodeLlamaError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.body_timeout > 0:  # also refuses nan
        raise CodeLlamaError(f"--body-timeout must be > 0 seconds, got {args.body_timeout}")
    if args.max_queue < 0:
        raise CodeLlamaError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise CodeLlamaError(f"--port must be in [0, 65535], got {args.port}")
    llama = load_for_generation(args, threads=False)  # the engine thread sets its own threads
    if args.context is not None and args.context > llama.config.max_seq_len:
        raise CodeLlamaError(f"--context {args.context} exceeds the model's context ({llama.config.max_seq_len} "
                             "tokens); raise that with --max-seq-len if the model extrapolates")
    from .serving.app import ServerConfig, create_app, serve
    from .serving.scheduler import Engine
    from .tensor_parallel import tp_size

    # The same default as the other commands: on the 2-core development box, 1 engine thread served 1 client at
    # ~285 tok/s against ~185 with 2 (the event loop needs the other core) and 16 clients no slower.
    threads = args.threads
    if threads is None and not os.environ.get("OMP_NUM_THREADS"):
        threads = default_threads()
    engine_args = dict(max_batch_size=args.max_batch_size, max_queue=args.max_queue, context=args.context,
                       threads=threads, kv_cache_dtype=llama.kv_cache_dtype)
    lockstep = None
    if tp_size(llama.model) > 1:  # under torchrun: rank 0 serves, the other ranks replay its engine
        from .serving.lockstep import Lockstep
        lockstep = Lockstep()
        if not lockstep.leader:
            from .serving.follower import follow
            return follow(llama, **engine_args)
    if llama.draft is not None:
        from .serving.speculative_engine import SpeculativeEngine
        engine = SpeculativeEngine(llama, **engine_args)
    else:
        engine = Engine(llama, **engine_args, lockstep=lockstep)
    config = ServerConfig(model_name=args.name or llama.name or "codellama", api_key=args.api_key or None,
                          max_body_bytes=args.max_body_bytes, max_tokens_cap=args.max_tokens,
                          body_timeout_s=args.body_timeout, max_connections=args.max_connections,
                          kv_cache_dtype=llama.kv_cache_dtype)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)

    def ready(url: str) -> None:
        print(f"serving {config.model_name} on {url} (batch {engine.max_batch_size}, context {engine.context})",
              file=sys.stderr, flush=True)
    serve(create_app(llama, engine=engine, config=config), args.host, args.port, log_level=args.log_level,
          on_ready=ready)


# ---- eval ------------------------------------------------------------------------------------------
def _add_eval(sub) -> None:
    from .evaluation.command import add_parser  # the subcommands and their cmd functions live there
    add_parser(sub, _Parser)


# ---- self-instruct ---------------------------------------------------------------------------------
def _add_self_instruct(sub) -> None:
    from .selfinstruct.command import add_parser  # the stages live there
    add_parser(sub, _Parser)


# ---- bench ---------------------------------------------------------------------------------------
def _add_bench(sub) -> None:
    from .bench.command import add_parser  # latency, predict
    add_parser(sub, _Parser)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="codellama", description="Code Llama: run, infill, chat, serve, train, evaluate.")
    parser.add_argument("--version", action="version", version="codellama " + __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in (add_info, add_convert, add_quantize, add_complete, add_infill, add_chat, _add_serve, _add_train,
                _add_eval, _add_self_instruct, _add_bench):
        add(sub)
    return parser


def interrupted() -> int:
    """Ctrl-C: one line and the shell's exit status for SIGINT (128 + 2). A second Ctrl-C while Python shuts
    down (joining threads, flushing) would print a traceback from wherever it lands: ignore it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        print("interrupted", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
    return 130


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
    except KeyboardInterrupt:  # at any moment: while parsing, importing torch, loading or generating
        return interrupted()


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        args.func(args)
    except CodeLlamaError as e:
        print(f"error: {_rank_prefix()}{e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # stdout's reader left (``| head``): stop quietly, and keep the interpreter's final flush from failing.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except KeyboardInterrupt:
        raise
    except Exception as e:  # an internal bug: still one line unless asked for the traceback
        if os.environ.get("CODELLAMA_DEBUG"):
            raise
        print(f"error: internal error: {type(e).__name__}: {e} (set CODELLAMA_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1
    return 0


def _rank_prefix() -> str:
    # Under torchrun every rank reports its own errors; rank 0's read as a single process's would.
    rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else "0"
    return "" if rank == "0" else f"rank {rank}: "


if __name__ == "__main__":
    sys.exit(main())
