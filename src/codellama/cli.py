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
    p = sub.add_parser("convert", help="rewrite a checkpoint in the Meta, HF or native layout, or as GGUF")
    p.add_argument("src", help="checkpoint directory (Meta, HF or native layout) or a .gguf file")
    p.add_argument("dst", help="new directory to write (must not exist or be empty), or a .gguf file")
    p.add_argument("--to", required=True, choices=("meta", "hf", "native", "gguf"), help="layout to write")
    p.add_argument("--outtype", default="f16", choices=("f32", "f16", "q8_0"),
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
def _add_quantize(sub) -> None:
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
    from .quantize import quantization_summary, save_quantized

    src = Path(args.src).expanduser()
    if Path(args.dst).expanduser().resolve() == src.resolve():
        raise CodeLlamaError("the destination must differ from the source checkpoint")
    if args.output is None:
        llama = load(src, device="cpu", dtype=args.dtype, quantize=args.mode, group_size=args.group_size)
    else:
        from .quantize import quantize_model
        llama = load(src, device="cpu", dtype=args.dtype)
        quantize_model(llama.model, args.mode, args.group_size, output=args.output)
    out = save_quantized(llama.model, args.dst, mode=args.mode,
                         group_size=args.group_size if args.mode == "int4" else None)
    (out / "tokenizer.model").write_bytes(llama.tokenizer.model_proto)
    summary = quantization_summary(llama.model)
    kinds: dict[str, int] = {}
    for kind in summary["layers"].values():
        kinds[kind] = kinds.get(kind, 0) + 1
    print(f"wrote {out}: {', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))} layers, "
          f"weights {_human_bytes(summary['weight_bytes'])}")


# ---- complete / infill / chat ---------------------------------------------------------------------
def _add_generation_options(p) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model to use instead of the checkpoint's")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop string (repeatable; \\n and \\t escapes are understood)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU)")
    p.add_argument("--max-seq-len", type=int, default=None, help="raise the model's context length")
    p.add_argument("--quantize", default=None, choices=("int8", "int4"),
                   help="quantize linear weights on load (int4 in groups of 32)")
    p.add_argument("--json", action="store_true", help="print one JSON result instead of streaming text")
    p.add_argument("--logprobs", action="store_true", help="include per-token logprobs in --json output")


def _read_arg(value: str | None, what: str) -> str:
    if value is None or value == "-":
        if sys.stdin.isatty() and value is None:
            raise CodeLlamaError(f"no {what} given (pass it as an argument or '-' to read stdin)")
        return sys.stdin.read()
    return value


def _unescape(text: str) -> str:
    return text.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t").replace("\0", "\\")


def _sampling_kwargs(args) -> dict:
    from .sampling import validate_sampling

    # Bad values fail before the (possibly slow) model load.
    validate_sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                      max_new_tokens=args.max_new_tokens)
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, stop=[_unescape(s) for s in args.stop or []],
                logprobs=bool(args.json and args.logprobs))


def _load_for_generation(args):
    from .api import load
    return load(args.model, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer,
                max_seq_len=args.max_seq_len, quantize=getattr(args, "quantize", None))


