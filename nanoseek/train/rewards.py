"""Rule-based rewards for one rollout (DeepSeek-R1 §2.2.2; DAPO arXiv 2503.14476; docs/facts.md §9).

R1-Zero trains on rule rewards only, accuracy plus format, and no learned reward model, to avoid reward
hacking. The task-level rules (verifier, strict format, tag count) live in `nanoseek.data.task`; this
module adapts them to a `Rollout`, adds the length-shaping rewards, and sums them with weights:
r_i = Σ_k w_k·r_k,i is what `grpo.group_advantages` normalises per group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from nanoseek.data.task import Problem, Task, accuracy_reward, format_reward, tag_count_reward
from nanoseek.infer.engine import Completion


@dataclass(frozen=True)
class Rollout:
    """One sampled completion of a problem, as the reward functions see it."""

    task: Task
    problem: Problem
    text: str  # the decoded completion, without the EOS
    num_tokens: int  # completion tokens, the EOS included when the model stopped
    truncated: bool  # hit the token budget without an EOS
    max_tokens: int  # the completion budget

    @classmethod
    def of(cls, task: Task, problem: Problem, completion: Completion, max_tokens: int) -> Rollout:
        """The rollout of an engine completion."""
        return cls(task=task, problem=problem, text=completion.text or "", num_tokens=len(completion.tokens),
                   truncated=completion.finish_reason == "length", max_tokens=max_tokens)


def accuracy(rollout: Rollout, strict: bool = False) -> float:
    """1 if the task's verifier accepts the answer (lenient extraction unless strict), else 0."""
    return accuracy_reward(rollout.task, rollout.problem, rollout.text, strict)


def format(rollout: Rollout) -> float:  # named as its registry key; shadows the builtin in this module only
    """1 if the WHOLE completion is `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`, else 0."""
    return format_reward(rollout.text)


def tag_count(rollout: Rollout) -> float:
    """0.25 for each format tag that occurs exactly once (open-r1's dense format shaping)."""
    return tag_count_reward(rollout.text)


def length(
    rollout: Rollout,
    min_correct: float = 0.5,
    max_correct: float = 1.0,
    min_wrong: float = -1.0,
    max_wrong: float = -0.5,
    max_len: int | None = None,
    strict: bool = False,
) -> float:
    """Cosine length shaping (open-r1's function defaults, docs/facts.md §9), on tokens.

    r = end + ½·(start - end)·(1 + cos(π·p)), p = num_tokens / max_len clamped to [0, 1], moves from
    `start` at length 0 to `end` at max_len. Correct answers go max_correct -> min_correct (short correct
    is best); wrong ones min_wrong -> max_wrong (a long wrong answer is penalised less, so a model that
    cannot solve a problem is pushed to think longer rather than give up). The clamp keeps the reward
    from being periodic past max_len.
    """
    budget = rollout.max_tokens if max_len is None else max_len
    if budget <= 0:
        raise ValueError(f"max_len must be positive, got {budget}")
    progress = min(max(rollout.num_tokens / budget, 0.0), 1.0)
    if accuracy(rollout, strict):
        start, end = max_correct, min_correct
    else:
        start, end = min_wrong, max_wrong
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def repetition(rollout: Rollout, ngram_size: int = 3, max_penalty: float = -1.0) -> float:
    """(1 - unique n-grams / n-grams) · max_penalty over lower-cased whitespace words (open-r1);
    0 for a completion shorter than one n-gram."""
    if max_penalty > 0:
        raise ValueError(f"max_penalty must be <= 0, got {max_penalty}")
    words = rollout.text.lower().split()
    ngrams = list(zip(*(words[i:] for i in range(ngram_size))))
    if not ngrams:
        return 0.0
    return (1.0 - len(set(ngrams)) / len(ngrams)) * max_penalty


def overlong(rollout: Rollout, max_length: int | None = None, cache_length: int | None = None) -> float:
    """DAPO's soft overlong punishment (docs/facts.md §9), on tokens: 0 up to max_length - cache_length, then a
    linear ramp down to -1 at max_length, and -1 beyond. A truncated rollout, at the budget, scores -1."""
    limit = rollout.max_tokens if max_length is None else max_length
    cache = limit // 4 if cache_length is None else cache_length
    if not 0 <= cache <= limit:
        raise ValueError(f"need 0 <= cache_length <= max_length, got {cache} and {limit}")
    safe = limit - cache
    if rollout.num_tokens <= safe:
        return 0.0
    if rollout.num_tokens <= limit:
        return (safe - rollout.num_tokens) / cache
    return -1.0


REWARD_FUNCTIONS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "format": format,
    "tag_count": tag_count,
    "length": length,
    "repetition": repetition,
    "overlong": overlong,
}


def _check_names(weights: dict[str, float]) -> None:
    unknown = sorted(set(weights) - set(REWARD_FUNCTIONS))
    if unknown:
        raise ValueError(f"unknown reward {unknown[0]!r}; valid rewards: {', '.join(REWARD_FUNCTIONS)}")


def score(rollouts: Sequence[Rollout], weights: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted total reward [N] (float32) and every named function's raw values [N].

    A function with weight 0 is still computed, so a reward can be logged without being trained on.
    """
    _check_names(weights)
    raw = {
        name: torch.tensor([REWARD_FUNCTIONS[name](rollout) for rollout in rollouts], dtype=torch.float32)
        for name in weights
    }
    total = torch.zeros(len(rollouts), dtype=torch.float32)
    for name, weight in weights.items():
        total += weight * raw[name]
    return total, raw
