"""The OpenAI-compatible server, started on a loopback port and driven by the official `openai` client
(and raw httpx for requests that client refuses to send)."""

import asyncio
import contextlib
import itertools
import json
import socket
import threading
import time
import types
import weakref

import httpx
import openai
import pytest
import uvicorn

from conftest import random_model, tiny_config
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer import server as server_module
from nanoseek.infer.engine import DecodeBatch
from nanoseek.infer.server import OpenAIServer, ServerLimits
from nanoseek.tokenizer import train_tokenizer

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, how are you today?",
         "numbers 0123456789 and symbols !?.,;:"] * 20


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=320)


@pytest.fixture(scope="module")
def model(tokenizer):
    # Big enough that a decode step takes a few milliseconds, so request timing is not all HTTP.
    config = tiny_config(vocab_size=tokenizer.vocab_size, hidden_size=128, num_hidden_layers=4,
                         max_position_embeddings=256)
    return random_model(config, std=0.1)


@contextlib.contextmanager
def running_server(model, tokenizer, speculative=False, **limits):
    engine = Engine(model, eos_token_ids=[tokenizer.eos_id], decode=tokenizer.decode, speculative=speculative)
    server = OpenAIServer(engine, tokenizer, "tiny", ServerLimits(**limits))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(server.app, log_level="error", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if uv.started:
            break
        time.sleep(0.02)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield base, server
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        server.close()
        sock.close()


@pytest.fixture(scope="module")
def server(model, tokenizer):
    with running_server(model, tokenizer, max_concurrent=4, max_queue=8, max_context=256) as running:
        yield running


def client(base, **kw):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30, **kw)


def wait_until(predicate, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def metric(base, name):
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(f"nanoseek_{name} "):
            return float(line.split()[1])
    raise KeyError(name)


def test_models_health_metrics(server):
    base, _ = server
    assert [m.id for m in client(base).models.list().data] == ["tiny"]
    assert httpx.get(base + "/health").json()["status"] == "ok"
    text = httpx.get(base + "/metrics").text
    assert "# TYPE nanoseek_generation_tokens_total counter" in text and "nanoseek_running_sequences 0" in text


def test_chat_completion_matches_engine_and_usage(server, model, tokenizer):
    base, _ = server
    messages = [{"role": "user", "content": "hello world"}]
    reply = client(base).chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    prompt = tokenizer.render_prompt(messages)
    expected = Engine(model, eos_token_ids=[tokenizer.eos_id], decode=tokenizer.decode).generate(
        [prompt], SamplingParams(max_new_tokens=12))[0][0]
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == len(expected.tokens)
    assert reply.usage.total_tokens == len(prompt) + len(expected.tokens)


def test_stream_equals_non_stream(server):
    base, _ = server
    kw = dict(model="tiny", messages=[{"role": "user", "content": "the quick brown fox"}], max_tokens=20,
              temperature=0.8, seed=3, extra_body={"ignore_eos": True})
    whole = client(base).chat.completions.create(**kw)
    chunks = list(client(base).chat.completions.create(stream=True, **kw))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    # The raw event stream ends with data: [DONE].
    with httpx.stream("POST", base + "/v1/chat/completions", json={**{k: v for k, v in kw.items() if k != "extra_body"},
                                                                  "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_completions_plain_and_streamed(server, tokenizer):
    base, _ = server
    c = client(base)
    whole = c.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 8
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="hello", max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert streamed == whole.choices[0].text
    ids = c.completions.create(model="tiny", prompt=[tokenizer.bos_id] + tokenizer.encode("hello"), max_tokens=8,
                               temperature=0, extra_body={"ignore_eos": True})
    assert ids.choices[0].text == whole.choices[0].text


def test_concurrent_requests_get_their_own_answers(server):
    base, _ = server
    prompts = ["hello world", "the lazy dog", "numbers 0123", "how are you"]

    async def run():
        c = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)
        return await asyncio.gather(*[c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": p}], max_tokens=10, temperature=0) for p in prompts])

    together = asyncio.run(run())
    alone = [client(base).chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}],
                                                  max_tokens=10, temperature=0) for p in prompts]
    assert [r.choices[0].message.content for r in together] == [r.choices[0].message.content for r in alone]


def test_continuous_batching_short_request_overtakes_long_stream(server):
    base, srv = server
    before = metric(base, "generation_tokens_total")
    started = threading.Event()

    def long_stream():
        stream = client(base).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "tell a long story"}], max_tokens=200,
            temperature=0, stream=True, extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                started.set()

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert started.wait(10)
    short = client(base).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    long_so_far = [len(s.tokens) for s in srv.scheduler.batch.sequences]  # the long stream's tokens right now
    thread.join(30)
    assert short.usage.completion_tokens == 4
    # The short request joined the running batch: it finished before the long one's 64th token.
    assert len(long_so_far) == 1 and long_so_far[0] < 64, long_so_far
    assert metric(base, "generation_tokens_total") - before == 204


