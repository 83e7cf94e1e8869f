"""MTP self-speculative decoding: greedy output equal to plain greedy decoding (with the acceptance
statistics counted independently), and sampled output with plain sampling's distribution, checked
on the verification rule alone and end to end against the exact distribution of a tiny model."""

import math

import pytest
import torch

from conftest import random_model, tiny_config
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer import speculative

PROMPTS = [[3, 4, 5, 6, 7], [9, 8], list(range(10, 41))]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mtp_model():
    return random_model(tiny_config(num_nextn_predict_layers=1), seed=1)


def speculation_stats(new_tokens: int, accepts: list) -> dict:
    """The statistics speculative decoding must report with one draft per step, counted
    independently: `accepts[row](step, emitted)` says whether the row's draft at that verification
    step is right, given how many tokens it has emitted. A step emits the main model's token, plus the
    draft's successor when the draft was right and max_new_tokens leaves room."""
    drafted = accepted = forwards = 0
    for accept in accepts:
        emitted, step = 1, 0  # the first token comes from the prefill
        while emitted < new_tokens:
            step += 1
            ok = accept(step, emitted)
            drafted, accepted = drafted + 1, accepted + ok
            emitted += 1 + (ok and emitted + 1 < new_tokens)
        forwards = max(forwards, step)
    return {"drafted": drafted, "accepted": accepted, "acceptance_rate": accepted / drafted, "forwards": forwards,
            "tokens_per_step": len(accepts) * (new_tokens - 1) / drafted}


def test_mtp_speculative_greedy_equals_plain_greedy(mtp_model):
    params = SamplingParams(max_new_tokens=24)
    plain = [c[0].tokens for c in Engine(mtp_model, eos_token_ids=[]).generate(PROMPTS, params)]
    engine = Engine(mtp_model, eos_token_ids=[], speculative=True, prefill_chunk=8)
    spec = engine.generate(PROMPTS, params)
    assert [c[0].tokens for c in spec] == plain
    # The drafts by a full forward of each finished sequence: MTP at position i (hidden state i with
    # token i+1) predicts token i+2. With `emitted` tokens out, the draft is for generated token
    # `emitted`, predicted at position len(prompt) + emitted - 2.
    accepts = []
    for prompt, tokens in zip(PROMPTS, plain):
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad():
            hidden = mtp_model.hidden_states(ids)
            mtp = mtp_model.mtp_hidden(0, hidden[:, :-1], ids[:, 1:])
            drafts = mtp_model.lm_head(mtp_model.mtp[0].norm(mtp))[0].argmax(-1).tolist()
        accepts.append(lambda step, emitted, p=prompt, t=tokens, d=drafts: d[len(p) + emitted - 2] == t[emitted])
    expected = speculation_stats(24, accepts)
    assert engine.last_speculative_stats == expected and expected["drafted"] > 0


def oracle_drafter(monkeypatch, model, sequences: list[list[int]], vocab: int):
    """Random MTP weights rarely draft right. This drafter knows each row's whole sequence and drafts
    the token MTP at position P predicts (token P+2) right, except when (P + row) % 3 == 0: accepted
    and rejected drafts side by side in one batch, at every draft of a chain."""
    def mtp_hidden(depth, hidden, next_ids, cache=None, positions=None, absorb=False, visible=None):
        target = [[seq[p + 2] if p + 2 < len(seq) else 0 for p in row] for seq, row in zip(sequences, positions.tolist())]
        target = torch.tensor(target)
        wrong = (positions + torch.arange(len(sequences))[:, None]) % 3 == 0
        return torch.nn.functional.one_hot(torch.where(wrong, (target + 1) % vocab, target), vocab).float()

    monkeypatch.setattr(model, "mtp_hidden", mtp_hidden)
    monkeypatch.setattr(speculative, "draft_logits", lambda model, hidden: hidden)


def test_mtp_verification_with_a_mostly_right_drafter(mtp_model, monkeypatch):
    params = SamplingParams(max_new_tokens=24)
    expected = [c[0].tokens for c in Engine(mtp_model, eos_token_ids=[]).generate(PROMPTS, params)]
    oracle_drafter(monkeypatch, mtp_model, [p + t for p, t in zip(PROMPTS, expected)], 128)
    engine = Engine(mtp_model, eos_token_ids=[], speculative=True)
    assert [c[0].tokens for c in engine.generate(PROMPTS, params)] == expected
    # Generated token e of row r sits at position len(prompt) + e, drafted by MTP two positions before.
    accepts = [lambda step, emitted, r=r, n=len(p): (n + emitted - 2 + r) % 3 != 0 for r, p in enumerate(PROMPTS)]
    assert engine.last_speculative_stats == speculation_stats(24, accepts)


