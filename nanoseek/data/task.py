"""The interface of a verifiable task, answer extraction, rule rewards and the train/eval split.

A task generates problems from a seed, explains their solution step by step (the text inside
<think>) and checks a model's answer. The reasoning format is the R1 one (docs/facts.md §9):
``<think>\\n{trace}\\n</think>\\n<answer>\\n{answer}\\n</answer>``.
"""

from __future__ import annotations

import hashlib
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from nanoseek.tokenizer import ANSWER_END, ANSWER_START, THINK_END, THINK_START

if TYPE_CHECKING:
    from nanoseek.tokenizer import Tokenizer

# Share of problems (by hash of the canonical text) held out for evaluation.
EVAL_PERCENT = 5

# The four tags tag_count_reward looks for (open-r1), with the newlines around them.
FORMAT_TAGS = (f"{THINK_START}\n", f"\n{THINK_END}\n", f"\n{ANSWER_START}\n", f"\n{ANSWER_END}")
# The strict format as a regex, for reading; `strict_answer` matches it in linear time.
STRICT_FORMAT = re.compile(r"<think>\n.*?\n</think>\n<answer>\n(.*?)\n</answer>", re.DOTALL)

# The R1-Zero prompt (DeepSeek-R1 Table 1): RL straight from a base model, no chat format.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:"
)
# chat: the chat format (after SFT); zero: the R1-Zero text prompt; plain: the problem as the base
# corpus writes it (what a base model knows, scored leniently: it never writes the tags).
Template = Literal["chat", "zero", "plain"]
TEMPLATES = ("chat", "zero", "plain")

# A number, possibly with thousands grouped by commas or spaces: the default lenient fallback.
LAST_NUMBER = re.compile(r"[-+]?[0-9]+(?:[, ][0-9]{3}(?![0-9]))*(?:\.[0-9]+)?")


@dataclass(frozen=True)
class Problem:
    task: str
    prompt: str
    answer: str
    # Generation details (seed, difficulty, operands); not part of the problem's identity.
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # A single fact that traces of larger problems use as one step (7 + 5, 8 * 6): always in the
    # train split, so that a held-out problem tests composition, never a fact no trace has shown.
    fact: bool = field(default=False, compare=False)


class Task(ABC):
    """A family of generated problems with a rule-based verifier. Subclass it for your own task."""

    name: str
    # Valid `difficulty` values for `generate`.
    difficulties: range
    # What lenient extraction falls back to when a completion has no <answer> tags.
    answer_pattern: re.Pattern[str] = LAST_NUMBER

    @abstractmethod
    def generate(self, seed: int, difficulty: int) -> Problem:
        """The problem for this seed and difficulty; the same arguments always give the same problem."""

    @abstractmethod
    def reasoning_trace(self, problem: Problem) -> str:
        """Step-by-step working that ends at `problem.answer`, to sit inside <think>."""

    @abstractmethod
    def check_answer(self, problem: Problem, answer: str) -> bool:
        """Whether an extracted answer is correct. It must not eval, and must stay fast on huge input."""

    def verify(self, problem: Problem, completion: str, strict: bool = False) -> bool:
        answer = extract_answer(completion, strict, self.answer_pattern)
        return answer is not None and self.check_answer(problem, answer)

    def render_solution(self, problem: Problem) -> str:
        """The assistant target: the reasoning trace and the answer in the strict format."""
        trace = self.reasoning_trace(problem)
        return f"{THINK_START}\n{trace}\n{THINK_END}\n{ANSWER_START}\n{problem.answer}\n{ANSWER_END}"

    def conversation(self, problem: Problem) -> list[dict[str, str]]:
        """The SFT conversation; `Tokenizer.render_prompt` of it gives the RL/eval prompt."""
        return [
            {"role": "user", "content": problem.prompt},
            {"role": "assistant", "content": self.render_solution(problem)},
        ]

    def _rng(self, seed: int, difficulty: int) -> random.Random:
        if difficulty not in self.difficulties:
            raise ValueError(f"{self.name}: difficulty {difficulty} not in {self.difficulties}")
        # String seeds go through sha512, so problems are the same in every process and version.
        return random.Random(f"{self.name}:{seed}:{difficulty}")


