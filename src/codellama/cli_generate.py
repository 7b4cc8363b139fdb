"""``codellama complete / infill / chat``: the generation commands, their shared options (sampling, penalties,
threads, text escapes) and the checks that make a new user's mistakes loud instead of silent."""

from __future__ import annotations

import json
import os
import re
import sys

from .errors import CodeLlamaError

FILL_MARKER = "<FILL_ME>"

# The escapes llama.cpp's tools decode in prompts (its --escape, on by default); anything else after a
# backslash is kept as typed, so "\d" in a regex survives.
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "'": "'", '"': '"', "\\": "\\"}
_ESCAPE_RE = re.compile(r"\\(.)", re.DOTALL)


def decode_escapes(text: str) -> str:
    """``\\n \\r \\t \\' \\" \\\\`` -> the characters they name, in one left-to-right pass."""
    return _ESCAPE_RE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(0)), text)


# ---- threads ---------------------------------------------------------------------------------------------
def default_threads() -> int:
    """Half the CPUs, at most 4: on a 2-core machine that is 1. Measured on the 2-core development box with the
    other core busy, a 64-token ``complete`` took 3.7-5.5 s with 1 thread and 3.2-8.8 s with 2 (the issue saw
    20 s vs 2.7 s): a second OpenMP thread waits on a core it does not get. The embedded and small models gain
    little beyond 4 threads."""
    return max(1, min(4, (os.cpu_count() or 1) // 2))


def add_threads_option(p) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the model (default: $OMP_NUM_THREADS if set, else half the CPUs, at most 4)")


def apply_threads(threads: int | None) -> int | None:
    """Set torch's intra-op threads: ``--threads``, else ``$OMP_NUM_THREADS`` (left to torch), else the default."""
    if threads is not None and threads < 1:
        raise CodeLlamaError(f"--threads must be >= 1, got {threads}")
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch
    n = threads if threads is not None else default_threads()
    torch.set_num_threads(n)
    return n


# ---- shared options --------------------------------------------------------------------------------------
def _add_generation_options(p) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory or .gguf file (default: the embedded model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model to use instead of the checkpoint's")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="tokens to generate at most (default 256); prompt + this must fit in the context")
    p.add_argument("--shrink-max-new-tokens", action="store_true",
                   help="if prompt + --max-new-tokens exceeds the context, generate up to the context's end "
                        "(finish_reason length) instead of failing")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--repeat-penalty", "--repetition-penalty", dest="repetition_penalty", type=float, default=None,
                   help="divide the logits of tokens seen in the last --repeat-last-n tokens (HF/llama.cpp; "
                        "1 = off, the default; 1.1 is a common choice)")
    p.add_argument("--presence-penalty", type=float, default=None,
                   help="subtract this from tokens already seen (OpenAI semantics, [-2, 2]; default 0)")
    p.add_argument("--frequency-penalty", type=float, default=None,
                   help="subtract this times the count of each seen token (OpenAI semantics, [-2, 2]; default 0)")
    p.add_argument("--repeat-last-n", dest="penalty_last_n", type=int, default=None,
                   help="penalty window over prompt + completion (default 64; 0 disables, -1 the whole sequence)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--raw", "--no-escape", dest="raw", action="store_true",
                   help="take text options literally: by default \\n \\r \\t \\' \\\" \\\\ in the prompt, "
                        "message, --system, --prefix, --suffix and --stop are decoded (text from stdin or "
                        "--file never is)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="raise the model's context length (beyond the trained context quality drops)")
    p.add_argument("--quantize", default=None, choices=("int8", "int4"),
                   help="quantize linear weights on load (int4 in groups of 32)")
    p.add_argument("--kv-cache-dtype", default=None, choices=("auto", "int8"),
                   help="KV cache storage: auto (the model's dtype, default) or int8 (about half of bf16's memory)")
    p.add_argument("--draft", default=None, metavar="PATH",
                   help="speculative decoding: a small draft model sharing the tokenizer proposes tokens that the "
                        "model verifies in one forward (same output; greedy: token for token)")
    p.add_argument("--speculative-k", type=int, default=4, metavar="K",
                   help="tokens the --draft proposes per round (default 4)")
    add_threads_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON result instead of streaming text")
    p.add_argument("--logprobs", action="store_true", help="include per-token logprobs in the --json output")


def _text(args, value: str | None) -> str | None:
    """A text option as given on the command line: escapes decoded unless ``--raw``."""
    return value if value is None or args.raw else decode_escapes(value)


def _read_arg(args, value: str | None, what: str) -> str:
    """The prompt or message: an argument (escapes decoded), or stdin for ``-`` (taken literally)."""
    if value is None or value == "-":
        if sys.stdin.isatty() and value is None:
            raise CodeLlamaError(f"no {what} given (pass it as an argument or '-' to read stdin)")
        try:
            return sys.stdin.read()
        except UnicodeDecodeError:
            raise CodeLlamaError(f"the {what} on stdin is not UTF-8 text") from None
    return _text(args, value)


def _generation_kwargs(args) -> dict:
    """The API keyword arguments of ``args``, every value checked before the (possibly slow) model load."""
    from .sampling import validate_penalties, validate_sampling

    validate_sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                      max_new_tokens=args.max_new_tokens)
    penalties = {k: getattr(args, k) for k in ("repetition_penalty", "presence_penalty", "frequency_penalty",
                                                "penalty_last_n") if getattr(args, k) is not None}
    validate_penalties(**penalties)
    if args.logprobs and not args.json:
        raise CodeLlamaError("--logprobs needs --json (the logprobs are part of the JSON result)")
    stops = [_text(args, s) for s in args.stop or []]
    if any(s == "" for s in stops):
        raise CodeLlamaError("--stop needs a non-empty string (an empty stop string would match at once)")
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, seed=args.seed, stop=stops, logprobs=args.logprobs, **penalties)
    if args.shrink_max_new_tokens:  # passed only when asked: the API's default is to refuse the overflow
        kwargs["shrink_max_new_tokens"] = True
    return kwargs


def _trained_context(path) -> int | None:
    """The context the checkpoint's config declares, read from its headers (None if they cannot be read:
    loading will then say why)."""
    from .api import DEFAULT_MODEL_DIR, resolve_model_path
    from .checkpoint import describe_checkpoint
    try:
        return describe_checkpoint(resolve_model_path(path) if path is not None
                                   else DEFAULT_MODEL_DIR)["config"].max_seq_len
    except (CodeLlamaError, OSError, KeyError, ValueError):
        return None


def load_for_generation(args, *, threads: bool = True):
    """Load ``args.model`` with the generation options (and set ``--threads`` unless ``threads=False``); warns
    when ``--max-seq-len`` exceeds the trained context."""
    from .api import load

    if getattr(args, "speculative_k", 4) < 1:
        raise CodeLlamaError(f"--speculative-k must be >= 1, got {args.speculative_k}")
    if threads:
        apply_threads(args.threads)
    if args.max_seq_len is not None:
        trained = _trained_context(args.model)
        if trained is not None and args.max_seq_len > trained:
            print(f"warning: --max-seq-len {args.max_seq_len} is beyond the model's trained context ({trained} "
                  "tokens); output past it degrades unless the model extrapolates (Code Llama: up to ~100k)",
                  file=sys.stderr)
    return load(args.model, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer,
                max_seq_len=args.max_seq_len, quantize=getattr(args, "quantize", None),
                kv_cache_dtype=getattr(args, "kv_cache_dtype", None), draft=getattr(args, "draft", None),
                speculative_k=getattr(args, "speculative_k", 4), tensor_parallel=under_torchrun())


def under_torchrun() -> bool:
    """Launched as one of several torchrun processes: run tensor-parallel, and only rank 0 prints results (the
    others' stdout goes to /dev/null; every rank still reports its errors)."""
    from .training.distributed import torchrun_world_size

    if torchrun_world_size() < 2:
        return False
    if os.environ.get("RANK", "0") != "0" and not getattr(sys.stdout, "_codellama_quiet", False):
        sys.stdout = open(os.devnull, "w")
        sys.stdout._codellama_quiet = True
    return True


def _emit(llama, run, args, extra=None):
    """Stream ``run(stream=True)`` to stdout, or print one JSON object with ``--json``; returns the Completion."""
    import time

    t0 = time.perf_counter()
    if not args.json:
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
    completion = run(stream=False)
    seconds = time.perf_counter() - t0
    out = {"model": llama.name, "text": completion.text, "tokens": completion.tokens,
           "finish_reason": completion.finish_reason, "prompt_tokens": completion.prompt_tokens,
           "completion_tokens": len(completion.tokens), "seconds": round(seconds, 4)}
    if completion.logprobs is not None:
        out["logprobs"] = completion.logprobs
    if getattr(completion, "speculative", None) is not None:  # a draft ran: its acceptance stats
        out["speculative"] = completion.speculative
    from .tensor_parallel import tp_size
    out["tp_size"] = tp_size(getattr(llama, "model", None))
    out.update(extra(completion) if callable(extra) else extra or {})
    print(json.dumps(out, ensure_ascii=False))
    return completion


# ---- complete --------------------------------------------------------------------------------------------
def add_complete(sub) -> None:
    p = sub.add_parser("complete", help="continue a prompt (streams the completion)")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt text, or - to read it from stdin")
    _add_generation_options(p)
    p.set_defaults(func=cmd_complete)


def cmd_complete(args) -> None:
    kwargs = _generation_kwargs(args)
    prompt = _read_arg(args, args.prompt, "prompt")
    if not prompt:
        raise CodeLlamaError("the prompt is empty (give the text to continue)")
    llama = load_for_generation(args)
    _emit(llama, lambda stream: llama.complete(prompt, stream=stream, **kwargs), args)


# ---- infill ----------------------------------------------------------------------------------------------
def add_infill(sub) -> None:
    p = sub.add_parser("infill", help="fill in the middle between a prefix and a suffix (streams the middle)")
    p.add_argument("--prefix", default=None, help="text before the gap")
    p.add_argument("--suffix", default=None, help="text after the gap")
    p.add_argument("--file", default=None, help=f"a UTF-8 file with one {FILL_MARKER} marker where the middle "
                   "goes (- reads stdin)")
    p.add_argument("--spm", action="store_true", help="suffix-prefix-middle prompt order instead of PSM")
    _add_generation_options(p)
    p.set_defaults(func=cmd_infill)


def _read_marked_file(name: str) -> tuple[str, str]:
    try:
        if name == "-":
            text = sys.stdin.read()
        else:
            with open(name, encoding="utf-8") as f:
                text = f.read()
    except OSError as e:
        raise CodeLlamaError(f"cannot read {name}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise CodeLlamaError(f"{'stdin' if name == '-' else name} is not UTF-8 text (byte {e.start})") from None
    if text.count(FILL_MARKER) != 1:
        raise CodeLlamaError(f"{name} must contain exactly one {FILL_MARKER} marker, found {text.count(FILL_MARKER)}")
    prefix, suffix = text.split(FILL_MARKER)
    return prefix, suffix


def cmd_infill(args) -> None:
    kwargs = _generation_kwargs(args)
    if args.file is not None:
        if args.prefix is not None or args.suffix is not None:
            raise CodeLlamaError("use either --file or --prefix/--suffix, not both")
        prefix, suffix = _read_marked_file(args.file)
    else:
        if args.prefix is None and args.suffix is None:
            raise CodeLlamaError("give --prefix and/or --suffix, or --file with a <FILL_ME> marker")
        prefix, suffix = _text(args, args.prefix) or "", _text(args, args.suffix) or ""
    llama = load_for_generation(args)
    _emit(llama, lambda stream: llama.infill(prefix, suffix, suffix_first=args.spm, stream=stream, **kwargs),
          args, extra=lambda c: {"filled": prefix + c.text + suffix})


# ---- chat ------------------------------------------------------------------------------------------------
def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="talk to an Instruct model: one message, or a REPL on a terminal")
    p.add_argument("message", nargs="?", default=None,
                   help="the user message (- reads stdin); omit on a terminal for an interactive session")
    p.add_argument("--system", default=None, help="system prompt")
    _add_generation_options(p)
    p.set_defaults(func=cmd_chat)


def looks_instruct(llama) -> bool:
    """Whether the model was tuned for chat: its name says Instruct, or its tokenizer has 70B-Instruct's
    ``<step>``. Base and Python models were never trained on ``[INST]`` prompts (the embedded model is a base
    model); a fine-tune under another name gets a warning it can ignore."""
    name = (llama.name or "").lower()
    return "instruct" in name or getattr(llama.tokenizer, "step_id", None) is not None


def cmd_chat(args) -> None:
    kwargs = _generation_kwargs(args)
    system_text = _text(args, args.system)
    system = [{"role": "system", "content": system_text}] if system_text else []
    interactive = args.message is None and sys.stdin.isatty()
    message = None if interactive else _read_arg(args, args.message, "message")
    if message is not None and not message.strip():
        raise CodeLlamaError("the message is empty")
    if args.model is None:
        from .api import DEFAULT_INSTRUCT_DIR
        if (DEFAULT_INSTRUCT_DIR / "params.json").is_file():  # chat's default: the embedded Instruct model
            args.model = "default-instruct"
    llama = load_for_generation(args)
    if message is not None:  # a refused message gets its one-line error, not a warning about the model first
        from .formats import chat_tokens
        chat_tokens(llama.tokenizer, system + [{"role": "user", "content": message}])
    if not looks_instruct(llama):
        print(f"warning: {llama.name or 'this model'} does not look like an Instruct model (no 'Instruct' in its "
              "name): base models were not trained to follow chat prompts; use complete, or an Instruct model",
              file=sys.stderr)
    if not interactive:
        _emit(llama, lambda stream: llama.chat(system + [{"role": "user", "content": message}],
                                               stream=stream, **kwargs), args)
        return
    _repl(llama, args, system, kwargs)


def _repl(llama, args, system: list[dict[str, str]], kwargs: dict) -> None:
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
            completion = _emit(llama, lambda stream, turns=dialog: llama.chat(system + turns, stream=stream, **kwargs),
                               args)
        except CodeLlamaError as e:  # e.g. a special tag in the message: say so and keep the session
            print(f"error: {e}", file=sys.stderr)
            continue
        history = dialog + [{"role": "assistant", "content": completion.text}]
