"""Prefix reuse: a prompt that begins with cached rows prefills only the rest and comes out as without
reuse (greedy tokens, logprobs, seeded samples), with chunked prefill, ragged batches, n samples per
prompt and the compiled decode step; the cache is LRU under its byte bound and forgets rows of
weights that changed."""

import pytest
import torch

from conftest import random_model, tiny_config
from nanoseek.infer import DecodeBatch, Engine, SamplingParams
from nanoseek.infer.prefix_cache import PrefixCache
from nanoseek.infer.server import Scheduler, ServerLimits

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = 16
# The reused rows come from other forward forms (a prefill chunk's naive form, a decode step) than a
# fresh prefill would use, so logits agree to rounding, not bit for bit, as with chunked prefill.
LOGPROB_ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config())


def tokens(length: int, seed: int) -> list[int]:
    return torch.randint(0, 128, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def prefill_widths(model, monkeypatch) -> list[tuple[int, int]]:
    """Record the [rows, tokens] of every forward the model runs (prefill chunks and decode steps)."""
    calls, hidden_states = [], model.hidden_states

    def recorded(input_ids, *args, **kwargs):
        calls.append(tuple(input_ids.shape))
        return hidden_states(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", recorded)
    return calls


def assert_same(with_reuse, without):
    for got_group, want_group in zip(with_reuse, without, strict=True):
        for got, want in zip(got_group, want_group, strict=True):
            assert got.tokens == want.tokens
            if want.logprobs is not None:
                assert torch.allclose(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=LOGPROB_ATOL, rtol=0)


@pytest.mark.parametrize("chunk", [512, 8])
def test_shared_prefixes_reused_in_a_ragged_batch_give_the_same_outputs(model, chunk):
    system = tokens(40, 0)
    first_round = [system + tokens(9, 1), tokens(23, 2)]
    # A new prompt after the same system prompt, the stranger again, and the first prompt again:
    # their rows start at different cached lengths (32, 16 and 48 tokens).
    second_round = [system + tokens(30, 3), first_round[1], first_round[0]]
    params = [SamplingParams(max_new_tokens=12, logprobs=True),  # greedy
              SamplingParams(max_new_tokens=12, temperature=0.9, seed=5, logprobs=True),
              SamplingParams(max_new_tokens=12, temperature=1.0, top_k=40, seed=6, logprobs=True)]
    plain = Engine(model, eos_token_ids=[], prefill_chunk=chunk)
    reusing = Engine(model, eos_token_ids=[], prefill_chunk=chunk, prefix_cache_bytes=1 << 20)
    assert_same(reusing.generate(first_round, params[:2]), plain.generate(first_round, params[:2]))
    assert reusing.prefix_cache.hits == 0
    assert_same(reusing.generate(second_round, params), plain.generate(second_round, params))
    stats = reusing.prefix_cache.stats()
    assert (stats["lookups"], stats["hits"], stats["hit_tokens"]) == (5, 3, 32 + 16 + 48)


def test_second_turn_prefills_only_its_new_tokens(model, monkeypatch):
    engine = Engine(model, eos_token_ids=[], prefix_cache_bytes=1 << 20)
    first = tokens(45, 0)
    reply = engine.generate([first], SamplingParams(max_new_tokens=20))[0][0].tokens
    # The finished row held the first prompt and all of the reply but its last token: 64 rows, four
    # whole blocks. The second turn resends them, the last reply token and 7 new tokens.
    second = first + reply + tokens(7, 1)
    calls = prefill_widths(model, monkeypatch)
    params = SamplingParams(max_new_tokens=10, logprobs=True)
    got = engine.generate([second], params)
    assert calls[0] == (1, 1 + 7)
    assert engine.prefix_cache.hit_tokens == 64
    monkeypatch.undo()
    assert_same(got, Engine(model, eos_token_ids=[]).generate([second], params))


def test_a_fully_cached_prompt_prefills_its_last_token(model, monkeypatch):
    engine = Engine(model, eos_token_ids=[], prefix_cache_bytes=1 << 20)
    prompt = tokens(2 * BLOCK, 0)  # ends on a block boundary: its last block is cached whole
    params = SamplingParams(max_new_tokens=8, temperature=0.8, seed=3, logprobs=True)
    first = engine.generate([prompt], params)
    calls = prefill_widths(model, monkeypatch)
    again = engine.generate([prompt], params)
    shorter = engine.generate([prompt[:BLOCK + 5]], params)
    # Each prefill, then 7 decode forwards (the 8th token is never fed). The shorter prompt's second
    # block is incomplete, and only whole blocks are matched: its 5 tokens past the first block run.
    assert [calls[0], calls[8]] == [(1, 1), (1, 5)]
    monkeypatch.undo()
    assert_same(again, first)
    assert_same(shorter, Engine(model, eos_token_ids=[]).generate([prompt[:BLOCK + 5]], params))


def test_n_samples_of_a_cached_prompt_decode_as_without_reuse(model):
    """GRPO-style: several prompts sharing an instruction, each sampled n times, twice (the second
    round reuses every prompt's rows, and each prefilled row is copied into n decode rows)."""
    instruction = tokens(33, 0)
    prompts = [instruction + tokens(5 + i, 10 + i) for i in range(3)]
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=7, logprobs=True)
    reusing = Engine(model, eos_token_ids=[], prefix_cache_bytes=1 << 20)
    want = Engine(model, eos_token_ids=[]).generate(prompts, params, n=4)
    for _ in range(2):
        assert_same(reusing.generate(prompts, params, n=4), want)
    assert (reusing.prefix_cache.hits, reusing.prefix_cache.hit_tokens) == (3, 3 * 32)


def test_admitted_prompts_reuse_rows_while_others_decode(model):
    """The server's path: prompts admitted into a running batch, prefilled a chunk per step."""
    engine = Engine(model, eos_token_ids=[], prefill_chunk=4, prefix_cache_bytes=1 << 20)
    shared = tokens(2 * BLOCK, 0)
    batch = DecodeBatch(engine, 3, capacity=96)
    early = engine.sequences([shared + [1, 2, 3]], SamplingParams(max_new_tokens=30))
    batch.add(early)  # stores the shared blocks
    batch.step()
    late = engine.sequences([shared + tokens(6, 1), tokens(10, 2)], SamplingParams(max_new_tokens=8))
    batch.admit(late)
    while batch.sequences or batch.prefilling:
        batch.step()
    assert engine.prefix_cache.hit_tokens == 2 * BLOCK
    plain = Engine(model, eos_token_ids=[]).generate([shared + [1, 2, 3], shared + tokens(6, 1), tokens(10, 2)],
                                                     [SamplingParams(max_new_tokens=30)] + [SamplingParams(max_new_tokens=8)] * 2)
    assert [s.tokens for s in early[0] + late[0] + late[1]] == [c[0].tokens for c in plain]


def test_changed_weights_empty_the_cache():
    model = random_model(tiny_config())
    engine = Engine(model, eos_token_ids=[], prefix_cache_bytes=1 << 20)
    prompt, params = tokens(40, 0), SamplingParams(max_new_tokens=6, logprobs=True)
    engine.generate([prompt], params)
    with torch.no_grad():
        model.layers[0].self_attn.kv_a_proj_with_mqa.weight.mul_(1.5)  # in place, as an optimizer step
    got = engine.generate([prompt], params)
    assert engine.prefix_cache.hits == 0
    assert_same(got, Engine(model, eos_token_ids=[]).generate([prompt], params))


def block_cache(max_blocks: int, block_size: int = 4) -> tuple[PrefixCache, int]:
    cache = PrefixCache(max_blocks * block_size * 2 * 8 * 4, block_size)  # 2 layers x 8 dims x fp32
    return cache, block_size * 2 * 8 * 4


def rows_of(ids: list[int]):
    """A cache row whose entries are the token ids, so a returned block shows whose rows it holds."""
    from nanoseek.model.cache import LatentCache

    cache = LatentCache(tiny_config(num_hidden_layers=2, kv_lora_rank=4, qk_rope_head_dim=4), 1, len(ids))
    cache.kv[:, 0] = torch.tensor(ids, dtype=torch.float32)[:, None]
    return cache


def test_lru_eviction_under_the_byte_bound():
    cache, block_bytes = block_cache(3)
    a, b, c, e = list(range(0, 8)), list(range(10, 14)), list(range(20, 24)), list(range(30, 34))
    for ids in (a, b):
        cache.store(ids, rows_of(ids), 0)
    assert (cache.stored_bytes, cache.evictions) == (3 * block_bytes, 0)
    assert len(cache.match(a + [99])) == 2  # a is now more recent than b
    cache.store(c, rows_of(c), 0)
    assert cache.evictions == 1 and cache.match(b + [99]) == []  # b, least recently used, went
    assert len(cache.match(c + [99])) == 1
    # Now a's two blocks are the oldest; a prefix is evicted from its end, keeping its first block.
    cache.store(e, rows_of(e), 0)
    kept = cache.match(a + [99])
    assert len(kept) == 1 and kept[0][0, :, 0].tolist() == a[:4]
    assert cache.stored_bytes == 3 * block_bytes and cache.evictions == 2


def test_a_prefix_longer_than_the_bound_keeps_its_beginning():
    cache, block_bytes = block_cache(3)
    ids = list(range(40))  # 10 blocks
    cache.store(ids, rows_of(ids), 0)
    found = cache.match(ids)
    assert [block[0, :, 0].tolist() for block in found] == [ids[0:4], ids[4:8], ids[8:12]]
    assert cache.stored_bytes == 3 * block_bytes and cache.evictions == 0


def test_a_different_token_in_a_block_misses_from_there_on():
    cache, _ = block_cache(8)
    ids = list(range(16))
    cache.store(ids, rows_of(ids), 0)
    assert len(cache.match(ids[:6] + [99] + ids[7:])) == 1  # block 1 differs: blocks 1-3 miss
    assert cache.match([99] + ids[1:]) == []  # a later block's tokens alone never match


def test_server_metrics_report_the_prefix_cache(model):
    engine = Engine(model, eos_token_ids=[], prefix_cache_bytes=1 << 20)
    scheduler = Scheduler(engine, ServerLimits(max_concurrent=2, max_context=128))
    try:
        engine.generate([tokens(40, 0)] * 2, SamplingParams(max_new_tokens=2))
        engine.generate([tokens(40, 0)], SamplingParams(max_new_tokens=2))
        metrics = scheduler.metrics().splitlines()
        stats = engine.prefix_cache.stats()
        assert stats["hits"] == 1 and stats["hit_tokens"] == 32
        for name, value in [("hits_total", 1), ("hit_tokens_total", 32), ("evictions_total", 0),
                            ("stored_bytes", stats["stored_bytes"])]:
            assert f"nanoseek_prefix_cache_{name} {value}" in metrics
        assert stats["stored_bytes"] > 0
    finally:
        scheduler.stop()


@pytest.mark.slow
def test_reuse_with_the_compiled_decode_step(model):
    torch._dynamo.reset()
    compiled = Engine(model, eos_token_ids=[], compile=True, prefix_cache_bytes=1 << 20)
    eager = Engine(model, eos_token_ids=[])
    first = tokens(45, 0)
    params = SamplingParams(max_new_tokens=20, logprobs=True)
    reply = compiled.generate([first], params)
    assert_same(reply, eager.generate([first], params))
    second = first + reply[0][0].tokens + tokens(7, 1)
    assert_same(compiled.generate([second], params), eager.generate([second], params))
    assert compiled.prefix_cache.hit_tokens == 64