def strict_answer(completion: str) -> str | None:
    """The answer if the WHOLE completion matches STRICT_FORMAT, else None.

    Equivalent to ``STRICT_FORMAT.fullmatch(completion).group(1)``, but linear: the regex
    backtracks quadratically on a completion that repeats the closing tags. The lazy think
    part ends at the first separator; the answer runs to the closing tag at the very end.
    """
    opening, separator, closing = f"{THINK_START}\n", f"\n{THINK_END}\n{ANSWER_START}\n", f"\n{ANSWER_END}"
    if not (completion.startswith(opening) and completion.endswith(closing)):
        return None
    start = completion.find(separator, len(opening))
    end = len(completion) - len(closing)
    if start < 0 or start + len(separator) > end:
        return None
    return completion[start + len(separator) : end]


def extract_answer(completion: str, strict: bool, pattern: re.Pattern[str] = LAST_NUMBER) -> str | None:
    """Strict: the answer of a whole-string format match. Lenient: the last <answer>...</answer>,
    else the last match of `pattern` anywhere (by default the last number)."""
    if strict:
        return strict_answer(completion)
    end = completion.rfind(ANSWER_END)
    start = completion.rfind(ANSWER_START, 0, end)
    if end >= 0 and start >= 0:
        return completion[start + len(ANSWER_START) : end].strip()
    last = None
    for last in pattern.finditer(completion):
        pass
    return last.group(0).strip() if last else None


def accuracy_reward(task: Task, problem: Problem, completion: str, strict: bool = False) -> float:
    return float(task.verify(problem, completion, strict))


def format_reward(completion: str) -> float:
    return float(strict_answer(completion) is not None)


def tag_count_reward(completion: str) -> float:
    """+0.25 for each format tag that occurs exactly once: dense shaping towards the format."""
    return sum(0.25 for tag in FORMAT_TAGS if completion.count(tag) == 1)


def prompt_ids(tokenizer: Tokenizer, task: Task, problem: Problem, template: Template = "chat") -> list[int]:
    """The token ids a model completes for `problem`: the chat format up to the assistant turn
    (after SFT), the R1-Zero text prompt after BOS (a base model, `grpo --zero`), or the problem
    line as the base corpus starts a document (data/corpus.py `base_text`)."""
    if template == "chat":
        return tokenizer.render_prompt(task.conversation(problem))
    if template == "zero":
        return [tokenizer.bos_id] + tokenizer.encode(R1_ZERO_TEMPLATE.format(prompt=problem.prompt))
    if template == "plain":
        return [tokenizer.bos_id] + tokenizer.encode(f"{problem.prompt}\n")
    raise ValueError(f"template must be one of {TEMPLATES}, not {template!r}")


def is_eval_problem(problem: Problem) -> bool:
    """Held out for evaluation. Hashing the canonical text, not the seed, keeps a problem that
    two seeds both generate on one side of the split. Facts are never held out."""
    if problem.fact:
        return False
    digest = hashlib.sha256(f"{problem.task}\n{problem.prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < EVAL_PERCENT


def sample(task: Task, split: Literal["train", "eval"], n: int, seed: int, difficulty: int) -> Iterator[Problem]:
    """`n` problems of one split, deterministic in `seed`; draws from the other split are redrawn.

    A small problem space can repeat problems; it raises if the split looks empty (the eval split
    of a difficulty made only of facts is empty).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    rng = random.Random(f"sample:{task.name}:{seed}:{difficulty}")
    found, draws, max_draws = 0, 0, 100 * n + 1000
    while found < n:
        if draws == max_draws:
            raise RuntimeError(f"{task.name} difficulty {difficulty}: only {found} {split} problems in {draws} draws")
        draws += 1
        problem = task.generate(rng.getrandbits(63), difficulty)
        if is_eval_problem(problem) == (split == "eval"):
            found += 1
            yield problem