@pytest.mark.parametrize("draft_tokens", [2, 3])
def test_chained_drafts_keep_greedy_output(mtp_model, monkeypatch, draft_tokens):
    """k drafts per step, the later ones from the MTP module's own hidden state: the output is still
    plain greedy decoding, and a step emits more than two tokens when a whole chain is right."""
    params = SamplingParams(max_new_tokens=24)
    expected = [c[0].tokens for c in Engine(mtp_model, eos_token_ids=[]).generate(PROMPTS, params)]
    oracle_drafter(monkeypatch, mtp_model, [p + t for p, t in zip(PROMPTS, expected)], 128)
    engine = Engine(mtp_model, eos_token_ids=[], speculative=True, draft_tokens=draft_tokens)
    assert [c[0].tokens for c in engine.generate(PROMPTS, params)] == expected
    stats = engine.last_speculative_stats
    assert stats["drafted"] % draft_tokens == 0 and 0 < stats["accepted"] < stats["drafted"]
    # Two in three drafts are right, so chains of k right drafts occur and steps average over 2 tokens.
    assert stats["tokens_per_step"] > 2


# ---- sampling keeps the target distribution ---------------------------------------------------------

def chi_square_critical(df: int, z: float = 3.719) -> float:
    """The chi-square quantile at p = 1e-4 (z: the normal quantile) by Wilson and Hilferty's
    approximation, (1 - 2/(9df) + z sqrt(2/(9df)))^3 df, within 1% for df >= 3."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of observed counts against exact probabilities, cells expected fewer than
    5 times pooled into one; returns it with its degrees of freedom. Outcomes of probability zero
    (truncated by top-k/top-p) must never occur."""
    expected = probs.double().flatten() * counts.sum()
    counts = counts.double().flatten()
    assert counts[expected == 0].sum() == 0, "an outcome of probability zero occurred"
    expected, counts = expected[expected > 0], counts[expected > 0]
    small = expected < 5
    if small.any():
        expected = torch.cat((expected[~small], expected[small].sum()[None]))
        counts = torch.cat((counts[~small], counts[small].sum()[None]))
    return float(((counts - expected) ** 2 / expected).sum()), len(counts) - 1


def naive_argmax_rule(p, q, drafts, accept_u, sample_u):
    """A wrong rule: keep a draft when it is the target's argmax, else sample from p."""
    kept = (drafts == p[:, :-1].argmax(-1)).long().cumprod(-1).sum(-1)
    rows = torch.arange(len(drafts))
    return kept, speculative.inverse_cdf(p[rows, kept], sample_u)


def resample_from_p_rule(p, q, drafts, accept_u, sample_u):
    """A wrong rule: the right acceptance test, but a rejected draft is replaced from p, not max(0, p - q)."""
    kept, _ = speculative.accept_drafts(p, q, drafts, accept_u, sample_u)
    rows = torch.arange(len(drafts))
    return kept, speculative.inverse_cdf(p[rows, kept], sample_u)


def emitted_pairs(rule, p, q, count, generator):
    """Run `rule` on `count` rows of two drafts from q; returns counts [V, V] of the first two emitted
    tokens (every row emits at least two when the first draft is kept, and the test below makes the
    bonus position's p the same as the second's, so a row that keeps both drafts or only the first
    emits its second token from p[1] either way)."""
    vocab = p.shape[-1]
    drafts = torch.stack([torch.multinomial(q[j], count, replacement=True, generator=generator) for j in range(2)], 1)
    u = torch.rand(count, 5, generator=generator)
    kept, final = rule(p.expand(count, -1, -1), q.expand(count, -1, -1), drafts, u[:, :2], u[:, 2])
    first = torch.where(kept > 0, drafts[:, 0], final)
    # A row that rejected the first draft emits one token this step; its second token would come from
    # a new step at the same p[1], which the same rule draws as a fresh single-draft row (fresh uniforms).
    rerun_kept, rerun_final = rule(p[1:].expand(count, -1, -1), q[1:2].expand(count, -1, -1), drafts[:, 1:],
                                   u[:, 3:4], u[:, 4])
    second = torch.where(kept > 1, drafts[:, 1], torch.where(kept == 1, final,
                                                             torch.where(rerun_kept > 0, drafts[:, 1], rerun_final)))
    return torch.bincount(first * vocab + second, minlength=vocab * vocab).view(vocab, vocab)


@pytest.mark.parametrize("rule, right", [(speculative.accept_drafts, True), (naive_argmax_rule, False),
                                         (resample_from_p_rule, False)])
