"""An OpenAI-compatible HTTP server over the engine: FastAPI routes, one scheduler thread.

The scheduler thread owns the model and one `DecodeBatch`. Between decode steps it admits queued
requests (prefilled and added to the running batch: continuous batching) and drops sequences whose
client went away, so a cancelled sequence frees its row within one step. Handlers run on the event
loop; they only validate, enqueue, and turn sequence progress into responses. The scheduler rings a
per-request doorbell after each step that touched the request, and the handler reads the sequences'
state (`Sequence` locks what the two threads share).

A step that raises fails the requests in the batch (500) and the scheduler starts over with a fresh
batch; until it has one, `/health` and new requests answer 503. Work before admission is bounded:
the body by `max_body_bytes` (413), the prompt by a character count checked before tokenising.

Every error is an OpenAI-style JSON body {"error": {"message", "type", "param", "code"}}; docs/serving.md
lists each status.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.infer.engine import DecodeBatch, Engine, Sequence
from nanoseek.infer.sampling import SamplingParams

MAX_STOP_STRINGS = 4  # as OpenAI
API_KEY_ENV = "NANOSEEK_API_KEY"  # where the key belongs: a --api-key flag shows in the process list
REBUILD_RETRY_SECONDS = 1.0  # between attempts to allocate a fresh batch after one failed


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


@dataclass
class ServerLimits:
    max_concurrent: int = 8  # sequences decoding at once (rows of the batch)
    max_queue: int = 32  # requests waiting for rows; one more is answered 429
    request_timeout: float = 600.0  # seconds from arrival to the last token
    max_context: int | None = None  # default (and at most): the model's max_position_embeddings
    max_body_bytes: int = 4 << 20  # a larger request body is answered 413 before it is read
    api_key: str | None = None  # default: $NANOSEEK_API_KEY; none: no authentication

    def __post_init__(self):
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None


@dataclass(eq=False)  # identity: jobs are dict keys and set members
class Job:
    """One HTTP request's sequences (one group per prompt, n samples each) and its doorbell."""

    groups: list[list[Sequence]]
    loop: asyncio.AbstractEventLoop
    doorbell: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None

    @property
    def sequences(self) -> list[Sequence]:
        return [s for g in self.groups for s in g]

    def ring(self) -> None:
        self.loop.call_soon_threadsafe(self.doorbell.set)

    def cancel(self) -> None:
        for s in self.sequences:
            s.cancelled = True


