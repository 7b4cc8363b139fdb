"""Who answers the pipeline's prompts: a local checkpoint (batched ``CodeLlama.chat``) or any OpenAI-compatible
``/v1/chat/completions`` endpoint (vLLM, ``codellama serve``, a hosted API) with a limit on requests in flight.

Both take a list of ``ChatJob`` (a key, the messages, the job's seed) and yield ``(job, Reply)`` as replies
arrive, in any order: the stage writes each one as it comes. A reply the responder could not get for *this*
prompt (too long for the context: a 400) comes back as ``Reply(error=...)`` and is recorded; anything that would
fail every request (unreachable endpoint, bad key, unknown model, retries spent on 429/5xx) raises
``CodeLlamaError`` and stops the stage with what was done so far on disk."""

from __future__ import annotations

import os
import random
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import Iterator, Protocol, Sequence

from ..errors import CodeLlamaError, error_line
from ..evaluation.harness import consecutive_groups


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ChatJob:
    key: str
    messages: list[dict[str, str]]
    seed: int


@dataclass
class Reply:
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None


class Responder(Protocol):
    def provenance(self) -> dict: ...

    def run(self, jobs: Sequence[ChatJob], sampling: Sampling) -> Iterator[tuple[ChatJob, Reply]]: ...

    def close(self) -> None: ...


# ---- a local checkpoint -------------------------------------------------------------------------------
class LocalResponder:
    """``codellama.api.load(path)`` (the embedded model when ``path`` is None), ``batch_size`` dialogs per call.

    A call with sampling gives row ``r`` the seed ``seed + r``, so a call holds only jobs whose seeds are
    consecutive (the ten solutions of one question are); each job then gets exactly the seed it names, as it
    would from an endpoint, whatever the batching."""

    def __init__(self, path: str | None = None, *, batch_size: int = 8, device: str | None = None,
                 dtype: str | None = None, threads: int | None = None):
        from ..api import load
        from ..cli_generate import apply_threads

        apply_threads(threads)
        self.path, self.batch_size = path, batch_size
        self.llama = load(path, device=device, dtype=dtype)

    def provenance(self) -> dict:
        return {"responder": "local", "model": self.path or "default", "model_name": self.llama.name}

    def run(self, jobs: Sequence[ChatJob], sampling: Sampling) -> Iterator[tuple[ChatJob, Reply]]:
        from ..formats import chat_tokens

        greedy = sampling.temperature == 0
        ctx = self.llama.config.max_seq_len
        fits: list[ChatJob] = []
        for job in jobs:
            try:
                n = len(chat_tokens(self.llama.tokenizer, job.messages))
            except CodeLlamaError as e:
                yield job, Reply(error=str(e))
                continue
            if n >= ctx:
                yield job, Reply(error=f"prompt of {n} tokens does not fit the model's context ({ctx})")
            else:
                fits.append(job)
        for start in range(0, len(fits), self.batch_size):
            batch = fits[start:start + self.batch_size]
            for group in consecutive_groups(batch, lambda job: job.seed, split=not greedy):
                outs = self.llama.chat([j.messages for j in group], max_new_tokens=sampling.max_tokens,
                                       temperature=sampling.temperature, top_p=sampling.top_p,
                                       seed=None if greedy else group[0].seed, shrink_max_new_tokens=True)
                for job, out in zip(group, outs):
                    yield job, Reply(out.text, out.finish_reason)

    def close(self) -> None:
        pass


# ---- an OpenAI-compatible endpoint ------------------------------------------------------------------------
RETRY_STATUSES = (408, 409, 429, 500, 502, 503, 504)
ITEM_STATUSES = (400, 413, 422)  # this prompt's problem (too long, refused): recorded, the stage goes on