def test_client_disconnect_frees_its_row(server):
    base, _ = server
    before = metric(base, "sequences_cancelled_total")
    with httpx.stream("POST", base + "/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 200, "stream": True,
            "temperature": 0, "ignore_eos": True}) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i >= 6:
                break
    assert wait_until(lambda: metric(base, "running_sequences") == 0)
    assert metric(base, "sequences_cancelled_total") == before + 1


def test_full_queue_answers_429(model, tokenizer):
    # The first stream holds the only row (250 tokens at >= 40 ms a step) until the client closes it;
    # the sleep keeps a fast machine from finishing it while the test is still filling the queue.
    slow = model.register_forward_pre_hook(lambda *_: time.sleep(0.04))
    try:
        full_queue_scenario(model, tokenizer)
    finally:
        slow.remove()


def full_queue_scenario(model, tokenizer):
    with running_server(model, tokenizer, max_concurrent=1, max_queue=1, max_context=256) as (base, srv):
        body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 250,
                "stream": True, "temperature": 0, "ignore_eos": True}
        with httpx.Client(timeout=30) as http, http.stream("POST", base + "/v1/chat/completions", json=body) as first:
            lines = first.iter_lines()  # keep the iterator: dropping it closes the connection
            next(lines)  # running: holds the only row
            queued = threading.Thread(target=lambda: httpx.post(base + "/v1/chat/completions", timeout=30,
                                                                json={**body, "stream": False, "max_tokens": 2}))
            queued.start()
            assert wait_until(lambda: len(srv.scheduler.queue) == 1)
            with pytest.raises(openai.RateLimitError) as error:
                client(base).chat.completions.create(model="tiny", messages=body["messages"], max_tokens=2)
            assert error.value.status_code == 429
        queued.join(30)
        assert metric(base, "requests_rejected_total") == 1


def test_api_key(model, tokenizer):
    with running_server(model, tokenizer, max_concurrent=1, max_context=256, api_key="sesame") as (base, _):
        with pytest.raises(openai.AuthenticationError):
            client(base).models.list()
        ok = openai.OpenAI(base_url=base + "/v1", api_key="sesame", max_retries=0)
        assert ok.models.list().data[0].id == "tiny"


@pytest.mark.parametrize("payload, status, param", [
    (b"{not json", 400, None),
    ([1, 2], 400, None),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi " * 400}]}, 400, "messages"),
    ({"model": "tiny", "messages": "hi"}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.[0]"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ({"model": "tiny"}, 400, "messages"),
])
def test_bad_requests_get_openai_errors(server, payload, status, param):
    base, _ = server
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    response = httpx.post(base + "/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    # ...and the server still serves.
    assert httpx.get(base + "/health").json()["running"] == 0


def test_bad_completions_prompt_and_client_errors(server):
    base, _ = server
    assert httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": [10**9]}).status_code == 400
    assert httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "x " * 400}).status_code == 400
    with pytest.raises(openai.BadRequestError):
        client(base).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        client(base).chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert httpx.get(base + "/v1/nothing").json()["error"]["code"] == "404"


