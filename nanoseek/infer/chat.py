"""The `generate`, `chat` and `serve` verbs: a model folder (weights, config, tokenizer) in, text out."""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from nanoseek.generate import room_for_reply
from nanoseek.infer.engine import Engine, Sequence
from nanoseek.infer.sampling import SamplingParams


COMPILE_CACHE_ENV = "NANOSEEK_COMPILE_CACHE"
PREFIX_CACHE_MB = 1024  # the server's and chat's default bound on cached prefix rows


def prefix_cache_bytes(megabytes: int) -> int:
    """--prefix-cache-mb in bytes, refused by its own name when negative."""
    if megabytes < 0:
        raise ValueError(f"--prefix-cache-mb must be >= 0 (0 turns the prefix cache off), got {megabytes}")
    return megabytes << 20


def use_compile_cache() -> str:
    """Point torch.compile's on-disk caches (inductor's compiled graphs, AOTAutograd's, Triton's
    kernels) at a per-user folder that outlives the process and a reboot, unlike inductor's default
    under /tmp, so the warm-up's compiles are paid once per machine: $NANOSEEK_COMPILE_CACHE, else an
    explicit $TORCHINDUCTOR_CACHE_DIR, else ~/.cache/nanoseek/compile ($XDG_CACHE_HOME respected).
    Returns the folder."""
    folder = os.environ.get(COMPILE_CACHE_ENV) or os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "nanoseek", "compile")
    # Inductor reads it at each cache access, and sets it to its default at the first (which
    # building a compiled Engine already makes): call this before.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder


def load_engine(model_dir: str, compile: bool = False, rows: int = 1, prefix_cache_bytes: int = 0,
                speculative: bool = False, draft_tokens: int = 1):
    """The engine and tokenizer of a model folder; with `compile`, the decode step is compiled now
    (for batches of `rows` rows) rather than at the first request, through the on-disk compile cache
    (`use_compile_cache`); with `speculative`, every step drafts `draft_tokens` tokens with the
    model's MTP module. The tokenizer is nanoseek's own or the checkpoint's (a Hugging Face
    DeepSeek release: its tokenizer.json and chat template)."""
    from nanoseek.model.checkpoint import load
    from nanoseek.tokenizer import load_tokenizer

    model = load(model_dir)
    tokenizer = load_tokenizer(model_dir)
    if speculative and not len(model.mtp):
        raise ValueError(f"{model_dir} has no MTP module (num_nextn_predict_layers = 0) to draft with")
    eos = set(model.config.eos_token_ids) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())
    compile_cache = use_compile_cache() if compile else None
    engine = Engine(model, eos_token_ids=sorted(eos), decode=tokenizer.decode, compile=compile,
                    prefix_cache_bytes=prefix_cache_bytes, speculative=speculative, draft_tokens=draft_tokens)
    if compile:
        print(f"compiling the decode step (once per batch shape; about half a minute each on 2 cores, "
              f"less once {compile_cache} holds it)...", file=sys.stderr)
        print(f"compiled in {engine.warm_up(rows):.1f} s", file=sys.stderr)
    return engine, tokenizer


def stream_reply(engine: Engine, prompt: list[int], params: SamplingParams,
                 out: TextIO | None = None) -> tuple[Sequence, str]:
    """Print the continuation of `prompt` as it is generated (to `out`, default the sys.stdout of the
    moment). Returns the finished sequence and a summary: tokens, decode tokens/s (measured from the
    first token to the last, as the benchmark does) and, when the context cut the reply short, that it did."""
    out = out or sys.stdout
    shown, times = 0, []
    seq = None
    for (seq,) in engine.stream([prompt], params):
        times.append((time.perf_counter(), len(seq.tokens)))  # a speculative step yields several tokens
        text = seq.stream_text()
        out.write(text[shown:])
        out.flush()
        shown = len(text)
    rate = (times[-1][1] - times[0][1]) / (times[-1][0] - times[0][0]) if len(times) > 1 else 0.0
    summary = f"{len(seq.tokens)} tokens, {rate:.1f} tok/s"
    if seq.finish_reason == "length" and len(prompt) + len(seq.tokens) >= engine.context_length:
        summary += f"; stopped: the context of {engine.context_length} tokens is full"
    return seq, summary


