"""Load generator for ``codellama serve`` on loopback: 1 streaming client vs 16 concurrent ones, then a
leak check over many requests. Bounded in request count and wall time; the server always shuts down.

    python benchmarks/serve.py                          # embedded model if installed, else a random one
    python benchmarks/serve.py --model PATH --out serve.json
    python benchmarks/serve.py --random                 # random weights, the embedded model's shape

Phases (each one's requests are streamed ``/v1/completions`` with greedy decoding and ``max_tokens``):
1. single: one client, ``--single-requests`` requests one after another;
2. concurrent: ``--clients`` clients, ``--concurrent-requests`` requests in all;
3. leak: ``--leak-requests`` short requests from ``--clients`` clients; the server's RSS is sampled after
   the first 10% (warm: allocator pools and caches filled) and at the end.

Reported: aggregate generated tokens/s per phase (tokens from each response's ``usage``), the ratio
concurrent / single, time to first text (TTFT: request sent -> first chunk with text) p50/p90, failed
requests (any non-200 answer, error event or exception), RSS growth. A random model never emits eos, so
every request generates exactly ``max_tokens``; a trained one may stop earlier (tokens are counted, not
assumed)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

# A random model with the embedded model's shape (recipes/tiny-pretrain.toml).
RANDOM_SHAPE = dict(dim=256, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=4096, multiple_of=32,
                    rope_theta=1_000_000.0, max_seq_len=1024)


def random_checkpoint(out: Path) -> Path:
    """A random-weight checkpoint of the embedded model's shape, with a 4,096-piece tokenizer trained on
    the standard library (as the embedded model's is)."""
    import sysconfig

    from codellama.checkpoint import save_checkpoint
    from codellama.config import ModelConfig
    from codellama.model import Transformer
    from codellama.training.tokenizer import train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in sorted(stdlib.glob("*.py"))[:120]]
    tok = train_tokenizer(texts, out / "tok.model", vocab_size=RANDOM_SHAPE["vocab_size"])
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**RANDOM_SHAPE, name="random-7M"))
    model.init_weights()
    return save_checkpoint(model, out / "random-7M", tokenizer=tok)


def prompts(n: int, seed: int = 0) -> list[str]:
    """Code prompts of 3-12 lines cut from standard-library modules (deterministic)."""
    import sysconfig
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines = []
    for name in ("textwrap.py", "shlex.py", "fnmatch.py", "bisect.py", "heapq.py"):
        lines += (stdlib / name).read_text(encoding="utf-8").splitlines()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start, length = rng.randrange(len(lines) - 12), rng.randint(3, 12)
        out.append("\n".join(lines[start:start + length]) + "\n")
    return out


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


# ---- the server, in a subprocess --------------------------------------------------------------------------
class Server:
    def __init__(self, model: Path | None, batch: int, extra: list[str]):
        cmd = [sys.executable, "-m", "codellama", "serve", "--port", "0", "--max-batch-size", str(batch),
               "--max-queue", "256", "--log-level", "warning"] + (["--model", str(model)] if model else []) + extra
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        killer = threading.Timer(300, self.proc.kill)  # never wait forever for the model to load
        killer.start()
        line = ""
        for line in self.proc.stderr:
            if line.startswith("serving "):
                break
        killer.cancel()
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        if not m:
            self.close()
            raise SystemExit(f"server did not start: {line.strip() or self.proc.returncode}")
        self.url, self.banner = m[1], line.strip()
        # Keep draining stderr so the server never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---- clients ----------------------------------------------------------------------------------------------
class Connection:
    """A minimal keep-alive HTTP/1.1 client for chunked SSE responses, on asyncio streams: far less CPU per
    event than a general client, which matters when the load generator shares the CPU with the server."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None

    async def post_stream(self, path: str, body: dict):
        """Yields the ``data:`` payloads of the response; raises on a non-200 status."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        payload = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                          f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                          + payload)
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") != "chunked":
            data = await self.reader.readexactly(int(headers.get("content-length", 0)))
            if headers.get("connection") == "close":
                await self.close()
            raise RuntimeError(f"HTTP {status}: {data[:200]!r}")
        buffer = b""
        while (size := int((await self.reader.readline()).strip(), 16)) > 0:
            buffer += (await self.reader.readexactly(size + 2))[:-2]
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if event.startswith(b"data: "):
                    yield event[6:]
        await self.reader.readline()  # the CRLF after the last chunk
        if status != 200:
            raise RuntimeError(f"HTTP {status}")