class EndpointResponder:
    """``POST {url}/v1/chat/completions`` with ``concurrency`` requests in flight, each with ``timeout``
    seconds; 429, 5xx and dropped connections are retried ``retries`` times with exponential backoff and
    jitter, or after the server's ``Retry-After`` seconds when it sends one. ``url`` may end in ``/v1`` or not."""

    def __init__(self, url: str, model_name: str, *, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 600.0, retries: int = 5, backoff: float = 1.0):
        try:
            import httpx
        except ImportError:
            raise CodeLlamaError("--endpoint needs httpx: pip install 'codellama[instruct]'") from None
        self.httpx = httpx
        base = url.rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise CodeLlamaError(f"--endpoint must be an http:// or https:// URL, got {url!r}")
        self.url, self.base = url, base if base.endswith("/v1") else base + "/v1"
        self.model_name, self.concurrency = model_name, concurrency
        self.retries, self.backoff = retries, backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
                                   limits=httpx.Limits(max_connections=concurrency))
        self._stop = threading.Event()
        self._check()

    def _check(self) -> None:
        """One look before any work: an unreachable endpoint or a refused key is one error, not a stage of
        failed items. A server without ``/v1/models`` (404) is fine."""
        try:
            r = self.client.get(self.base + "/models", timeout=10.0)
        except self.httpx.HTTPError as e:
            raise CodeLlamaError(f"cannot reach endpoint {self.url}: {error_line(e)}") from None
        if r.status_code in (401, 403):
            raise CodeLlamaError(f"endpoint {self.url} refused the API key (HTTP {r.status_code}); "
                                 "pass --api-key or set OPENAI_API_KEY")

    def provenance(self) -> dict:
        return {"responder": "endpoint", "endpoint": self.url, "model_name": self.model_name}

    def _post(self, job: ChatJob, sampling: Sampling) -> Reply:
        body = {"model": self.model_name, "messages": job.messages, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "max_tokens": sampling.max_tokens, "seed": job.seed}
        last = ""
        for attempt in range(self.retries + 1):
            if self._stop.is_set():
                raise CodeLlamaError("stopped")
            wait_s = min(60.0, self.backoff * 2 ** attempt) * (0.5 + random.random() / 2)
            try:
                r = self.client.post(self.base + "/chat/completions", json=body)
            except self.httpx.HTTPError as e:
                last = error_line(e)
            else:
                if r.status_code == 200:
                    try:
                        choice = r.json()["choices"][0]
                        return Reply(choice["message"]["content"] or "", choice.get("finish_reason"))
                    except (ValueError, KeyError, IndexError, TypeError):
                        raise CodeLlamaError(f"endpoint {self.url} sent a reply that is not a chat "
                                             f"completion: {error_line(r.text, 120)}") from None
                message = _error_message(r)
                if r.status_code in ITEM_STATUSES:
                    return Reply(error=f"HTTP {r.status_code}: {message}")
                if r.status_code not in RETRY_STATUSES:
                    raise CodeLlamaError(f"endpoint {self.url} answered HTTP {r.status_code}: {message}")
                last = f"HTTP {r.status_code}: {message}"
                retry_after = r.headers.get("retry-after", "")
                if retry_after.replace(".", "", 1).isdigit():  # the server knows when it will have room
                    wait_s = min(60.0, float(retry_after))
            if attempt < self.retries:
                self._stop.wait(wait_s)
        raise CodeLlamaError(f"endpoint {self.url}: {last} (after {self.retries + 1} attempts)")

    def run(self, jobs: Sequence[ChatJob], sampling: Sampling) -> Iterator[tuple[ChatJob, Reply]]:
        # At most ``concurrency`` requests in flight and nothing queued beyond them, so a fatal error leaves
        # no backlog of requests still being sent.
        pending: dict[Future, ChatJob] = {}
        todo = iter(jobs)
        self._stop.clear()
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="self-instruct") as pool:
            try:
                while True:
                    while len(pending) < self.concurrency:
                        job = next(todo, None)
                        if job is None:
                            break
                        pending[pool.submit(self._post, job, sampling)] = job
                    if not pending:
                        return
                    done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                    for f in done:
                        job = pending.pop(f)
                        yield job, f.result()
            finally:
                self._stop.set()  # a failure (or the caller stopping) ends the requests still in flight
                for f in pending:
                    f.cancel()

    def close(self) -> None:
        self.client.close()


def _error_message(r) -> str:
    try:
        err = r.json().get("error")
        text = err.get("message") if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        text = None
    return error_line(text or r.text or r.reason_phrase or "no body", 160)


def make_responder(args) -> "Responder":
    """From the CLI flags: ``--endpoint URL --model-name NAME`` or a local ``--model PATH`` (default: the
    embedded model)."""
    if args.endpoint:
        if args.model:
            raise CodeLlamaError("pass either --model (a local checkpoint) or --endpoint, not both")
        if not args.model_name:
            raise CodeLlamaError("--endpoint needs --model-name (the model id the server serves)")
        if args.concurrency < 1:
            raise CodeLlamaError(f"--concurrency must be >= 1, got {args.concurrency}")
        if not args.request_timeout > 0:
            raise CodeLlamaError(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
        if args.retries < 0:
            raise CodeLlamaError(f"--retries must be >= 0, got {args.retries}")
        return EndpointResponder(args.endpoint, args.model_name,
                                 api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
                                 concurrency=args.concurrency, timeout=args.request_timeout, retries=args.retries)
    if args.model_name:
        raise CodeLlamaError("--model-name goes with --endpoint")
    if args.batch_size < 1:
        raise CodeLlamaError(f"--batch-size must be >= 1, got {args.batch_size}")
    return LocalResponder(args.model, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                          threads=args.threads)
