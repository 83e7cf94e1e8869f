"""The OpenAI-compatible server, started on a loopback port and driven by the official `openai` client
(and raw httpx for requests that client refuses to send)."""

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from conftest import random_model, tiny_config
from nanoseek.infer import Engine, SamplingParams
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
def running_server(model, tokenizer, **limits):
    engine = Engine(model, eos_token_ids=[tokenizer.eos_id], decode=tokenizer.decode)
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
    # The first stream holds the only row (2000 tokens at >= 10 ms a step) until the client closes it;
    # the sleep keeps a fast machine from finishing it while the test is still filling the queue.
    slow = model.register_forward_pre_hook(lambda *_: time.sleep(0.01))
    try:
        full_queue_scenario(model, tokenizer)
    finally:
        slow.remove()


def full_queue_scenario(model, tokenizer):
    with running_server(model, tokenizer, max_concurrent=1, max_queue=1, max_context=2048) as (base, srv):
        body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 2000,
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
