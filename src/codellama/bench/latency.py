"""Latency at batch 1: time to first token (the prefill of the context), time per output token, end to end.

Timing goes through the library's own generation engine (``generation.run``: chunked prefill into a KV cache, then
greedy decoding), so the numbers are what ``complete`` gives a user. Models come by name, with random weights at
the exact released shape (random weights time exactly like trained ones: the same shapes, the same kernels), or
from a checkpoint.

**Slices** (``layers=K``): a shape too large for the machine is timed as a K-block model at the exact dimensions
plus a 0-block model (embedding, final norm, output head). Each block costs the same, so the whole model's time
is ``head + n_layers · (slice − head) / K``. Both parts run the kernels the whole model would: generation packs
weights for oneDNN only while they are small (``generation_forward.will_pack``), which a slice often is and the whole
model is not, so the slice is told the whole model's choice. ``slice_check`` compares the scaled slice with timing the whole model
where the whole model fits."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch

from ..config import ModelConfig
from ..errors import CodeLlamaError
from ..model import Transformer

DTYPES = ("fp32", "bf16", "fp16", "int8", "int4")


@dataclass
class Timing:
    ttft_s: float  # prefill of the context and the first token
    tpot_s: float  # median time per further output token
    e2e_s: float  # ttft + (output_tokens - 1) · tpot
    context: int
    output_tokens: int

    def to_json(self) -> dict:
        return asdict(self)


def model_config(name_or_config: str | ModelConfig, context: int, output_tokens: int) -> ModelConfig:
    config = ModelConfig.from_name(name_or_config) if isinstance(name_or_config, str) else name_or_config
    return replace(config, max_seq_len=max(config.max_seq_len, context + output_tokens))


def random_model(config: ModelConfig, dtype: str, device: torch.device, seed: int = 0) -> Transformer:
    """A model of ``config``'s shape with random weights in ``dtype`` (int8/int4: our weight-only quantization of
    bf16 weights), built on the meta device and materialised directly on ``device``."""
    if dtype not in DTYPES:
        raise CodeLlamaError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    float_dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(dtype, torch.bfloat16)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    with torch.device("meta"):
        if world > 1:  # under torchrun: this rank's share of the shape (tensor_parallel.py), drawn directly
            if dtype in ("int8", "int4"):
                raise CodeLlamaError("tensor parallelism runs float weights; use --dtype bf16, fp16 or fp32")
            from ..tensor_parallel import TPInfo, build_sharded
            model = build_sharded(config, world).to(float_dtype)
            model.tp = TPInfo(torch.distributed.get_rank(), world)
        else:
            model = Transformer(config).to(float_dtype)
    torch.manual_seed(seed)
    if dtype not in ("int8", "int4"):
        model.to_empty(device=device)  # allocated in the target dtype: a bf16 7B never exists in float32 first
        with torch.no_grad():
            model.init_weights()
        return model.eval()
    # Quantized: one block at a time drawn in bf16 and quantized at once, so a 70B in int8 (69 GB) never needs
    # its 138 GB bf16 form (it would not fit one 141 GB GPU beside its int8 copy).
    from ..quantize import quantize_model, quantize_weight

    std = 0.02  # init_weights' scheme, block by block
    with torch.no_grad():
        for block in model.layers:
            block.to_empty(device=device)
            for name, p in block.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std / (2 * config.n_layers) ** 0.5 if name.endswith(("wo.weight", "w2.weight"))
                              else std)
            quantize_model(block, dtype)
        for part in (model.tok_embeddings, model.norm, model.output):
            part.to_empty(device=device)
        model.tok_embeddings.weight.normal_(0.0, std)
        model.norm.weight.fill_(1.0)
        model.output.weight.normal_(0.0, std)
        model.output = quantize_weight(model.output.weight, dtype)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def whole_model_packs(config: ModelConfig, dtype: str, context: int, output_tokens: int) -> bool:
    """Whether generation would pack the weights of the whole ``config`` for this request (``will_pack``'s default
    rule: float weights of at most PACK_LIMIT_BYTES that outweigh the KV cache), on a CPU that can pack."""
    from ..generation_forward import PACK_LIMIT_BYTES
    from .perf_model import kv_bytes, weight_bytes

    if dtype not in ("fp32", "bf16", "fp16"):
        return False
    weights = weight_bytes(config, dtype)
    return weights <= PACK_LIMIT_BYTES and kv_bytes(config, context + output_tokens - 1, 1, dtype) <= weights


def time_generation(model: Transformer, prompt: list[int], output_tokens: int, repeats: int = 1,
                    pack: bool | None = None) -> Timing:
    """Median over ``repeats`` of TTFT and time per output token for one greedy request of ``prompt``;
    ``pack`` as ``generation.run``'s (None: its own choice for this model)."""
    from ..generation import make_requests, run

    device = model.output.weight.device
    # Warm-up on a short prompt: first-call costs (kernel selection, weight packing) are not latency.
    for _ in run(model, make_requests(model, [prompt[:64]], max_new_tokens=2), pack=pack):
        pass
    ttfts, tpots = [], []
    for _ in range(repeats):
        requests = make_requests(model, [prompt], max_new_tokens=output_tokens)
        steps = run(model, requests, pack=pack)
        _sync(device)
        t0 = time.perf_counter()
        marks = []
        for _ in steps:
            _sync(device)
            marks.append(time.perf_counter())
        if not marks:
            raise CodeLlamaError("the benchmark request produced no token")
        ttfts.append(marks[0] - t0)
        gaps = [b - a for a, b in zip(marks, marks[1:])]
        tpots.append(statistics.median(gaps) if gaps else float("nan"))
    ttft, tpot = statistics.median(ttfts), statistics.median(tpots)
    return Timing(ttft, tpot, ttft + max(0, output_tokens - 1) * tpot, len(prompt), output_tokens)


