"""The compiled decode step at several rows: padded to a row bucket and read in whole cache blocks, it
gives the eager engine's greedy tokens while sequences join and leave a running batch, and after
`warm_up` no such run compiles again."""

import pytest
import torch

from conftest import random_model, tiny_config
from nanoseek.infer import DecodeBatch, Engine, SamplingParams
from nanoseek.infer.engine import VISIBLE_BLOCK, row_bucket
from nanoseek.infer.server import Scheduler, ServerLimits

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = 4
# Not a multiple of the block: the rows that grow past the first block read the whole cache.
CAPACITY = VISIBLE_BLOCK + 44


def test_row_buckets_are_powers_of_two_capped_at_the_batch():
    assert [row_bucket(n, 6) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert [row_bucket(n, 8) for n in (1, 3, 5, 8)] == [1, 4, 8, 8]


def run_schedule(engine: Engine) -> list[list[int]]:
    """A running batch of ROWS rows: sequences with different prompt lengths and max_new_tokens join
    (some prefilled at once, some a chunk per step) and leave at different steps; two of them decode
    past the first cache block. Returns each sequence's tokens, in the order they joined."""
    generator = torch.Generator().manual_seed(0)
    prompt = lambda length: torch.randint(0, 128, (length,), generator=generator).tolist()  # noqa: E731
    joins = {0: [(prompt(5), 9), (prompt(VISIBLE_BLOCK - 6), 20)], 3: [(prompt(17), 4)],
             5: [(prompt(2), 14)], 9: [(prompt(VISIBLE_BLOCK - 2), 12)], 20: [(prompt(40), 6), (prompt(1), 3)]}
    batch, sequences, step = DecodeBatch(engine, ROWS, CAPACITY), [], 0
    while step <= max(joins) or batch.sequences or batch.prefilling:
        for i, (ids, new_tokens) in enumerate(joins.get(step, [])):
            groups = engine.sequences([ids], SamplingParams(max_new_tokens=new_tokens))
            (batch.admit if i % 2 else batch.add)(groups)
            sequences += groups[0]
        batch.step()
        step += 1
    assert all(len(s.tokens) == s.params.max_new_tokens for s in sequences)
    return [s.tokens for s in sequences]


@pytest.mark.slow
def test_compiled_batched_decode_equals_eager_and_never_recompiles_after_warm_up():
    torch._dynamo.reset()
    model = random_model(tiny_config())
    compiled = Engine(model, eos_token_ids=[], compile=True)
    eager = Engine(model, eos_token_ids=[])
    compiled.warm_up(rows=ROWS)
    assert compiled.decode_compiles == 3  # one row, some of the rows, all of them (a contiguous view)
    with torch.compiler.set_stance("fail_on_recompile"):
        tokens = run_schedule(compiled)
    assert compiled.decode_recompiles == 0
    assert tokens == run_schedule(eager)


def test_server_metrics_count_the_recompiles_after_warm_up():
    engine = Engine(random_model(tiny_config()), eos_token_ids=[])
    scheduler = Scheduler(engine, ServerLimits(max_concurrent=2, max_context=64))
    try:
        assert "nanoseek_decode_recompiles_total 0" in scheduler.metrics().splitlines()
        engine.decode_recompiles += 1
        assert "nanoseek_decode_recompiles_total 1" in scheduler.metrics().splitlines()
    finally:
        scheduler.stop()


@pytest.mark.slow
def test_compiled_speculative_step_equals_eager_and_never_recompiles_after_warm_up():
    """The speculative step (verify k drafts, run the MTP module, draft the next k) compiled as one
    graph per kind (greedy, sampled): greedy output equals plain greedy decoding, and a seeded sampled
    sequence draws the eager speculative engine's tokens (the same uniforms through the same rule)."""
    torch._dynamo.reset()
    model = random_model(tiny_config(num_nextn_predict_layers=1))
    compiled = Engine(model, eos_token_ids=[], compile=True, speculative=True, draft_tokens=2)
    compiled.warm_up(rows=1)
    assert compiled.decode_compiles == 2
    prompts = [[3, 4, 5], [i % 128 for i in range(VISIBLE_BLOCK - 3)]]  # the second grows past the first block
    greedy = SamplingParams(max_new_tokens=12)
    sampled = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=1)
    with torch.compiler.set_stance("fail_on_recompile"):
        out = [compiled.generate([p], params)[0][0].tokens for params in (greedy, sampled) for p in prompts]
    assert compiled.decode_recompiles == 0
    eager, plain = Engine(model, eos_token_ids=[], speculative=True, draft_tokens=2), Engine(model, eos_token_ids=[])
    assert out[:2] == [plain.generate([p], greedy)[0][0].tokens for p in prompts]
    assert out[2:] == [eager.generate([p], sampled)[0][0].tokens for p in prompts]