# ---- sampling options over HTTP ---------------------------------------------------------------------
def test_stop_strings_over_http_plain_and_streamed(server):
    base, _ = server
    kw = dict(model="tiny", messages=[{"role": "user", "content": "hello world"}], max_tokens=30, temperature=0,
              extra_body={"ignore_eos": True})
    free = client(base).chat.completions.create(**kw).choices[0].message.content
    stop = free[10:13]  # a stop string that the greedy output contains, cut wherever it falls
    expected = free[:free.index(stop)]
    cut = client(base).chat.completions.create(stop=[stop, "never in this text"], **kw)
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    chunks = list(client(base).chat.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_samples_over_http_match_the_engine(server, model, tokenizer):
    base, _ = server
    messages = [{"role": "user", "content": "the lazy dog"}]
    kw = dict(model="tiny", messages=messages, max_tokens=10, temperature=1.0, seed=5, n=3,
              extra_body={"ignore_eos": True})
    reply = client(base).chat.completions.create(**kw)
    expected = Engine(model, decode=tokenizer.decode).generate(
        [tokenizer.render_prompt(messages)], SamplingParams(max_new_tokens=10, temperature=1.0, seed=5, ignore_eos=True),
        n=3)[0]
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.message.content for c in reply.choices] == [c.text for c in expected]
    assert len({c.text for c in expected}) > 1  # the samples differ, so the indices are checked
    streamed = {}
    for chunk in client(base).chat.completions.create(stream=True, **kw):
        choice = chunk.choices[0]
        streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert [streamed[i] for i in range(3)] == [c.text for c in expected]


# ---- context limits ---------------------------------------------------------------------------------
def test_max_context_past_the_model_is_refused(model, tokenizer):
    engine = Engine(model, decode=tokenizer.decode)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        OpenAIServer(engine, tokenizer, "tiny", ServerLimits(max_context=model.config.max_position_embeddings + 1))


def test_generation_that_fills_the_context_ends_with_length(model, tokenizer):
    with running_server(model, tokenizer, max_concurrent=1, max_context=40) as (base, _):
        messages = [{"role": "user", "content": "hello world"}]
        reply = client(base).chat.completions.create(model="tiny", messages=messages, temperature=0,
                                                     extra_body={"ignore_eos": True})
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.total_tokens == 40
        with pytest.raises(openai.BadRequestError, match="context_length_exceeded|maximum context length"):
            client(base).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi " * 40}])


# ---- failures and recovery --------------------------------------------------------------------------
@pytest.fixture
def failing_step(monkeypatch):
    """The next decode step of any batch raises (once). Patched on the class, so the failed step's
    frame, held by the traceback, references its batch as a real failure's would."""
    armed = [True]
    real_step = DecodeBatch.step

    def step(self):
        if armed[0]:
            armed[0] = False
            raise RuntimeError("injected step failure")
        return real_step(self)

    monkeypatch.setattr(DecodeBatch, "step", step)


def test_a_failed_step_answers_500_then_the_server_recovers(model, tokenizer, monkeypatch, failing_step):
    with running_server(model, tokenizer, max_concurrent=2, max_context=256) as (base, srv):
        failed_batch = weakref.ref(srv.scheduler.batch)
        alive_at_rebuild = []

        def rebuild(*args):
            alive_at_rebuild.append(failed_batch() is not None)
            return DecodeBatch(srv.engine, *args)

        monkeypatch.setattr(srv.engine, "new_batch", rebuild)
        kw = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        with pytest.raises(openai.InternalServerError, match="injected step failure") as error:
            client(base).chat.completions.create(**kw)
        assert error.value.status_code == 500
        assert client(base).chat.completions.create(**kw).usage.completion_tokens >= 1
        assert alive_at_rebuild == [False]  # the failed batch's cache was freed before the new one
        assert httpx.get(base + "/health").status_code == 200
        assert metric(base, "scheduler_errors_total") == 1