def _built(models: dict | None, config: ModelConfig, dtype: str, device: torch.device) -> Transformer:
    """``random_model``, kept in ``models`` (when given) so a sweep over contexts builds each shape once."""
    if models is None:
        return random_model(config, dtype, device)
    key = (repr(config), dtype, str(device))
    if key not in models:
        models.clear()  # one shape at a time: the previous one's memory goes back first
        models[key] = random_model(config, dtype, device)
    return models[key]


def time_shape(config: ModelConfig, dtype: str, device: torch.device, prompt: list[int], output_tokens: int,
               layers: int | None = None, repeats: int = 1, models: dict | None = None) -> tuple[Timing, dict]:
    """Time ``config`` whole, or (``layers`` = K) as a K-block slice scaled to ``config.n_layers``. ``models``: a
    dict to keep the built models in between calls (a slice and its head are kept together)."""
    if layers is None or layers >= config.n_layers:
        timing = time_generation(_built(models, config, dtype, device), prompt, output_tokens, repeats)
        return timing, {"method": "whole", "layers_timed": config.n_layers}
    if layers < 1:
        raise CodeLlamaError(f"--layers must be >= 1, got {layers}")
    pack = whole_model_packs(config, dtype, len(prompt), output_tokens) if device.type == "cpu" else None
    parts = {}
    key = (repr(config), layers, dtype, str(device))
    if models is None or models.get("slice-key") != key:
        if models is not None:
            models.clear()
        built = {}
        for k in (layers, 0):
            model = random_model(replace(config, n_layers=max(1, k)), dtype, device)
            if k == 0:  # embedding, final norm and output head on their own (a config cannot say 0 blocks)
                model.layers = torch.nn.ModuleList()
            built[k] = model
        if models is not None:
            models.update({"slice-key": key, "parts": built})
    else:
        built = models["parts"]
    for k in (layers, 0):
        parts[k] = time_generation(built[k], prompt, output_tokens, repeats, pack)
    del built
    head, block = parts[0], parts[layers]
    scale = lambda h, s: h + config.n_layers * max(0.0, s - h) / layers  # noqa: E731
    ttft, tpot = scale(head.ttft_s, block.ttft_s), scale(head.tpot_s, block.tpot_s)
    timing = Timing(ttft, tpot, ttft + max(0, output_tokens - 1) * tpot, len(prompt), output_tokens)
    return timing, {"method": "slice", "layers_timed": layers, "packed": bool(pack), "head": head.to_json(),
                    "slice": block.to_json()}


def slice_check(config: ModelConfig, dtype: str, device: torch.device, prompt: list[int], output_tokens: int,
                layers: int, repeats: int = 3) -> dict:
    """Whole-model timing against the scaled slice, for a shape that fits: the ratios say how good slicing is."""
    whole, _ = time_shape(config, dtype, device, prompt, output_tokens, None, repeats)
    sliced, info = time_shape(config, dtype, device, prompt, output_tokens, layers, repeats)
    return {"whole": whole.to_json(), "sliced": sliced.to_json(), "layers_timed": layers,
            "ttft_ratio": sliced.ttft_s / whole.ttft_s, "tpot_ratio": sliced.tpot_s / whole.tpot_s}
