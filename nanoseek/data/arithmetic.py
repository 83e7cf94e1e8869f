"""Multi-digit +, - and * with school-method traces; difficulty = digits per operand."""

from __future__ import annotations

import re

from nanoseek.data.task import Problem, Task

# Longer answers are rejected before parsing; no correct answer comes near it.
MAX_ANSWER_CHARS = 64
# Accepted normal forms: optional sign, thousands grouped by commas or by spaces (not mixed),
# and a zero fractional part, e.g. "+1,234", "-1 234", "1234.00".
NUMBER_FORM = re.compile(r"([+-]?)([0-9]+|[0-9]{1,3}(?:,[0-9]{3})+|[0-9]{1,3}(?: [0-9]{3})+)(?:\.0+)?")


class Arithmetic(Task):
    """`a + b`, `a - b` with two `difficulty`-digit operands, and `a * b` with a `difficulty`-digit
    `a` and a one-digit `b`.

    Every trace line is one column of the school method, written least-significant digit first
    (which small transformers learn far more easily than most-significant first: docs/facts.md §15):
    a single-digit fact and the carry or borrow it passes on (`7*8+5=61 c6`: the column writes the
    total's last digit). The lines are terse on purpose: every token a model writes costs a decode
    step in evaluation and RL rollouts, and words like "write" or "carry" add nothing to learn.
    Difficulty 1 problems are exactly those facts, so
    they are all in the train split (`Problem.fact`); held-out problems of difficulty >= 2 are new
    combinations of facts and carries that the train split shows thousands of times.
    """

    name = "arithmetic"
    difficulties = range(1, 11)

    def generate(self, seed: int, difficulty: int) -> Problem:
        rng = self._rng(seed, difficulty)
        low = 0 if difficulty == 1 else 10 ** (difficulty - 1)
        op = rng.choice("+-*")
        a = rng.randint(low, 10**difficulty - 1)
        b = rng.randint(0, 9) if op == "*" else rng.randint(low, 10**difficulty - 1)
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        return Problem(
            task=self.name,
            prompt=f"What is {a} {op} {b}?",
            answer=str(result),
            meta={"seed": seed, "difficulty": difficulty, "a": a, "b": b, "op": op},
            fact=difficulty == 1,
        )

    def reasoning_trace(self, problem: Problem) -> str:
        a, b, op = problem.meta["a"], problem.meta["b"], problem.meta["op"]
        if op == "+":
            lines = _add_columns(a, b)
        elif op == "-" and a >= b:
            lines = _subtract_columns(a, b)
        elif op == "-":
            lines = [f"{a}<{b} so {a}-{b}=-({b}-{a})"] + _subtract_columns(b, a)
        else:
            lines = _multiply_columns(a, b)
        return "\n".join(lines + [f"{a}{op}{b}={problem.answer}"])

    def check_answer(self, problem: Problem, answer: str) -> bool:
        if len(answer) > MAX_ANSWER_CHARS:
            return False
        match = NUMBER_FORM.fullmatch(answer.strip())
        if match is None:
            return False
        sign, digits = match.groups()
        return int(sign + re.sub("[, ]", "", digits)) == int(problem.answer)


def _digits(n: int, width: int) -> list[int]:
    """Digits of n from the least significant, zero-padded to width."""
    return [int(d) for d in reversed(str(n).zfill(width))]


def _add_columns(a: int, b: int) -> list[str]:
    width = max(len(str(a)), len(str(b)))
    lines, carry = [], 0
    for x, y in zip(_digits(a, width), _digits(b, width)):
        total = x + y + carry
        lines.append(f"{x}+{y}+{carry}={total} c{total // 10}")
        carry = total // 10
    if carry:
        lines.append(f"c{carry}")
    return lines


def _subtract_columns(a: int, b: int) -> list[str]:
    """Column subtraction for a >= b."""
    lines, borrow = [], 0
    for x, y in zip(_digits(a, len(str(a))), _digits(b, len(str(a)))):
        diff = x - y - borrow
        if diff < 0:
            lines.append(f"{x}-{y}-{borrow}<0 1{x}-{y}-{borrow}={diff + 10} b1")
            borrow = 1
        else:
            lines.append(f"{x}-{y}-{borrow}={diff} b0")
            borrow = 0
    return lines


def _multiply_columns(a: int, b: int) -> list[str]:
    """a times a one-digit b, one digit of a at a time."""
    lines, carry = [], 0
    for x in _digits(a, len(str(a))):
        total = x * b + carry
        lines.append(f"{x}*{b}+{carry}={total} c{total // 10}")
        carry = total // 10
    if carry:
        lines.append(f"c{carry}")
    return lines