def test_a_failed_rebuild_is_retried_and_health_says_503_meanwhile(model, tokenizer, monkeypatch, failing_step):
    monkeypatch.setattr(server_module, "REBUILD_RETRY_SECONDS", 0.05)
    with running_server(model, tokenizer, max_concurrent=2, max_context=256) as (base, srv):
        out_of_memory = threading.Event()
        out_of_memory.set()

        def rebuild(*args):
            if out_of_memory.is_set():
                raise RuntimeError("injected out of memory")
            return DecodeBatch(srv.engine, *args)

        monkeypatch.setattr(srv.engine, "new_batch", rebuild)
        kw = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        with pytest.raises(openai.InternalServerError):
            client(base).chat.completions.create(**kw)
        assert wait_until(lambda: httpx.get(base + "/health").status_code == 503)
        assert httpx.get(base + "/health").json()["error"]["code"] == "scheduler_unavailable"
        with pytest.raises(openai.InternalServerError) as error:
            client(base).chat.completions.create(**kw)
        assert error.value.status_code == 503
        assert metric(base, "scheduler_up") == 0
        out_of_memory.clear()
        assert wait_until(lambda: httpx.get(base + "/health").status_code == 200)
        assert client(base).chat.completions.create(**kw).usage.completion_tokens >= 1


def test_health_is_503_when_the_scheduler_thread_is_gone(model, tokenizer):
    with running_server(model, tokenizer, max_concurrent=1, max_context=256) as (base, srv):
        srv.scheduler.stop()
        assert httpx.get(base + "/health").status_code == 503
        response = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert response.status_code == 503 and response.json()["error"]["type"] == "server_error"


class Py310TimeoutError(Exception):
    """asyncio.TimeoutError as Python 3.10 has it: not the built-in TimeoutError."""


def test_timeout_answers_504_with_python_310_asyncio(model, tokenizer, monkeypatch):
    async def wait_for(awaitable, timeout):
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except asyncio.TimeoutError:
            raise Py310TimeoutError from None

    monkeypatch.setattr(server_module, "asyncio", types.SimpleNamespace(
        **{**vars(asyncio), "TimeoutError": Py310TimeoutError, "wait_for": wait_for}))
    slow = model.register_forward_pre_hook(lambda *_: time.sleep(0.01))
    try:
        with running_server(model, tokenizer, max_concurrent=2, max_context=256, request_timeout=0.3) as (base, _):
            body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 200,
                    "ignore_eos": True}
            response = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)
            assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
            with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}) as stream:
                events = [line for line in stream.iter_lines() if line]
            assert "did not finish within 0.3 s" in json.loads(events[-2][len("data: "):])["error"]["message"]
            assert events[-1] == "data: [DONE]"
            assert wait_until(lambda: metric(base, "running_sequences") == 0)
    finally:
        slow.remove()


# ---- bounded work before admission, secrets ---------------------------------------------------------
def test_body_over_the_limit_answers_413(model, tokenizer):
    with running_server(model, tokenizer, max_concurrent=1, max_context=256, max_body_bytes=2000) as (base, _):
        url = base + "/v1/chat/completions"
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi " * 700}], "max_tokens": 2}
        declared = httpx.post(url, json=body)
        chunked = httpx.post(url, content=(json.dumps(body)[i:i + 100].encode() for i in range(0, 2200, 100)))
        for response in (declared, chunked):
            assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
        with pytest.raises(openai.APIStatusError) as error:
            client(base).chat.completions.create(**body)
        assert error.value.status_code == 413
        body["messages"][0]["content"] = "hi"
        assert httpx.post(url, json=body).status_code == 200