class Scheduler:
    """The thread that runs the model: admit queued jobs, take one decode step, repeat."""

    def __init__(self, engine: Engine, limits: ServerLimits):
        if limits.max_context and limits.max_context > engine.context_length:
            raise ValueError(f"max_context {limits.max_context} exceeds the model's {engine.context_length} positions "
                             "(max_position_embeddings): it would decode past what the model was built for")
        self.engine, self.limits = engine, limits
        self.capacity = limits.max_context or engine.context_length
        self.batch: DecodeBatch | None = engine.new_batch(limits.max_concurrent, self.capacity)  # None: lost
        self.queue: collections.deque[Job] = collections.deque()
        self.owner: dict[Sequence, Job] = {}
        self.wakeup = threading.Condition()
        self.stopping = False
        self.counters = collections.Counter()
        self.thread = threading.Thread(target=self._loop, name="nanoseek-scheduler", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> bool:
        with self.wakeup:
            if len(self.queue) >= self.limits.max_queue:
                self.counters["rejected_total"] += 1
                return False
            self.queue.append(job)
            self.counters["requests_total"] += 1
            self.wakeup.notify()
        return True

    def stop(self) -> None:
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        self.thread.join(timeout=10)

    @property
    def running(self) -> bool:
        """Whether queued requests will be served: the thread is alive and holds a batch."""
        return self.thread.is_alive() and self.batch is not None and not self.stopping

    def _admit(self) -> list[Job]:
        jobs, free = [], self.batch.free_rows
        with self.wakeup:
            while self.queue and not self.stopping:
                job = self.queue[0]
                if all(s.cancelled for s in job.sequences):
                    self.queue.popleft()
                    continue
                if len(job.sequences) > free:
                    break
                free -= len(job.sequences)
                jobs.append(self.queue.popleft())
        return jobs

    def _idle(self) -> bool:
        batch = self.batch
        return batch is not None and not self.queue and not batch.sequences and not batch.prefilling

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.wakeup:
                while not self.stopping and self._idle():
                    self.wakeup.wait()
                if self.stopping:
                    return
            if self.batch is None:
                self._rebuild()
                continue
            jobs: list[Job] = []
            try:
                jobs = self._admit()
                if jobs:
                    # Chunked prefill: the batch runs one chunk of these prompts per step, so the
                    # sequences already decoding keep getting tokens while a long prompt is read.
                    self.batch.admit([g for job in jobs for g in job.groups])
                    self.counters["prompt_tokens_total"] += sum(len(g[0].prompt) for job in jobs for g in job.groups)
                    for job in jobs:
                        self.owner.update((s, job) for s in job.sequences)
                if self.batch.sequences or self.batch.prefilling:
                    started, prefill_before = time.perf_counter(), self.batch.prefill_seconds
                    # A speculative step gives a sequence several tokens: count them, not sequences.
                    tokens_before = {s: len(s.tokens) for s in self.owner}
                    drafts_before = self._drafts()
                    stepped = self.batch.step()
                    prefill = self.batch.prefill_seconds - prefill_before
                    self.counters["prefill_seconds_total"] += prefill
                    self.counters["decode_seconds_total"] += time.perf_counter() - started - prefill
                    self.counters["decode_steps_total"] += bool(stepped)
                    self.counters["generation_tokens_total"] += sum(len(s.tokens) - tokens_before.get(s, 0)
                                                                    for s in stepped if s.finish_reason != "cancelled")
                    for key, before, after in zip(("drafted_total", "accepted_total"), drafts_before, self._drafts()):
                        self.counters[key] += after - before
                    for job in {self.owner[s] for s in stepped}:
                        job.ring()
                    for s in [s for s in self.owner if s.done]:
                        self.counters["cancelled_total" if s.finish_reason == "cancelled" else "completed_total"] += 1
                        del self.owner[s]
            except Exception as error:  # a failed step must not take the server down: fail its jobs
                self._fail(set(self.owner.values()) | set(jobs), f"{type(error).__name__}: {error}")
                self.owner.clear()
                self.counters["errors_total"] += 1
                # The next loop builds a fresh batch. The failed one's cache must be gone by then, or
                # both are held at once: dropped here, and the traceback's frames that also reference
                # it go with `error` at the end of this block.
                self.batch = None

    def _rebuild(self) -> None:
        """A fresh batch; if even that fails (out of memory), fail the queue and retry shortly."""
        try:
            self.batch = self.engine.new_batch(self.limits.max_concurrent, self.capacity)
            return
        except Exception as error:
            message = f"the scheduler could not allocate its batch: {type(error).__name__}: {error}"
        self.counters["errors_total"] += 1
        with self.wakeup:
            queued = list(self.queue)
            self.queue.clear()
        self._fail(queued, message)
        with self.wakeup:
            if not self.stopping:
                self.wakeup.wait(REBUILD_RETRY_SECONDS)

    def _drafts(self) -> tuple[int, int]:
        """Drafts made and accepted so far by the current batch (zeros when it does not speculate)."""
        return getattr(self.batch, "drafted", 0), getattr(self.batch, "accepted", 0)

    @staticmethod
    def _fail(jobs, message: str) -> None:
        for job in jobs:
            job.error = message
            job.cancel()
            job.ring()

    def metrics(self) -> str:
        c, batch = self.counters, self.batch
        prefix = self.engine.prefix_cache.stats() if self.engine.prefix_cache else collections.Counter()
        lines = []
        for name, kind, value, help_text in [
            ("requests_total", "counter", c["requests_total"], "Requests accepted into the queue."),
            ("requests_rejected_total", "counter", c["rejected_total"], "Requests answered 429 (queue full)."),
            ("sequences_completed_total", "counter", c["completed_total"], "Sequences that finished."),
            ("sequences_cancelled_total", "counter", c["cancelled_total"], "Sequences dropped (client gone, timeout)."),
            ("scheduler_errors_total", "counter", c["errors_total"], "Decode steps or batch rebuilds that raised."),
            ("prompt_tokens_total", "counter", c["prompt_tokens_total"],
             "Prompt tokens admitted (prefilled, or reused from the prefix cache)."),
            ("generation_tokens_total", "counter", c["generation_tokens_total"], "Tokens generated."),
            ("decode_steps_total", "counter", c["decode_steps_total"], "Batched decode steps."),
            ("speculative_drafted_total", "counter", c["drafted_total"], "MTP draft tokens verified (--speculative)."),
            ("speculative_accepted_total", "counter", c["accepted_total"], "MTP draft tokens accepted (--speculative)."),
            ("prefill_seconds_total", "counter", c["prefill_seconds_total"], "Time in prefill."),
            ("decode_seconds_total", "counter", c["decode_seconds_total"], "Time in decode steps."),
            ("running_sequences", "gauge", len(batch.sequences) if batch else 0, "Sequences in the running batch."),
            ("prefilling_sequences", "gauge", sum(len(g) for _, groups in batch.prefilling for g in groups) if batch else 0,
             "Sequences whose prompts are being prefilled, a chunk per step."),
            ("scheduler_up", "gauge", int(self.running), "1 while the scheduler serves requests (as /health)."),
            ("queued_requests", "gauge", len(self.queue), "Requests waiting for rows."),
            ("max_concurrent_sequences", "gauge", self.limits.max_concurrent, "Rows of the running batch."),
            ("decode_recompiles_total", "counter", self.engine.decode_recompiles,
             "Compiles of the decode step after the warm-up (--compile): shapes it did not cover."),
            ("prefix_cache_lookups_total", "counter", prefix["lookups"], "Prompts looked up in the prefix cache."),
            ("prefix_cache_hits_total", "counter", prefix["hits"], "Prompts that reused cached rows of a prefix."),
            ("prefix_cache_hit_tokens_total", "counter", prefix["hit_tokens"], "Prompt tokens reused, not prefilled."),
            ("prefix_cache_stored_bytes", "gauge", prefix["stored_bytes"], "Bytes of cached prefix rows held."),
            ("prefix_cache_evictions_total", "counter", prefix["evictions"], "Prefix blocks evicted (LRU) for room."),
        ]:
            lines += [f"# HELP nanoseek_{name} {help_text}", f"# TYPE nanoseek_{name} {kind}", f"nanoseek_{name} {value}"]
        return "\n".join(lines) + "\n"


# ---- request validation ----------------------------------------------------------------------------
_MISSING = object()


def _get(body: dict, name: str, kinds: tuple, default: Any = _MISSING) -> Any:
    value = body.get(name)
    if value is None:  # absent and null both mean "the default", as in OpenAI's API
        if default is _MISSING:
            raise APIError(400, f"'{name}' is a required property", name, "missing_required_parameter")
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise APIError(400, f"'{name}' must be {names}, got {type(value).__name__}", name, "invalid_type")
    return value


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = _get(body, name, (int, float), default)
    value = default if value is None else float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise APIError(400, f"'{name}' must be between {low} and {high}, got {value}", name, "invalid_value")
    return value


class OpenAIServer:
    """The FastAPI application over one model and tokenizer."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, limits: ServerLimits | None = None):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.limits = limits or ServerLimits()
        self.scheduler = Scheduler(engine, self.limits)
        # The most bytes one token's text can stand for (a partial UTF-8 character decodes to U+FFFD,
        # 3 bytes, at least the bytes it replaces): a text of C characters, at least C bytes, is at
        # least C / this many tokens. Sound for tokenizers that decode back to what they encoded (no
        # normalizer: nanoseek's byte-level BPE), which lets an over-long prompt be refused unread.
        self.max_token_bytes = max(len(tokenizer.decode([i]).encode()) for i in range(tokenizer.vocab_size))
        self.created = int(time.time())
        self.app = self._build_app()

    def close(self) -> None:
        self.scheduler.stop()

    # ---- app -------------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="nanoseek", docs_url=None, redoc_url=None)

        @app.exception_handler(APIError)
        async def api_error(request: Request, error: APIError):
            return error.response()

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, error: StarletteHTTPException):
            return APIError(error.status_code, str(error.detail), code=str(error.status_code)).response()

        @app.exception_handler(RequestValidationError)
        async def validation_error(request: Request, error: RequestValidationError):
            return APIError(400, str(error.errors()[:1])).response()

        @app.exception_handler(Exception)  # a bug in a handler: still an OpenAI-shaped body
        async def internal_error(request: Request, error: Exception):
            return APIError(500, f"{type(error).__name__}: {error}", kind="server_error").response()

        @app.get("/health")
        async def health():
            self._check_running()
            batch = self.scheduler.batch
            return {"status": "ok", "model": self.model_name, "running": len(batch.sequences) if batch else 0,
                    "queued": len(self.scheduler.queue)}

        @app.get("/metrics")
        async def metrics():
            return PlainTextResponse(self.scheduler.metrics(), media_type="text/plain; version=0.0.4")

        @app.get("/v1/models")
        async def models(request: Request):
            self._authorize(request)
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                                "owned_by": "nanoseek"}]}

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            body = await self._body(request)
            messages = _get(body, "messages", (list,))
            if not messages:
                raise APIError(400, "'messages' must not be empty", "messages")
            conversation = [self._message(i, m) for i, m in enumerate(messages)]
            self._check_length(sum(len(m["content"]) for m in conversation), "messages")
            try:
                # Off the event loop, which serves the other clients meanwhile if the tokenizer lets go
                # of the GIL (measured: `tokenizers` does in encode_batch, not in encode, so today the
                # character bound above is what keeps this short).
                prompt = await asyncio.to_thread(self.tokenizer.render_prompt, conversation)
            except (KeyError, ValueError) as error:
                raise APIError(400, str(error), "messages") from None
            return await self._complete(request, body, [prompt], chat=True, prompt_param="messages")

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await self._body(request)
            raw = _get(body, "prompt", (str, list))
            items = raw if isinstance(raw, list) and raw and not all(isinstance(t, int) for t in raw) else [raw]
            for item in items:
                if isinstance(item, str):
                    self._check_length(len(item), "prompt")
                elif not (isinstance(item, list) and item and all(
                        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.engine.model.config.vocab_size
                        for t in item)):
                    raise APIError(400, "'prompt' must be a string, a list of strings, or token ids in the vocabulary",
                                   "prompt", "invalid_value")
            prompts = await asyncio.to_thread(lambda: [self.tokenizer.encode_document(item)
                                                       if isinstance(item, str) else list(item) for item in items])
            return await self._complete(request, body, prompts, chat=False, prompt_param="prompt")

        return app

    # ---- helpers ---------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.limits.api_key:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.limits.api_key}".encode()):
                raise APIError(401, "invalid or missing API key", code="invalid_api_key", kind="authentication_error")

    def _check_running(self) -> None:
        if not self.scheduler.running:
            raise APIError(503, "the scheduler is not running; retry later", code="scheduler_unavailable",
                           kind="server_error")

    def _check_length(self, characters: int, param: str) -> None:
        """Refuse, before tokenising, a text too long for the context whatever its tokens: cheap, so a
        huge prompt costs its sender the upload and nobody else anything."""
        at_least = -(-characters // self.max_token_bytes)
        if at_least >= self.scheduler.capacity:
            raise APIError(400, f"this model's maximum context length is {self.scheduler.capacity} tokens; the prompt "
                           f"has at least {at_least}", param, "context_length_exceeded")

    async def _read(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
        too_large = APIError(413, f"the request body exceeds the server's limit of {limit} bytes",
                             code="request_too_large")
        if int(request.headers.get("content-length") or 0) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():  # a chunked upload declares no length
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _body(self, request: Request) -> dict:
        """The validated JSON body of a /v1 POST (authorised, known model)."""
        self._authorize(request)
        try:
            body = json.loads(await self._read(request))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise APIError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        model = _get(body, "model", (str,))
        if model != self.model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server has '{self.model_name}'",
                           "model", "model_not_found")
        return body

    @staticmethod
    def _message(index: int, message: Any) -> dict[str, str]:
        param = f"messages.[{index}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{param} must be an object", param, "invalid_type")
        role = _get(message, "role", (str,))
        content = _get(message, "content", (str, list))
        if isinstance(content, list):  # content parts: only text parts carry meaning for this model
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise APIError(400, f"{param}.content: only text parts are supported", param, "invalid_value")
            content = "".join(p["text"] for p in content)
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"{param}.role must be system, user or assistant, got {role!r}", param, "invalid_value")
        return {"role": role, "content": content}

    def _params(self, body: dict, prompt_tokens: int, prompt_param: str) -> tuple[SamplingParams, int]:
        room = self.scheduler.capacity - prompt_tokens
        if room < 1:
            raise APIError(400, f"this model's maximum context length is {self.scheduler.capacity} tokens; the prompt "
                           f"has {prompt_tokens}", prompt_param, "context_length_exceeded")
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _get(body, name, (int,), None)
        if max_tokens is None:
            max_tokens = room
        if max_tokens < 1:
            raise APIError(400, f"'{name}' must be at least 1, got {max_tokens}", name, "invalid_value")
        if max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {self.scheduler.capacity} tokens; the prompt "
                           f"({prompt_tokens}) plus {name} ({max_tokens}) exceeds it", name, "context_length_exceeded")
        n = _get(body, "n", (int,), 1)
        if not 1 <= n <= self.limits.max_concurrent:
            raise APIError(400, f"'n' must be between 1 and {self.limits.max_concurrent}, got {n}", "n", "invalid_value")
        stop = _get(body, "stop", (str, list), None) or []
        stop = [stop] if isinstance(stop, str) else stop
        if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
            raise APIError(400, f"'stop' must be a non-empty string or up to {MAX_STOP_STRINGS} of them", "stop",
                           "invalid_value")
        seed = _get(body, "seed", (int,), None)
        top_k = _get(body, "top_k", (int,), 0)  # extension (vLLM): 0 or -1 switch it off
        if top_k < -1:
            raise APIError(400, f"'top_k' must be -1, 0 or positive, got {top_k}", "top_k", "invalid_value")
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0:
            raise APIError(400, "'top_p' must be greater than 0", "top_p", "invalid_value")
        params = SamplingParams(max_new_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                                top_k=max(top_k, 0), top_p=top_p, seed=seed, stop=stop,
                                ignore_eos=_get(body, "ignore_eos", (bool,), False))  # extension (vLLM)
        return params, n

    async def _complete(self, request: Request, body: dict, prompts: list[list[int]], chat: bool, prompt_param: str):
        stream = _get(body, "stream", (bool,), False)
        stream_options = _get(body, "stream_options", (dict,), None) or {}
        prompt_tokens = max(map(len, prompts))
        params, n = self._params(body, prompt_tokens, prompt_param)
        if n * len(prompts) > self.limits.max_concurrent:
            raise APIError(400, f"{n * len(prompts)} sequences exceed the server's {self.limits.max_concurrent} "
                           "concurrent rows", "n", "invalid_value")
        self._check_running()
        job = Job(self.engine.sequences(prompts, params, n), asyncio.get_running_loop())
        if not self.scheduler.submit(job):
            raise APIError(429, "the server is at capacity and its queue is full; retry later",
                           code="rate_limit_exceeded", kind="rate_limit_error")
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12), "created": int(time.time()),
                "model": self.model_name}
        usage = lambda: {"prompt_tokens": sum(len(p) for p in prompts),  # noqa: E731
                         "completion_tokens": sum(len(s.tokens) for s in job.sequences),
                         "total_tokens": sum(len(p) for p in prompts) + sum(len(s.tokens) for s in job.sequences)}
        deadline = time.monotonic() + self.limits.request_timeout
        if stream:
            return StreamingResponse(self._stream(job, meta, chat, deadline, usage,
                                                  bool(stream_options.get("include_usage"))),
                                     media_type="text/event-stream")
        try:
            while not all(s.done for s in job.sequences):
                failed = await self._wait(job, deadline)
                if job.error:
                    raise APIError(500, job.error, kind="server_error")
                if failed:
                    raise APIError(504, f"the request did not finish within {self.limits.request_timeout} s",
                                   code="timeout", kind="timeout_error")
                if await request.is_disconnected():
                    raise APIError(499, "the client closed the connection", code="client_closed")
        finally:
            job.cancel()  # no-op for finished sequences; frees rows if the handler itself was cancelled
        choices = []
        for s in job.sequences:
            index = s.prompt_index * n + s.sample_index
            if chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": s.text()},
                                "logprobs": None, "finish_reason": s.finish_reason})
            else:
                choices.append({"index": index, "text": s.text(), "logprobs": None, "finish_reason": s.finish_reason})
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": usage()}

    async def _wait(self, job: Job, deadline: float) -> bool:
        """Wait for the doorbell; True if the job failed or ran out of time instead."""
        try:
            await asyncio.wait_for(job.doorbell.wait(), timeout=max(deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:  # not the built-in TimeoutError before Python 3.11
            return True
        job.doorbell.clear()
        return job.error is not None

    async def _stream(self, job: Job, meta: dict, chat: bool, deadline: float, usage, include_usage: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"
        n = len(job.groups[0])

        def chunk(seq: Sequence, text: str | None, finish: str | None, role: bool = False) -> str:
            index = seq.prompt_index * n + seq.sample_index
            if chat:
                delta = ({"role": "assistant"} if role else {}) | ({} if text is None else {"content": text})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            payload = {**meta, "object": kind, "choices": [choice]}
            if include_usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n"

        sent = {s: 0 for s in job.sequences}
        closed: set[Sequence] = set()
        try:
            if chat:
                for s in job.sequences:
                    yield chunk(s, "", None, role=True)
            while len(closed) < len(sent):
                failed = await self._wait(job, deadline)
                for s in job.sequences:
                    if s in closed:
                        continue
                    # `done` before the text: the scheduler thread appends a sequence's last token
                    # before marking it done, so text read after seeing done is the final text.
                    done = s.done
                    text = s.stream_text()
                    if len(text) > sent[s]:
                        yield chunk(s, text[sent[s]:], None)
                        sent[s] = len(text)
                    if done and s.finish_reason != "cancelled":
                        yield chunk(s, None if chat else "", s.finish_reason)
                        closed.add(s)
                if failed:
                    message = job.error or f"the request did not finish within {self.limits.request_timeout} s"
                    yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
                    break
            if include_usage:
                yield f"data: {json.dumps({**meta, 'object': kind, 'choices': [], 'usage': usage()})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            # Runs when the client disconnects too (the response task is cancelled): the scheduler
            # drops these sequences at its next step.
            job.cancel()


def serve_model(model_dir: str, host: str = "127.0.0.1", port: int = 8000, limits: ServerLimits | None = None,
                model_name: str | None = None, compile: bool = False, prefix_cache_bytes: int = 0,
                speculative: bool = False, draft_tokens: int = 1) -> None:
    """Load a model folder (weights, config, tokenizer) and serve it until interrupted."""
    import uvicorn

    from nanoseek.infer.chat import load_engine

    limits = limits or ServerLimits()
    engine, tokenizer = load_engine(model_dir, compile, rows=limits.max_concurrent, prefix_cache_bytes=prefix_cache_bytes,
                                    speculative=speculative, draft_tokens=draft_tokens)
    server = OpenAIServer(engine, tokenizer, model_name or os.path.basename(os.path.normpath(model_dir)), limits)
    print(f"serving {server.model_name} on http://{host}:{port}/v1 "
          f"({server.limits.max_concurrent} concurrent sequences, queue {server.limits.max_queue})")
    try:
        uvicorn.run(server.app, host=host, port=port, log_level="warning")
    finally:
        server.close()
