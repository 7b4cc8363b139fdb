"""``codellama bench``: ``latency`` (measured, with the performance model's prediction beside every row) and
``predict`` (the performance model alone, for any released shape on any hardware profile). ``cli.py`` only
registers ``add_parser``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import CodeLlamaError


def _ints(text: str) -> list[int]:
    try:
        values = [int(float(v[:-1]) * 1000) if v.lower().endswith("k") else int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (1k = 1000), got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_parser(sub, parser_class) -> None:
    bench = sub.add_parser("bench", help="latency and throughput as context grows, and the performance model")
    cmds = bench.add_subparsers(dest="bench_command", metavar="COMMAND", parser_class=parser_class)
    bench.set_defaults(func=_need_command)

    p = cmds.add_parser("latency", help="time to first token and per output token at batch 1, per context length")
    p.add_argument("--model", default="CodeLlama-7b",
                   help="a released name (random weights at its exact shape) or a checkpoint path")
    p.add_argument("--context", type=_ints, default=[1000, 4000, 16000], help="context lengths, e.g. 1k,16k,100k")
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16", "int8", "int4"])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--layers", type=int, default=None,
                   help="time a K-block slice at the exact dimensions and scale it to the whole depth")
    p.add_argument("--check-slice", action="store_true",
                   help="with --layers: also time the whole model and print scaled-slice / whole ratios")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--hardware", default=None, help="profile for the predicted column (default: local for cpu)")
    p.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")
    p.set_defaults(func=cmd_latency)

    p = cmds.add_parser("throughput", help="concurrency sweep through the serving engine: tokens/s, requests/s, "
                        "TTFT and per-token latency percentiles")
    p.add_argument("--model", default=None, help="a checkpoint path or released name (default: the embedded model)")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16", "int8", "int4"],
                   help="for a released name (random weights)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--concurrency", type=_ints, default=[1, 2, 4, 8, 16])
    p.add_argument("--context", type=int, default=512, help="prompt tokens (the multi-file workload)")
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="requests per cache row")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the engine (as serve --threads)")
    p.add_argument("--hardware", default=None, help="profile for the predicted column (default: local for cpu)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_throughput)

    p = cmds.add_parser("report", help="the 34B-vs-70B report: markdown + PNG plots (predicted, plus measured rows)")
    p.add_argument("--out", default="docs/bench-report.md")
    p.add_argument("--measured", nargs="+", default=None, metavar="ROWS.jsonl",
                   help="rows from `codellama bench latency|throughput --json` to include (measured vs predicted)")
    p.set_defaults(func=cmd_report)

    p = cmds.add_parser("predict", help="predicted prefill, decode and memory for a shape on a hardware profile")
    p.add_argument("--model", required=True, help="a released name, e.g. CodeLlama-34b")
    p.add_argument("--context", type=int, required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16", "int8", "int4"])
    p.add_argument("--kv-dtype", default=None, choices=["fp32", "bf16", "fp16", "int8"])
    p.add_argument("--hardware", default="H100-SXM", help="A100-80GB, H100-SXM, H200 or local")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)


def _need_command(args) -> None:
    raise CodeLlamaError("bench needs a command: latency, throughput, predict or report (codellama bench --help)")


def cmd_predict(args) -> None:
    from ..config import ModelConfig
    from .perf_model import predict

    if args.context < 1 or args.batch < 1 or args.tp < 1:
        raise CodeLlamaError("--context, --batch and --tp must be >= 1")
    config = ModelConfig.from_name(args.model)
    result = predict(config, args.context, batch=args.batch, dtype=args.dtype, hardware=args.hardware, tp=args.tp,
                     kv_dtype=args.kv_dtype).to_json()
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>24}  {value}")


def cmd_latency(args) -> None:
    import torch

    from ..api import DEFAULT_MODEL_DIR, resolve_device
    from ..tokenizer import Tokenizer
    from .latency import model_config, slice_check, time_generation, time_shape
    from .perf_model import predict
    from .workload import multi_file_prompt

    if args.output_tokens < 1 or args.repeats < 1:
        raise CodeLlamaError("--output-tokens and --repeats must be >= 1")
    if args.check_slice and (args.layers is None or Path(args.model).expanduser().exists()):
        raise CodeLlamaError("--check-slice needs --layers K and a released model name (random weights)")
    if args.threads:
        torch.set_num_threads(args.threads)
    tp, device = _tensor_parallel(resolve_device(args.device))
    if args.check_slice and tp > 1:
        raise CodeLlamaError("--check-slice runs in one process")
    hardware = args.hardware or ("local" if device.type == "cpu" and tp == 1 else None)
    tokenizer = Tokenizer(DEFAULT_MODEL_DIR / "tokenizer.model")
    checkpoint = None
    if Path(args.model).expanduser().exists():  # a real checkpoint, timed whole with its own tokenizer
        from ..api import load
        checkpoint = load(args.model, device=device, dtype=None if args.dtype in ("int8", "int4") else
                          {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[args.dtype],
                          quantize=args.dtype if args.dtype in ("int8", "int4") else None, tensor_parallel=tp > 1)
        tokenizer = checkpoint.tokenizer
    rows = []
    models: dict = {}  # the random-weight models, built once for every context of the sweep
    for context in args.context:
        prompt = multi_file_prompt(tokenizer, context).tokens
        if checkpoint is not None:
            config = checkpoint.config
            if context + args.output_tokens > config.max_seq_len:
                raise CodeLlamaError(f"context {context} + {args.output_tokens} output tokens exceeds the "
                                     f"checkpoint's {config.max_seq_len}")
            timing, how = time_generation(checkpoint.model, prompt, args.output_tokens, args.repeats), \
                {"method": "whole", "layers_timed": config.n_layers}
        elif args.check_slice:
            config = model_config(args.model, context, args.output_tokens)
            check = slice_check(config, args.dtype, device, prompt, args.output_tokens, args.layers, args.repeats)
            row = {"model": args.model, "dtype": args.dtype, "device": str(device), "context": context,
                   "method": "slice-check", **check}
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"{args.model} {args.dtype} context {context}: {args.layers}-layer slice scaled / whole = "
                      f"TTFT {check['ttft_ratio']:.3f} ({check['sliced']['ttft_s']:.3f} / "
                      f"{check['whole']['ttft_s']:.3f} s), TPOT {check['tpot_ratio']:.3f} "
                      f"({check['sliced']['tpot_s'] * 1000:.1f} / {check['whole']['tpot_s'] * 1000:.1f} ms)",
                      flush=True)
            continue
        else:
            config = model_config(args.model, context, args.output_tokens)
            timing, how = time_shape(config, args.dtype, device, prompt, args.output_tokens, args.layers,
                                     args.repeats, models)
        row = {"model": args.model, "dtype": args.dtype, "device": str(device), "tp_size": tp, **timing.to_json(),
               **how}
        if hardware:
            pred = predict(config, context, dtype=args.dtype, hardware=hardware, tp=tp)
            row["predicted"] = {"prefill_s": pred.prefill_s, "decode_s_per_token": pred.decode_s_per_token}
            row["measured_over_predicted"] = {"ttft": timing.ttft_s / pred.prefill_s,
                                              "tpot": timing.tpot_s / pred.decode_s_per_token}
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            _print_row(row, header=len(rows) == 1)


def _print_row(row: dict, header: bool) -> None:
    if header:
        print(f"{'model':>14} {'dtype':>5} {'context':>8} {'TTFT s':>9} {'TPOT ms':>9} {'e2e s':>8} "
              f"{'pred TTFT':>9} {'pred TPOT':>9} {'meas/pred':>11} {'method':>7}")
    pred = row.get("predicted")
    ratio = row.get("measured_over_predicted")
    print(f"{row['model']:>14} {row['dtype']:>5} {row['context']:>8} {row['ttft_s']:>9.3f} "
          f"{row['tpot_s'] * 1000:>9.2f} {row['e2e_s']:>8.2f} "
          + (f"{pred['prefill_s']:>9.3f} {pred['decode_s_per_token'] * 1000:>9.2f} "
             f"{ratio['ttft']:>5.2f}/{ratio['tpot']:<5.2f}" if pred else f"{'-':>9} {'-':>9} {'-':>11}")
          + f" {row['method']:>7}", file=sys.stdout, flush=True)


def cmd_throughput(args) -> None:
    import torch

    from ..api import CodeLlama, DEFAULT_MODEL_DIR, load, resolve_device
    from ..tokenizer import Tokenizer
    from .latency import model_config, random_model
    from .throughput import predict_row, sweep
    from .workload import multi_file_prompt

    if args.context < 16 or args.output_tokens < 1 or args.rounds < 1:
        raise CodeLlamaError("--context must be >= 16, --output-tokens and --rounds >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.model is None or Path(args.model).expanduser().exists():
        llama = load(args.model, device=device)
    else:  # a released shape with random weights, the embedded tokenizer (its ids are valid in any vocabulary)
        config = model_config(args.model, args.context, args.output_tokens)
        llama = CodeLlama(random_model(config, args.dtype, device), Tokenizer(DEFAULT_MODEL_DIR / "tokenizer.model"),
                          name=args.model)
    prompt = multi_file_prompt(llama.tokenizer, args.context)
    text = llama.tokenizer.decode(prompt.tokens[1:])
    hardware = args.hardware or ("local" if device.type == "cpu" else None)
    dtype = _weights_dtype(llama.model)

    def show(row) -> None:
        data = {"model": llama.name, "device": str(device), "context": args.context, "dtype": dtype,
                **row.to_json()}
        if hardware:
            pred = predict_row(llama.config, hardware, dtype, args.context, row.concurrency, args.output_tokens,
                               args.rounds)
            data["predicted"] = pred
            data["measured_over_predicted"] = {"tokens_per_s": row.tokens_per_s / pred["tokens_per_s"]}
        if args.json:
            print(json.dumps(data), flush=True)
            return
        if row.concurrency == args.concurrency[0]:
            print(f"{'conc':>5} {'requests':>8} {'tok/s':>9} {'req/s':>7} {'TTFT p50':>9} {'TTFT p90':>9} "
                  f"{'TPOT p50 ms':>11} {'p90':>7} {'p99':>7} {'pred tok/s':>10} {'meas/pred':>9}")
        pred = data.get("predicted")
        print(f"{row.concurrency:>5} {row.requests:>8} {row.tokens_per_s:>9.1f} {row.requests_per_s:>7.2f} "
              f"{row.ttft_p50_s:>9.3f} {row.ttft_p90_s:>9.3f} {row.tpot_p50_s * 1000:>11.2f} "
              f"{row.tpot_p90_s * 1000:>7.2f} {row.tpot_p99_s * 1000:>7.2f} "
              + (f"{pred['tokens_per_s']:>10.1f} {data['measured_over_predicted']['tokens_per_s']:>9.2f}"
                 if pred else f"{'-':>10} {'-':>9}"), flush=True)

    sweep(llama, text, args.concurrency, args.output_tokens, args.rounds, log=show, threads=args.threads)


def _tensor_parallel(device):
    """Under torchrun: join the group (each rank on its GPU, or gloo on CPU) to time this rank's share; only rank 0
    prints. Returns the TP degree (1 outside torchrun) and this rank's device."""
    from ..cli_generate import under_torchrun

    if not under_torchrun():
        return 1, device
    from ..training.distributed import init_ranks
    ranks, device = init_ranks(device)
    return ranks.world_size, device


def _weights_dtype(model) -> str:
    """The perf model's name for how ``model`` holds its weights: int8/int4 (our quantization) or the float dtype."""
    from ..quantize import QuantLinear

    modes = {m.mode for m in model.modules() if isinstance(m, QuantLinear)}
    if modes:
        return "int4" if "int4" in modes else "int8"
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[
        str(model.output.weight.dtype).removeprefix("torch.")]


def cmd_report(args) -> None:
    from .report import write_report

    measured = []
    for name in args.measured or []:
        try:
            measured += [json.loads(line) for line in Path(name).read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as e:
            raise CodeLlamaError(f"--measured {name}: {e}") from None
    for row in measured:
        if not isinstance(row, dict) or not ({"ttft_s", "concurrency", "ttft_ratio"} & set(row)):
            raise CodeLlamaError("--measured rows must come from `codellama bench latency --json` or "
                                 "`codellama bench throughput --json`")
    data = write_report(args.out, measured)
    print(f"report: {args.out}")
    for line in data["conclusions"]:
        print(f"- {line}")