def test_hostile_requests_are_refused_while_another_client_streams(model, tokenizer):
    """A body over the limit and a prompt far over the context, refused without reading or
    tokenising them: on the event loop, either would stall every stream for seconds."""
    slow = model.register_forward_pre_hook(lambda *_: time.sleep(0.01))
    try:
        with running_server(model, tokenizer, max_concurrent=2, max_context=256, max_body_bytes=1 << 20) as (base, _):
            arrivals, started = [], threading.Event()

            def stream():
                for chunk in client(base).chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": "go"}], max_tokens=220, temperature=0,
                        stream=True, extra_body={"ignore_eos": True}):
                    arrivals.append(time.monotonic())
                    if len(arrivals) > 2:
                        started.set()

            thread = threading.Thread(target=stream)
            thread.start()
            assert started.wait(10)
            url, header = base + "/v1/chat/completions", {"content-type": "application/json"}
            huge = {"model": "tiny", "messages": [{"role": "user", "content": "hello world " * 700_000}]}  # 8 MB
            long = {"model": "tiny", "messages": [{"role": "user", "content": "hello world " * 80_000}]}  # 1 MB
            hostile_from = time.monotonic()
            too_large = httpx.post(url, content=json.dumps(huge).encode(), headers=header, timeout=60)
            too_long = httpx.post(url, content=json.dumps(long).encode(), headers=header, timeout=60)
            hostile_until = time.monotonic()
            thread.join(60)
        assert too_large.status_code == 413
        assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
        assert arrivals[-1] > hostile_until, "the stream ended before the hostile requests did"
        during = [b - a for a, b in itertools.pairwise(arrivals) if b > hostile_from and a < hostile_until]
        assert max(during) < 1.0, max(during)
    finally:
        slow.remove()


def test_api_key_from_the_environment(model, tokenizer, monkeypatch):
    monkeypatch.setenv("NANOSEEK_API_KEY", "sesame")
    with running_server(model, tokenizer, max_concurrent=1, max_context=256) as (base, _):
        with pytest.raises(openai.AuthenticationError):
            client(base).models.list()
        ok = openai.OpenAI(base_url=base + "/v1", api_key="sesame", max_retries=0)
        assert ok.models.list().data[0].id == "tiny"


def test_speculative_server_streams_plain_greedy_and_counts_tokens_and_drafts(tokenizer):
    """`serve --speculative`: requests arriving together share speculative steps (several tokens per
    step); greedy replies, streamed or not, equal plain greedy decoding, a sampled one is served, and
    /metrics counts generated tokens (not steps) and the drafts."""
    config = tiny_config(vocab_size=tokenizer.vocab_size, num_nextn_predict_layers=1, max_position_embeddings=256)
    mtp_model = random_model(config, std=0.1, seed=2)
    prompts = ["hello world", "the quick brown fox", "numbers 0123"]
    plain_engine = Engine(mtp_model, eos_token_ids=[tokenizer.eos_id], decode=tokenizer.decode)
    expected = [plain_engine.generate([tokenizer.render_prompt([{"role": "user", "content": p}])],
                                      SamplingParams(max_new_tokens=12, ignore_eos=True))[0][0].text for p in prompts]
    with running_server(mtp_model, tokenizer, speculative=True, max_concurrent=4, max_queue=8) as (base, srv):
        async def run():
            api = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)
            ask = lambda p, **kw: api.chat.completions.create(  # noqa: E731
                model="tiny", messages=[{"role": "user", "content": p}], max_tokens=12,
                extra_body={"ignore_eos": True}, **kw)

            async def streamed(p):
                return "".join([c.choices[0].delta.content or "" async for c in await ask(p, temperature=0, stream=True)
                                if c.choices])
            return await asyncio.gather(ask(prompts[0], temperature=0), streamed(prompts[1]), streamed(prompts[2]),
                                        ask(prompts[0], temperature=0.9, seed=3))

        plain, stream1, stream2, sampled = asyncio.run(run())
        assert [plain.choices[0].message.content, stream1, stream2] == expected
        assert sampled.usage.completion_tokens == 12
        assert metric(base, "generation_tokens_total") == 4 * 12
        drafted, accepted = metric(base, "speculative_drafted_total"), metric(base, "speculative_accepted_total")
        # Each sequence's first token comes from its prefill, then one draft per verification step.
        assert 0 < drafted <= 4 * 11 and 0 <= accepted <= drafted
