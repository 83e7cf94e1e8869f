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
    name = "arithmetic"
    difficulties = range(1, 11)

    def generate(self, seed: int, difficulty: int) -> Problem:
        rng = self._rng(seed, difficulty)
        low = 0 if difficulty == 1 else 10 ** (difficulty - 1)
        a, b = rng.randint(low, 10**difficulty - 1), rng.randint(low, 10**difficulty - 1)
        op = rng.choice("+-*")
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        return Problem(
            task=self.name,
            prompt=f"What is {a} {op} {b}?",
            answer=str(result),
            meta={"seed": seed, "difficulty": difficulty, "a": a, "b": b, "op": op},
        )

    def reasoning_trace(self, problem: Problem) -> str:
        a, b, op = problem.meta["a"], problem.meta["b"], problem.meta["op"]
        if op == "+":
            lines = _add_columns(a, b)
        elif op == "-" and a >= b:
            lines = _subtract_columns(a, b)
        elif op == "-":
            lines = [f"{a} < {b}, so {a} - {b} = -({b} - {a})."] + _subtract_columns(b, a)
        else:
            lines = _multiply_partials(a, b)
        return "\n".join(lines + [f"So {a} {op} {b} = {problem.answer}."])

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
    lines = [f"Add {a} + {b} column by column from the right."]
    carry, written = 0, []
    for x, y in zip(_digits(a, width), _digits(b, width)):
        total = x + y + carry
        lines.append(f"{x} + {y} + carry {carry} = {total}: write {total % 10}, carry {total // 10}")
        written.append(total % 10)
        carry = total // 10
    if carry:
        lines.append(f"Write the final carry {carry}.")
        written.append(carry)
    lines.append(f"Reading the written digits from the left: {''.join(map(str, reversed(written)))}")
    return lines


def _subtract_columns(a: int, b: int) -> list[str]:
    """Column subtraction for a >= b."""
    width = len(str(a))
    lines = [f"Subtract {a} - {b} column by column from the right."]
    borrow, written = 0, []
    for x, y in zip(_digits(a, width), _digits(b, width)):
        diff = x - y - borrow
        if diff < 0:
            lines.append(f"{x} - {y} - borrow {borrow} = {diff} < 0: add 10, write {diff + 10}, borrow 1")
            written.append(diff + 10)
            borrow = 1
        else:
            lines.append(f"{x} - {y} - borrow {borrow} = {diff}: write {diff}, borrow 0")
            written.append(diff)
            borrow = 0
    lines.append(f"Reading the written digits from the left: {''.join(map(str, reversed(written)))} = {a - b}")
    return lines


def _multiply_partials(a: int, b: int) -> list[str]:
    lines = [f"Multiply {a} by each digit of {b} from the right, then add the partial products."]
    partials = []
    for place, digit in enumerate(_digits(b, len(str(b)))):
        partial = a * digit * 10**place
        lines.append(f"{a} * {digit * 10**place} = {partial}")
        partials.append(partial)
    total = partials[0]
    for partial in partials[1:]:
        lines.append(f"{total} + {partial} = {total + partial}")
        total += partial
    return lines