async def one_request(conn: Connection, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, ok, done = None, 0, True, False
    try:
        async for data in conn.post_stream("/v1/completions", body):
            if data == b"[DONE]":
                done = True
                continue
            if ttft is None and any(c.get("text") for c in json.loads(data).get("choices", [])):
                ttft = time.perf_counter() - t0
            if b'"usage"' in data or b'"error"' in data:
                chunk = json.loads(data)
                if "error" in chunk:
                    ok = False
                elif chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except Exception as e:  # counted as a failure, with its kind
        await conn.close()
        return {"ok": False, "status": f"{type(e).__name__}: {e}"[:80], "ttft": None, "tokens": 0,
                "seconds": time.perf_counter() - t0}
    return {"ok": ok and done, "status": 200, "ttft": ttft, "tokens": tokens, "seconds": time.perf_counter() - t0}


async def phase(url: str, clients: int, texts: list[str], max_tokens: int, deadline: float,
                on_progress=None) -> dict:
    """``clients`` workers (one keep-alive connection each) take requests from a shared list until it is
    empty or the deadline passes."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    todo = list(texts)
    results: list[dict] = []

    async def worker():
        conn = Connection(host, int(port))
        try:
            while todo and time.perf_counter() < deadline:
                results.append(await one_request(conn, todo.pop(), max_tokens))
                if on_progress is not None:
                    on_progress(len(results))
        finally:
            await conn.close()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    tokens = sum(r["tokens"] for r in results)

    def pct(p: float) -> float | None:
        return round(ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))], 4) if ttfts else None
    return {"clients": clients, "requests": len(results), "planned": len(texts),
            "failed": sum(not r["ok"] for r in results),
            "failures": sorted({str(r["status"]) for r in results if not r["ok"]}),
            "tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_s": pct(0.5), "ttft_p90_s": pct(0.9)}


def engine_counters(url: str) -> tuple[int, int]:
    """(decode steps, sum of rows over steps) from /metrics: their ratio is the mean decode batch."""
    import urllib.request
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    return (int(re.search(r"codellama_engine_steps_total (\d+)", text)[1]),
            int(re.search(r"codellama_engine_batch_rows_total (\d+)", text)[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: embedded model, else random)")
    p.add_argument("--random", action="store_true", help="random weights of the embedded model's shape")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per request in phases 1-2")
    p.add_argument("--single-requests", type=int, default=8)
    p.add_argument("--concurrent-requests", type=int, default=64)
    p.add_argument("--leak-requests", type=int, default=1000)
    p.add_argument("--leak-max-tokens", type=int, default=16)
    p.add_argument("--max-seconds", type=float, default=900, help="wall-time bound for all phases together")
    p.add_argument("--server-args", default="", help="extra arguments for codellama serve (e.g. '--device cuda')")
    p.add_argument("--out", default=None, help="write the results as JSON")
    args = p.parse_args()

    from codellama.api import DEFAULT_MODEL_DIR

    tmp = tempfile.TemporaryDirectory()
    if args.model:
        model, which = Path(args.model), args.model
    elif not args.random and (DEFAULT_MODEL_DIR / "params.json").is_file():
        model, which = None, "embedded default model"
    else:
        model = random_checkpoint(Path(tmp.name))
        which = f"random weights, embedded model's shape ({RANDOM_SHAPE})"
    print(f"model: {which}", file=sys.stderr)
    server = Server(model, args.max_batch_size, args.server_args.split())
    end = time.perf_counter() + args.max_seconds
    results: dict = {"model": which, "server": server.banner, "platform": platform.platform(),
                     "cpu_count": os.cpu_count(), "torch": torch.__version__,
                     "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size}
    try:
        url = server.url
        asyncio.run(phase(url, 4, prompts(8, seed=99), 8, end))  # warm-up: first-call costs, packed weights
        results["single"] = asyncio.run(phase(url, 1, prompts(args.single_requests, 1), args.max_tokens, end))
        print("single    ", results["single"], file=sys.stderr)
        steps0, rows0 = engine_counters(url)
        results["concurrent"] = asyncio.run(phase(url, args.clients, prompts(args.concurrent_requests, 2),
                                                  args.max_tokens, end))
        steps1, rows1 = engine_counters(url)
        results["concurrent"]["mean_decode_batch"] = round((rows1 - rows0) / max(steps1 - steps0, 1), 2)
        print("concurrent", results["concurrent"], file=sys.stderr)
        ratio = results["concurrent"]["tokens_per_s"] / max(results["single"]["tokens_per_s"], 1e-9)
        results["speedup"] = round(ratio, 2)

        warm_at = max(1, args.leak_requests // 10)
        rss, series = {}, []  # RSS (MiB) every 10% of the requests, for the JSON

        def progress(n: int) -> None:
            if n == warm_at and "warm" not in rss:
                rss["warm"] = rss_bytes(server.proc.pid)
            if n % warm_at == 0:
                series.append(round(rss_bytes(server.proc.pid) / 2**20, 1))
        leak = asyncio.run(phase(url, args.clients, prompts(args.leak_requests, 3), args.leak_max_tokens, end,
                                 on_progress=progress))
        rss["end"] = rss_bytes(server.proc.pid)
        growth = (rss["end"] - rss.get("warm", rss["end"])) / rss.get("warm", rss["end"])
        leak.update(rss_series_mib=series, rss_warm_mib=round(rss.get("warm", 0) / 2**20, 1),
                    rss_end_mib=round(rss["end"] / 2**20, 1),
                    rss_growth_pct=round(100 * growth, 2))
        results["leak"] = leak
        print("leak      ", leak, file=sys.stderr)
    finally:
        server.close()
        tmp.cleanup()
    failed = sum(results[k]["failed"] for k in ("single", "concurrent", "leak") if k in results)
    complete = all(results[k]["requests"] == results[k]["planned"] for k in ("single", "concurrent", "leak"))
    results["targets"] = {"speedup_ge_4x": results["speedup"] >= 4, "zero_failed": failed == 0,
                          "all_requests_ran": complete, "rss_growth_lt_5pct": results["leak"]["rss_growth_pct"] < 5}
    s, c, lk = results["single"], results["concurrent"], results["leak"]
    print(f"\n{which}\n"
          f"1 client : {s['tokens_per_s']:8.1f} tok/s  TTFT p50 {s['ttft_p50_s']} s  ({s['requests']} requests)\n"
          f"{c['clients']} clients: {c['tokens_per_s']:8.1f} tok/s  TTFT p50 {c['ttft_p50_s']} s  "
          f"p90 {c['ttft_p90_s']} s"
          f"  ({c['requests']} requests, mean decode batch {c['mean_decode_batch']})\n"
          f"speedup  : {results['speedup']}x   failed requests: {failed}\n"
          f"leak     : {lk['requests']} requests, RSS {lk['rss_warm_mib']} -> {lk['rss_end_mib']} MiB "
          f"({lk['rss_growth_pct']:+.2f}%)\n"
          f"targets  : {results['targets']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