def test_acceptance_rule_keeps_the_target_distribution(rule, right):
    """The first two tokens emitted by the rule, over 200,000 seeded rows of arbitrary p and q on six
    tokens, against the exact product p[0] x p[1]: the speculative sampling rule passes a chi-square
    test at p = 1e-4, and two plausible wrong rules fail it."""
    generator = torch.Generator().manual_seed(0)
    vocab = 6
    p = torch.rand(2, vocab, generator=generator)
    p[:, 4] = 0  # truncated away from the target (top-k/top-p) while the drafter may still propose it
    p = torch.cat((p, p[1:]))  # the bonus position shares the second's p (see emitted_pairs)
    p = p / p.sum(-1, keepdim=True)
    q = torch.rand(2, vocab, generator=generator)
    q = q / q.sum(-1, keepdim=True)
    counts = emitted_pairs(rule, p, q, 200_000, generator)
    statistic, df = chi_square(counts, p[0][:, None] * p[1][None, :])
    assert (statistic < chi_square_critical(df)) == right, (statistic, chi_square_critical(df))


def truncated(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution plain sampling draws from, spelled out: softmax at the temperature, the top_k
    most likely tokens, then the fewest of those whose mass reaches top_p, renormalised."""
    probs = (logits.double() / temperature).softmax(-1)
    order = probs.argsort(descending=True).tolist()
    kept, mass = [], 0.0
    for rank, token in enumerate(order):
        if (top_k and rank >= top_k) or mass >= top_p * probs.sum():
            break
        kept.append(token)
        mass += float(probs[token] / probs[order[:top_k or len(order)]].sum())
    out = torch.zeros_like(probs)
    out[kept] = probs[kept]
    return out / out.sum()


@pytest.mark.parametrize("draft_tokens", [1, 2])
@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=6, top_p=0.9)])
def test_sampled_speculation_has_the_plain_distribution(draft_tokens, settings):
    """End to end on a random 8-token model: the first three tokens of 6,000 speculative samples
    against their exact joint distribution, computed from full forwards of every continuation with
    temperature, top-k and top-p applied (the first comes from the prefill, the second and third from
    verification: kept drafts, replacements and bonus tokens)."""
    model = random_model(tiny_config(vocab_size=8, num_nextn_predict_layers=1), std=0.3, seed=3)
    prompt, vocab = [1, 2, 3], 8
    with torch.no_grad():
        pairs = torch.tensor([prompt + [a, b] for a in range(vocab) for b in range(vocab)])
        logits = model(pairs)[:, len(prompt) - 1:]  # [64, 3, V]: after the prompt, after a, after (a, b)
    dist = lambda x: truncated(x, **{"top_k": 0, "top_p": 1.0, **settings})  # noqa: E731
    p1 = dist(logits[0, 0])
    p2 = torch.stack([dist(logits[a * vocab, 1]) for a in range(vocab)])
    p3 = torch.stack([dist(logits[i, 2]) for i in range(vocab * vocab)]).view(vocab, vocab, vocab)
    exact = p1[:, None, None] * p2[:, :, None] * p3
    engine = Engine(model, eos_token_ids=[], speculative=True, draft_tokens=draft_tokens)
    samples = engine.generate([prompt], SamplingParams(max_new_tokens=3, seed=0, **settings), n=6000)[0]
    tokens = torch.tensor([c.tokens for c in samples])
    counts = torch.bincount(tokens[:, 0] * vocab * vocab + tokens[:, 1] * vocab + tokens[:, 2], minlength=vocab ** 3)
    statistic, df = chi_square(counts, exact)
    assert statistic < chi_square_critical(df), (statistic, df)
    stats = engine.last_speculative_stats
    # The drafter is a random MTP module, unlike p: some drafts are kept, others replaced.
    assert 0 < stats["accepted"] < stats["drafted"]


def test_sampled_speculation_repeats_with_its_seed_and_reports_logprobs(mtp_model):
    params = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.95, seed=5, logprobs=True)
    engine = Engine(mtp_model, eos_token_ids=[], speculative=True, draft_tokens=2)
    first, again = (engine.generate(PROMPTS, params) for _ in range(2))
    assert [c[0].tokens for c in first] == [c[0].tokens for c in again]
    # Each token's logprob is log_softmax(logits / T) of a full forward over the sequence so far.
    for prompt, (c,) in zip(PROMPTS, first):
        ids = torch.tensor([prompt + c.tokens])
        with torch.no_grad():
            full = (mtp_model(ids)[0, len(prompt) - 1:-1] / 0.8).log_softmax(-1)
        want = full.gather(1, torch.tensor(c.tokens)[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(c.logprobs), want, atol=1e-4)