def generate(model_dir: str, prompt: str = "", max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, chat_template: bool = False, compile: bool = False,
             speculative: bool = False, draft_tokens: int = 1) -> str:
    """Continue --prompt (empty: start a document) or, with --chat-template, answer it as a user
    message; streams the text and reports tokens/s on stderr. Stops early where the model's context
    (max_position_embeddings) is full. --compile: torch.compile the decode step first (faster decoding
    on CPU after a one-off compile; see docs/serving.md). --speculative: draft --draft-tokens tokens per
    step with the model's MTP module and verify them in one forward (same output distribution)."""
    engine, tokenizer = load_engine(model_dir, compile, speculative=speculative, draft_tokens=draft_tokens)
    ids = (tokenizer.render_prompt([{"role": "user", "content": prompt}]) if chat_template
           else tokenizer.encode_document(prompt))
    params = SamplingParams(max_new_tokens=room_for_reply(len(ids), max_new_tokens, engine.context_length),
                            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if not chat_template:
        sys.stdout.write(prompt)
    seq, summary = stream_reply(engine, ids, params)
    print(f"\n[{summary}]", file=sys.stderr)
    return seq.text()


def chat(model_dir: str, system: str | None = None, max_new_tokens: int = 512, temperature: float = 0.7,
         top_k: int = 0, top_p: float = 0.95, seed: int | None = None, compile: bool = True,
         prefix_cache_mb: int = PREFIX_CACHE_MB, speculative: bool = False, draft_tokens: int = 1) -> None:
    """Interactive chat with a model folder: streams each reply, keeps the conversation through the
    model's chat template, and shows tokens/s. /clear starts over; /exit or Ctrl-D quits. The decode
    step is compiled first (faster decoding on CPU; the compile is cached on disk, see docs/serving.md);
    --no-compile skips that. Each turn reuses the cached rows of the conversation so far (up to
    --prefix-cache-mb MiB; 0 turns that off) and prefills only the new message. --speculative: MTP
    drafting of --draft-tokens tokens per step (see `generate`)."""
    engine, tokenizer = load_engine(model_dir, compile, prefix_cache_bytes=prefix_cache_bytes(prefix_cache_mb),
                                    speculative=speculative, draft_tokens=draft_tokens)
    start = [{"role": "system", "content": system}] if system else []
    conversation = list(start)
    print(f"chatting with {model_dir} (/clear starts over, /exit quits)")
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/clear":
            conversation = list(start)
            continue
        if not line:
            continue
        conversation.append({"role": "user", "content": line})
        prompt = tokenizer.render_prompt(conversation)
        # Forget the oldest exchanges (never the system prompt) until the reply has room.
        while len(prompt) + max_new_tokens > engine.context_length and len(conversation) > len(start) + 1:
            del conversation[len(start):len(start) + 2]
            prompt = tokenizer.render_prompt(conversation)
        try:
            budget = room_for_reply(len(prompt), max_new_tokens, engine.context_length)
        except ValueError as error:
            print(f"[message not sent: {error}]")
            conversation.pop()
            continue
        params = SamplingParams(max_new_tokens=budget, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        seq, summary = stream_reply(engine, prompt, params)
        print(f"\n[{summary}]")
        conversation.append({"role": "assistant", "content": seq.text()})


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, max_concurrent: int = 8, max_queue: int = 32,
          request_timeout: float = 600.0, max_context: int | None = None, api_key: str | None = None,
          max_body_bytes: int = 4 << 20, compile: bool = True, prefix_cache_mb: int = PREFIX_CACHE_MB,
          speculative: bool = False, draft_tokens: int = 1) -> None:
    """OpenAI-compatible HTTP server for a model folder (/v1/chat/completions, /v1/completions, /v1/models,
    /health, /metrics) with continuous batching. Binds 127.0.0.1 unless --host says otherwise. Set the API
    key in $NANOSEEK_API_KEY (recommended: --api-key shows in the process list; neither: no authentication).
    Request bodies over --max-body-bytes get 413. The decode steps are compiled at startup (faster
    decoding; batches of any size reuse a few graphs; cached on disk, see docs/serving.md); --no-compile
    skips that. Prompts reuse the cached rows of earlier prompts' prefixes (up to --prefix-cache-mb MiB;
    0 turns that off) and prefill only the rest. --speculative: every step drafts --draft-tokens tokens
    with the model's MTP module and verifies them in one forward, greedy or sampled, with the output
    distribution of plain decoding."""
    from nanoseek.infer.server import ServerLimits, serve_model

    limits = ServerLimits(max_concurrent=max_concurrent, max_queue=max_queue, request_timeout=request_timeout,
                          max_context=max_context, api_key=api_key, max_body_bytes=max_body_bytes)
    serve_model(model_dir, host, port, limits, compile=compile, prefix_cache_bytes=prefix_cache_bytes(prefix_cache_mb),
                speculative=speculative, draft_tokens=draft_tokens)
