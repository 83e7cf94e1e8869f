"""The inference engine against the plain model: greedy equality, seeded sampling, shared prefill,
absorbed decode, cache size, streaming, stops, logprobs and continuous batching (MTP speculation is in
test_speculative.py)."""

import pytest
import torch

import nanoseek.model.attention as attention
from conftest import random_model, tiny_config
from nanoseek.generate import generate
from nanoseek.infer import DecodeBatch, Engine, SamplingParams

PROMPTS = [[3, 4, 5, 6, 7], [9, 8], list(range(10, 41))]


pytestmark = pytest.mark.usefixtures("one_thread")


def full_forward_greedy(model, prompt, steps):
    """Greedy decoding by re-running the whole sequence without a cache: the obvious reference."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            ids.append(out[-1])
    return out


def letters(ids):
    """A stand-in detokenizer: token i is one letter, so stop strings are easy to place."""
    return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config())


@pytest.mark.parametrize("chunk", [512, 4])
def test_greedy_equals_full_forward(model, chunk):
    engine = Engine(model, eos_token_ids=[], prefill_chunk=chunk)
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16))
    for prompt, (completion,) in zip(PROMPTS, out):
        assert completion.tokens == full_forward_greedy(model, prompt, 16)
        assert completion.finish_reason == "length"
    assert generate(model, PROMPTS, 16) == [c[0].tokens for c in out]


def test_generate_stops_at_the_context_and_refuses_a_prompt_that_fills_it():
    model = random_model(tiny_config(max_position_embeddings=24))
    long_prompt = list(range(10, 30))  # 20 tokens: room for 4 more
    with pytest.warns(UserWarning, match="prompt 1: stopped after 4 new tokens, where the model's context of 24 "):
        out = generate(model, [PROMPTS[0], long_prompt], max_new_tokens=10, ignore_eos=True)
    assert out == [full_forward_greedy(model, PROMPTS[0], 10), full_forward_greedy(model, long_prompt, 4)]
    with pytest.raises(ValueError, match="prompt 1: the prompt has 24 tokens, which leaves no room in the model's "
                                         r"context of 24 tokens \(max_position_embeddings\)"):
        generate(model, [PROMPTS[0], list(range(24))], max_new_tokens=1)


def test_long_chunked_prefill_uses_the_expanded_form_and_matches(model):
    prompt = torch.randint(0, 128, (400,)).tolist()
    calls = []
    hook = model.layers[0].self_attn.kv_b_proj.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    try:
        chunked = Engine(model, eos_token_ids=[], prefill_chunk=130).generate([prompt], SamplingParams(max_new_tokens=4))
    finally:
        hook.remove()
    # Chunk 1 naive (130 tokens), chunks 2-3 expand the cached prefix (260, 390 tokens), the last 10
    # queries attend in latent form, and so does decode: kv_b_proj sees no cached token there.
    assert calls == [130, 260, 390]
    assert chunked[0][0].tokens == full_forward_greedy(model, prompt, 4)


def test_seeded_sampling_repeats_whatever_else_is_in_the_batch(model):
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=30, top_p=0.9, seed=1234)
    engine = Engine(model, eos_token_ids=[])
    alone = engine.generate([PROMPTS[0]], params)[0][0].tokens
    crowd = engine.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]],
                            [SamplingParams(max_new_tokens=5, temperature=1.0), params,
                             SamplingParams(max_new_tokens=30, temperature=0.5, seed=9)])[1][0].tokens
    other_seed = engine.generate([PROMPTS[0]], SamplingParams(**{**vars(params), "seed": 99}))[0][0].tokens
    assert alone == crowd
    assert alone != other_seed


def test_top_k_one_is_greedy_and_top_p_truncates(model):
    engine = Engine(model, eos_token_ids=[])
    greedy = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=10))[0][0].tokens
    top1 = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=10, temperature=1.5, top_k=1, seed=0))
    tiny_p = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=10, temperature=1.5, top_p=1e-6, seed=0))
    assert top1[0][0].tokens == greedy == tiny_p[0][0].tokens


def test_n_samples_share_one_prefill(model):
    forwards = []
    hook = model.embed_tokens.register_forward_hook(lambda m, i, o: forwards.append(tuple(i[0].shape)))
    try:
        out = Engine(model, eos_token_ids=[]).generate(
            [PROMPTS[2]], SamplingParams(max_new_tokens=6, temperature=1.0, seed=5), n=4)
    finally:
        hook.remove()
    prefill = [shape for shape in forwards if shape[1] > 1]
    assert prefill == [(1, len(PROMPTS[2]))]  # one prefill of the one prompt, not four
    assert all(shape == (4, 1) for shape in forwards[1:])  # then the 4 samples decode together
    assert len({tuple(c.tokens) for c in out[0]}) > 1  # the samples differ


def test_decode_never_runs_kv_up_projection_on_cached_tokens(model):
    seen = []
    hooks = [layer.self_attn.kv_b_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[:2]))
             for layer in model.layers]
    try:
        stream = Engine(model, eos_token_ids=[]).stream(PROMPTS, SamplingParams(max_new_tokens=12))
        next(stream)
        after_prefill = len(seen)
        steps = 1 + sum(1 for _ in stream)
    finally:
        for h in hooks:
            h.remove()
    assert steps == 12
    assert after_prefill == len(model.layers)  # the prefill's naive form, once per layer
    assert len(seen) == after_prefill  # eleven decode steps: not one call


def test_cache_holds_only_latent_and_rope_key(model):
    cfg = model.config
    engine = Engine(model, eos_token_ids=[])
    batch = DecodeBatch(engine, max_rows=4, capacity=64)
    batch.add(engine.sequences(PROMPTS, SamplingParams(max_new_tokens=10)))
    for _ in range(5):
        batch.step()
    cache = batch.cache
    tensors = {k: v for k, v in vars(cache).items() if isinstance(v, torch.Tensor)}
    assert set(tensors) == {"kv", "lengths"}
    in_use = sum(len(s.prompt) + len(s.tokens) for s in batch.sequences)  # each step fed its token
    assert cache.lengths[:3].tolist() == [len(s.prompt) + len(s.tokens) for s in batch.sequences]
    assert cache.elements_in_use() == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * in_use
    assert cache.bytes_allocated() == 4 * 64 * cfg.cache_dim * cfg.num_hidden_layers * 4  # rows x capacity, fp32


def test_stream_and_generate_agree_with_stop_strings(model):
    engine = Engine(model, eos_token_ids=[], decode=letters)
    free = engine.generate(PROMPTS, SamplingParams(max_new_tokens=30))
    stop = free[2][0].text[7:9]  # a stop string that the third prompt's greedy output contains
    params = SamplingParams(max_new_tokens=30, stop=[stop])
    whole = engine.generate(PROMPTS, params)
    shown = {}
    for stepped in engine.stream(PROMPTS, params):
        for seq in stepped:
            text = seq.stream_text()
            assert text.startswith(shown.get(seq.prompt_index, ""))  # shown text is never taken back
            shown[seq.prompt_index] = text
    assert [shown[i] for i in range(3)] == [w[0].text for w in whole]
    cut = whole[2][0]
    assert cut.finish_reason == "stop" and cut.text == free[2][0].text[:free[2][0].text.index(stop)]


def test_eos_and_stop_tokens(model):
    free = Engine(model, eos_token_ids=[]).generate([PROMPTS[0]], SamplingParams(max_new_tokens=10))[0][0].tokens
    eos = free[3]
    stopped = Engine(model, eos_token_ids=[eos]).generate([PROMPTS[0]], SamplingParams(max_new_tokens=10))[0][0]
    assert stopped.tokens == free[:free.index(eos) + 1] and stopped.finish_reason == "stop"
    ignored = Engine(model, eos_token_ids=[eos]).generate([PROMPTS[0]], SamplingParams(max_new_tokens=10,
                                                                                      ignore_eos=True))[0][0]
    assert ignored.tokens == free and ignored.finish_reason == "length"
    by_id = Engine(model, eos_token_ids=[]).generate([PROMPTS[0]], SamplingParams(max_new_tokens=10,
                                                                                 stop_token_ids=[eos]))[0][0]
    assert by_id.tokens == stopped.tokens


def test_logprobs_are_untruncated_log_softmax_over_temperature(model):
    params = SamplingParams(max_new_tokens=6, temperature=0.7, top_k=5, seed=3, logprobs=True)
    out = Engine(model, eos_token_ids=[]).generate([PROMPTS[0]], params)[0][0]
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0] + out.tokens]))[0, len(PROMPTS[0]) - 1:-1]
    expected = (logits / 0.7).log_softmax(-1).gather(1, torch.tensor(out.tokens)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(out.logprobs), expected, atol=1e-4)


def test_joining_and_cancelling_do_not_disturb_the_others(model):
    engine = Engine(model, eos_token_ids=[])
    batch = DecodeBatch(engine, max_rows=3, capacity=80)
    first, victim = engine.sequences([PROMPTS[0], PROMPTS[2]], SamplingParams(max_new_tokens=20))
    batch.add([first, victim])
    for _ in range(4):
        batch.step()
    (late,) = engine.sequences([PROMPTS[1]], SamplingParams(max_new_tokens=10))[0]
    batch.add([[late]])
    batch.step()
    victim[0].cancelled = True
    batch.step()
    assert victim[0].finish_reason == "cancelled" and batch.sequences == [first[0], late]  # late moved up a row
    while batch.sequences:
        batch.step()
    assert first[0].tokens == full_forward_greedy(model, PROMPTS[0], 20)
    assert late.tokens == full_forward_greedy(model, PROMPTS[1], 10)


def test_context_full_ends_with_length(model):
    engine = Engine(model, eos_token_ids=[])
    batch = DecodeBatch(engine, max_rows=1, capacity=8)
    (seq,), = engine.sequences([PROMPTS[0]], SamplingParams(max_new_tokens=50))
    batch.add([[seq]])
    while batch.sequences:
        batch.step()
    assert seq.finish_reason == "length" and len(seq.tokens) == 8 - len(PROMPTS[0]) + 1


def test_expanded_prefill_form_equals_latent_form(model, monkeypatch):
    ids = torch.randint(0, 128, (2, 150))
    with torch.no_grad():
        cache = model.new_cache(2, 300)
        model(ids[:, :10], cache)
        expanded = model(ids, cache)  # 150 queries >= EXPAND_MIN_QUERIES over a cached prefix
        monkeypatch.setattr(attention, "EXPAND_MIN_QUERIES", 10**9)
        cache.lengths.fill_(10)
        latent = model(ids, cache)
    assert (expanded - latent).abs().max() < 1e-4


def test_admitted_prompt_prefills_a_chunk_per_step_while_others_decode(model):
    """Chunked prefill in a running batch (the server's path): a long prompt admitted mid-stream is
    read one chunk per step, the running sequence gets a token at every one of those steps, and both
    come out as if each had run alone."""
    engine = Engine(model, eos_token_ids=[], prefill_chunk=4)
    long_prompt = list(range(10, 50))  # 10 chunks
    batch = DecodeBatch(engine, 2, capacity=80)
    short = engine.sequences([[3, 4, 5]], SamplingParams(max_new_tokens=30))
    batch.add(short)
    batch.step()
    long = engine.sequences([long_prompt], SamplingParams(max_new_tokens=6))
    batch.admit(long)
    assert batch.free_rows == 0  # the admitted prompt's row is reserved
    short_tokens_when_long_starts = None
    while batch.sequences or batch.prefilling:
        stepped = batch.step()
        if short_tokens_when_long_starts is None and long[0][0] in stepped:
            short_tokens_when_long_starts = len(short[0][0].tokens)
    # One token before the admission, then one in each of the 10 steps that ran a chunk (the last of
    # them is also the long prompt's first token).
    assert short_tokens_when_long_starts == 1 + 10
    alone = engine.generate([[3, 4, 5], long_prompt], [SamplingParams(max_new_tokens=30), SamplingParams(max_new_tokens=6)])
    assert short[0][0].tokens == alone[0][0].tokens
    assert long[0][0].tokens == alone[1][0].tokens
