"""Rule rewards on crafted completions of arithmetic problems, against hand-computed values (docs/facts.md §9)."""

from __future__ import annotations

import math

import pytest
import torch

from nanoseek.data import get_task
from nanoseek.train.rewards import (
    REWARD_FUNCTIONS,
    Rollout,
    accuracy,
    length,
    overlong,
    repetition,
    score,
    tag_count,
)
from nanoseek.train.rewards import format as format_reward

ARITHMETIC = get_task("arithmetic")
PROBLEM = ARITHMETIC.generate(7, 3)
WRONG = str(int(PROBLEM.answer) + 1)


def formatted(answer: str, trace: str = "add the columns") -> str:
    return f"<think>\n{trace}\n</think>\n<answer>\n{answer}\n</answer>"


def rollout(text: str, num_tokens: int = 10, max_tokens: int = 100, truncated: bool = False) -> Rollout:
    return Rollout(ARITHMETIC, PROBLEM, text, num_tokens, truncated, max_tokens)


def test_accuracy_is_lenient_unless_strict():
    assert accuracy(rollout(formatted(PROBLEM.answer))) == 1.0
    assert accuracy(rollout(formatted(WRONG))) == 0.0
    bare = rollout(f"so the result is {PROBLEM.answer}")  # no tags: only the lenient last-number fallback finds it
    assert accuracy(bare) == 1.0
    assert accuracy(bare, strict=True) == 0.0


def test_format_needs_the_whole_string():
    assert format_reward(rollout(formatted(WRONG))) == 1.0  # format, not correctness
    assert format_reward(rollout(formatted(PROBLEM.answer) + "\nmore text")) == 0.0  # the MULTILINE `$` pitfall
    assert format_reward(rollout(f"<answer>\n{PROBLEM.answer}\n</answer>")) == 0.0  # no <think>


def test_tag_count():
    assert tag_count(rollout(formatted(PROBLEM.answer))) == 1.0  # 4 tags once each: 4 · 0.25
    assert tag_count(rollout("<think>\nhmm\n</think>\n")) == 0.5  # <think>\n and \n</think>\n
    assert tag_count(rollout("<think>\n" + formatted(PROBLEM.answer))) == 0.75  # <think>\n twice earns nothing


# r = end + ½·(start - end)·(1 + cos(π·p)), p = tokens / 100 clamped to [0, 1].
# Correct (start 1.0, end 0.5): p = 0 -> 1.0; p = ½ -> 0.5 + 0.25·(1 + 0) = 0.75; p = 1 -> 0.5.
# Wrong (start -1.0, end -0.5):  p = 0 -> -1.0; p = ½ -> -0.5 - 0.25 = -0.75; p = 1 -> -0.5.
# 200 tokens against a 100 budget: unclamped, cos(2π) = 1 would score like length 0; clamped it is p = 1.
@pytest.mark.parametrize(("num_tokens", "correct_reward", "wrong_reward"), [
    (0, 1.0, -1.0), (50, 0.75, -0.75), (100, 0.5, -0.5), (200, 0.5, -0.5),
])
def test_cosine_length_reward(num_tokens, correct_reward, wrong_reward):
    assert length(rollout(formatted(PROBLEM.answer), num_tokens)) == pytest.approx(correct_reward)
    assert length(rollout(formatted(WRONG), num_tokens)) == pytest.approx(wrong_reward)


def test_cosine_length_reward_params():
    # max_len 200 instead of the budget: 50 tokens is p = ¼, cos(π/4) = √2/2, 0.5 + 0.25·(1 + √2/2) = 0.926777.
    assert length(rollout(formatted(PROBLEM.answer), 50), max_len=200) == pytest.approx(0.75 + 0.25 * math.sqrt(0.5))
    # Lenient by default, so a tag-less correct answer counts as correct unless strict.
    bare = rollout(PROBLEM.answer, 0)
    assert length(bare) == 1.0 and length(bare, strict=True) == -1.0


def test_repetition_penalty():
    # 9 words, 7 trigrams (abc bca cab abc bca cab abc), 3 unique: (1 - 3/7)·(-1) = -4/7.
    assert repetition(rollout("a b c a b c a b c")) == pytest.approx(-4 / 7)
    # Lower-cased: a b c a b c has 4 trigrams, 3 unique: -(1 - 3/4) = -0.25; halved by max_penalty -0.5.
    assert repetition(rollout("A b C a B c")) == pytest.approx(-0.25)
    assert repetition(rollout("A b C a B c"), max_penalty=-0.5) == pytest.approx(-0.125)
    assert repetition(rollout("one two three four")) == 0.0  # all unique
    assert repetition(rollout("too short")) == 0.0 and repetition(rollout("")) == 0.0


# DAPO with budget 100 and the default cache 100 // 4 = 25: free up to 75 tokens, then (75 - n)/25.
@pytest.mark.parametrize(("num_tokens", "expected"), [(10, 0.0), (75, 0.0), (80, -0.2), (95, -0.8), (100, -1.0)])
def test_overlong_penalty(num_tokens, expected):
    assert overlong(rollout("x", num_tokens, truncated=num_tokens == 100)) == pytest.approx(expected)


def test_overlong_penalty_params():
    # max_length 100, cache 20, budget 200: free to 80, (80 - 90)/20 = -0.5 at 90, -1 past 100.
    assert overlong(rollout("x", 90, max_tokens=200), max_length=100, cache_length=20) == pytest.approx(-0.5)
    assert overlong(rollout("x", 150, max_tokens=200), max_length=100, cache_length=20) == -1.0
    with pytest.raises(ValueError, match="cache_length"):
        overlong(rollout("x"), cache_length=101)


def test_score_weights_and_raw_values():
    rollouts = [rollout(formatted(PROBLEM.answer)), rollout(formatted(WRONG)), rollout(f"It is {PROBLEM.answer}")]
    total, raw = score(rollouts, {"accuracy": 1.0, "format": 0.5, "tag_count": 0.25})
    # accuracy·1 + format·0.5 + tag_count·0.25: (1, 1, 1) -> 1.75, (0, 1, 1) -> 0.75, (1, 0, 0) -> 1.0.
    assert total.dtype == torch.float32 and total.tolist() == [1.75, 0.75, 1.0]
    assert list(raw) == ["accuracy", "format", "tag_count"]
    assert raw["accuracy"].tolist() == [1.0, 0.0, 1.0] and raw["tag_count"].tolist() == [1.0, 1.0, 0.0]
    # A zero weight still reports its raw values.
    total, raw = score(rollouts, {"accuracy": 2.0, "repetition": 0.0})
    assert total.tolist() == [2.0, 0.0, 2.0] and raw["repetition"].tolist() == [0.0, 0.0, 0.0]


def test_every_registered_reward_scores_a_rollout():
    total, raw = score([rollout(formatted(PROBLEM.answer), 0)], dict.fromkeys(REWARD_FUNCTIONS, 1.0))
    # accuracy 1 + format 1 + tag_count 1 + length 1 (correct, 0 tokens) + repetition 0 + overlong 0.
    assert set(raw) == {"accuracy", "format", "tag_count", "length", "repetition", "overlong"}
    assert total.tolist() == [4.0]


def test_unknown_reward_names_are_rejected():
    with pytest.raises(ValueError, match=r"'acuracy'.*accuracy, format"):
        score([rollout("x")], {"acuracy": 1.0})
    from nanoseek.train.config import TrainConfigError
    from nanoseek.train.grpo import GRPOConfig

    with pytest.raises(TrainConfigError, match="acuracy"):  # a GRPO config fails before any model loads
        GRPOConfig(rewards={"acuracy": 1.0})