def _emit(llama, run, args, extra: dict | None = None):
    """Stream ``run(stream=True)`` to stdout, or print one JSON object with ``--json``; returns the Completion."""
    import time

    t0 = time.perf_counter()
    if args.json:
        completion = run(stream=False)
    else:
        stream = run(stream=True)
        while True:
            try:
                delta = next(stream)
            except StopIteration as done:
                completion = done.value
                break
            sys.stdout.write(delta)
            sys.stdout.flush()
        if sys.stdout.isatty() and not completion.text.endswith("\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()
        return completion
    seconds = time.perf_counter() - t0
    out = {"model": llama.name, "text": completion.text, "tokens": completion.tokens,
           "finish_reason": completion.finish_reason, "prompt_tokens": completion.prompt_tokens,
           "completion_tokens": len(completion.tokens), "seconds": round(seconds, 4)}
    if completion.logprobs is not None:
        out["logprobs"] = completion.logprobs
    out.update(extra(completion) if callable(extra) else extra or {})
    print(json.dumps(out, ensure_ascii=False))
    return completion


def _add_complete(sub) -> None:
    p = sub.add_parser("complete", help="continue a prompt (streams the completion)")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt text, or - to read it from stdin")
    _add_generation_options(p)
    p.set_defaults(func=cmd_complete)


def cmd_complete(args) -> None:
    kwargs = _sampling_kwargs(args)
    prompt = _read_arg(args.prompt, "prompt")
    llama = _load_for_generation(args)
    _emit(llama, lambda stream: llama.complete(prompt, stream=stream, **kwargs), args)


FILL_MARKER = "<FILL_ME>"


def _add_infill(sub) -> None:
    p = sub.add_parser("infill", help="fill in the middle between a prefix and a suffix (streams the middle)")
    p.add_argument("--prefix", default=None, help="text before the gap")
    p.add_argument("--suffix", default=None, help="text after the gap")
    p.add_argument("--file", default=None, help=f"a file with one {FILL_MARKER} marker where the middle goes "
                   "(- reads stdin)")
    p.add_argument("--spm", action="store_true", help="suffix-prefix-middle prompt order instead of PSM")
    _add_generation_options(p)
    p.set_defaults(func=cmd_infill)


def cmd_infill(args) -> None:
    kwargs = _sampling_kwargs(args)
    if args.file is not None:
        if args.prefix is not None or args.suffix is not None:
            raise CodeLlamaError("use either --file or --prefix/--suffix, not both")
        if args.file == "-":
            text = sys.stdin.read()
        else:
            try:
                text = open(args.file, encoding="utf-8").read()
            except OSError as e:
                raise CodeLlamaError(f"cannot read {args.file}: {e.strerror}") from None
        if text.count(FILL_MARKER) != 1:
            raise CodeLlamaError(f"{args.file} must contain exactly one {FILL_MARKER} marker, "
                                 f"found {text.count(FILL_MARKER)}")
        prefix, suffix = text.split(FILL_MARKER)
    else:
        if args.prefix is None and args.suffix is None:
            raise CodeLlamaError("give --prefix and/or --suffix, or --file with a <FILL_ME> marker")
        prefix, suffix = args.prefix or "", args.suffix or ""
    llama = _load_for_generation(args)
    _emit(llama, lambda stream: llama.infill(prefix, suffix, suffix_first=args.spm, stream=stream, **kwargs),
          args, extra=lambda c: {"filled": prefix + c.text + suffix})


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="talk to an Instruct model: one message, or a REPL on a terminal")
    p.add_argument("message", nargs="?", default=None,
                   help="the user message (- reads stdin); omit on a terminal for an interactive session")
    p.add_argument("--system", default=None, help="system prompt")
    _add_generation_options(p)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args) -> None:
    kwargs = _sampling_kwargs(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    interactive = args.message is None and sys.stdin.isatty()
    message = None if interactive else _read_arg(args.message, "message")
    if message is not None and not message.strip():
        raise CodeLlamaError("the message is empty")
    llama = _load_for_generation(args)
    if not interactive:
        _emit(llama, lambda stream: llama.chat(system + [{"role": "user", "content": message}],
                                               stream=stream, **kwargs), args)
        return
    try:
        import readline  # noqa: F401  (line editing and up-arrow history for input())
    except ImportError:
        pass
    print(f"chatting with {llama.name or 'the model'}; /reset clears the history, /exit or Ctrl-D quits",
          file=sys.stderr)
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = []
            continue
        dialog = history + [{"role": "user", "content": line}]
        try:
            completion = _emit(llama, lambda stream: llama.chat(system + dialog, stream=stream, **kwargs), args)
        except CodeLlamaError as e:  # e.g. a special tag in the message: say so and keep the session
            print(f"error: {e}", file=sys.stderr)
            continue
        history = dialog + [{"role": "assistant", "content": completion.text}]


# ---- train -----------------------------------------------------------------------------------------------
def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train with a recipe (code training with FIM, long-context fine-tuning)")
    p.add_argument("recipe", help="a recipe .toml file or a bundled recipe name "
                                     "(tiny-pretrain, tiny-pretrain-wide, tiny-lcft)")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--out-dir", default=None, help="override the recipe's out_dir")
    p.add_argument("--max-steps", type=int, default=None, help="override the recipe's max_steps")
    p.add_argument("--device", default=None, help="override the recipe's device (auto, cpu, cuda)")
    p.add_argument("--until-step", type=int, default=None,
                   help="stop after this step (checkpointed) without changing the schedule; resume later")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the JSONL log is still written)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> None:
    from .training.trainer import load_recipe, train

    config = load_recipe(args.recipe, out_dir=args.out_dir, max_steps=args.max_steps, device=args.device,
                         progress=False if args.no_progress else None)
    summary = train(config, resume=args.resume, until_step=args.until_step)
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
                   help="CPU threads for the model (default: torch's; 1 is faster on a busy shared CPU)")
    p.add_argument("--api-key", default=os.environ.get("CODELLAMA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $CODELLAMA_API_KEY; none: open)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU)")
    p.add_argument("--max-seq-len", type=int, default=None, help="raise the model's context length")
    p.add_argument("--quantize", default=None, choices=("int8", "int4"), help="quantize linear weights on load")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> None:
    for name in ("max_batch_size", "context", "max_tokens", "max_body_bytes", "threads", "max_connections"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CodeLlamaError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.body_timeout > 0:  # also refuses nan
        raise CodeLlamaError(f"--body-timeout must be > 0 seconds, got {args.body_timeout}")
    if args.max_queue < 0 or not 0 <= args.port <= 65535:
        raise CodeLlamaError("--max-queue must be >= 0 and --port in [0, 65535]")
    from .serving.app import ServerConfig, create_app, serve
    from .serving.scheduler import Engine

    llama = _load_for_generation(args)
    engine = Engine(llama, max_batch_size=args.max_batch_size, max_queue=args.max_queue, context=args.context,
                    threads=args.threads)
    config = ServerConfig(model_name=args.name or llama.name or "codellama", api_key=args.api_key or None,
                          max_body_bytes=args.max_body_bytes, max_tokens_cap=args.max_tokens,
                          body_timeout_s=args.body_timeout, max_connections=args.max_connections)
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="codellama", description="Code Llama: run, infill, chat, serve, train, evaluate.")
    parser.add_argument("--version", action="version", version="codellama " + __import__("codellama").__version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in (_add_info, _add_convert, _add_quantize, _add_complete, _add_infill, _add_chat, _add_serve, _add_train,
                _add_eval):
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
