"""Countdown: reach a target with each given number used once and + - * / (TinyZero's RL task).

Difficulty = how many numbers (3-6). The generator combines the numbers by random steps, so
every problem is solvable; the verifier accepts any correct equation, not just that one.
Answers are parsed by a small recursive-descent parser and evaluated in exact fractions;
nothing is ever passed to eval.
"""

from __future__ import annotations

import operator
import re
from collections import Counter
from fractions import Fraction

from nanoseek.data.task import Problem, Task

MAX_EXPRESSION_CHARS = 200
MAX_LITERAL = 10**6
# Any intermediate whose numerator or denominator grows past this aborts the evaluation,
# which bounds the work of a hostile expression.
MAX_INTERMEDIATE = 10**12
# Targets and generator intermediates stay positive integers up to this.
MAX_TARGET = 1000
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
TOKEN = re.compile(r"[0-9]+|\S")

# Lenient extraction without <answer> tags: the last run of equation characters.
EQUATION = re.compile(r"[0-9(][0-9+\-*/() =]*")

# An expression tree: an int leaf, or (op, left, right).
Node = int | tuple[str, "Node", "Node"]
# A generator pool entry: a value and the tree that computes it.
Item = tuple[int, Node]


class Countdown(Task):
    name = "countdown"
    difficulties = range(3, 7)
    answer_pattern = EQUATION

    def generate(self, seed: int, difficulty: int) -> Problem:
        rng = self._rng(seed, difficulty)
        numbers = [rng.randint(1, 10) if rng.random() < 0.7 else rng.randint(11, 100) for _ in range(difficulty)]
        pool: list[Item] = [(n, n) for n in numbers]
        steps = []
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            op, value, (x, left), (y, right) = rng.choice(_combinations(pool[i], pool[j]))
            pool = [item for k, item in enumerate(pool) if k not in (i, j)] + [(value, (op, left, right))]
            steps.append(f"{x} {op} {y} = {value} (left: {', '.join(str(v) for v, _ in pool)})")
        target, tree = pool[0]
        equation = _render(tree)
        return Problem(
            task=self.name,
            prompt=(
                f"Using the numbers {', '.join(map(str, numbers))}, write an equation that equals {target}. "
                "Use each number exactly once, with + - * / and parentheses."
            ),
            answer=equation,
            meta={"seed": seed, "difficulty": difficulty, "numbers": numbers, "target": target, "steps": steps},
        )

    def reasoning_trace(self, problem: Problem) -> str:
        meta = problem.meta
        return "\n".join(
            [f"Numbers: {', '.join(map(str, meta['numbers']))}. Target: {meta['target']}."]
            + [f"Step {k}: {step}" for k, step in enumerate(meta["steps"], 1)]
            + [f"The last value is the target, so {problem.answer} = {meta['target']}."]
        )

    def check_answer(self, problem: Problem, answer: str) -> bool:
        if len(answer) > MAX_EXPRESSION_CHARS:
            return False
        expression, *rest = answer.split("=")
        if len(rest) > 1 or (rest and not re.fullmatch(r"\s*[0-9]+\s*", rest[0])):
            return False
        if rest and int(rest[0]) != problem.meta["target"]:
            return False
        parsed = parse_equation(expression)
        if parsed is None:
            return False
        value, literals = parsed
        return value == problem.meta["target"] and Counter(literals) == Counter(problem.meta["numbers"])


def parse_equation(text: str) -> tuple[Fraction, list[int]] | None:
    """(value, literals in order) of an expression over + - * / and parentheses, or None if it is
    not one: unknown tokens, unary signs, **, division by zero, or numbers past the bounds.

    Grammar: expr := term (('+' | '-') term)* ; term := factor (('*' | '/') factor)* ;
    factor := integer | '(' expr ')'. The length bound keeps the recursion shallow.
    """
    if len(text) > MAX_EXPRESSION_CHARS:
        return None
    tokens = TOKEN.findall(text)
    literals: list[int] = []
    position = 0

    def peek() -> str | None:
        return tokens[position] if position < len(tokens) else None

    def take() -> str | None:
        nonlocal position
        token = peek()
        position += 1
        return token

    def expr() -> Fraction:
        value = term()
        while peek() in ("+", "-"):
            value = _apply(take(), value, term())
        return value

    def term() -> Fraction:
        value = factor()
        while peek() in ("*", "/"):
            value = _apply(take(), value, factor())
        return value

    def factor() -> Fraction:
        token = take()
        if token == "(":
            value = expr()
            if take() != ")":
                raise _Invalid
            return value
        # isascii: str.isdigit also accepts digits such as '²' that int() refuses.
        if token is None or not (token.isascii() and token.isdigit()) or int(token) > MAX_LITERAL:
            raise _Invalid
        literals.append(int(token))
        return Fraction(int(token))

    try:
        value = expr()
    except (_Invalid, ZeroDivisionError):
        return None
    if position != len(tokens):
        return None
    return value, literals


class _Invalid(Exception):
    pass


def _apply(op: str, x: Fraction, y: Fraction) -> Fraction:
    value = OPERATIONS[op](x, y)
    if abs(value.numerator) > MAX_INTERMEDIATE or value.denominator > MAX_INTERMEDIATE:
        raise _Invalid
    return value


def _combinations(a: Item, b: Item) -> list[tuple[str, int, Item, Item]]:
    """Steps from two (value, tree) items whose result is a positive integer up to MAX_TARGET,
    so the trace reads as whole-number arithmetic. Never empty: x - y, y - x or x / x qualifies."""
    (x, _), (y, _) = a, b
    options = [("+", x + y, a, b), ("*", x * y, a, b), ("-", x - y, a, b), ("-", y - x, b, a)]
    options += [("/", x // y, a, b)] if x % y == 0 else []
    options += [("/", y // x, b, a)] if y % x == 0 else []
    return [option for option in options if 0 < option[1] <= MAX_TARGET]


def _render(node: Node) -> str:
    """The expression with only the parentheses that precedence needs."""
    if isinstance(node, int):
        return str(node)
    op, left, right = node
    left_text, right_text = _render(left), _render(right)
    if not isinstance(left, int) and PRECEDENCE[left[0]] < PRECEDENCE[op]:
        left_text = f"({left_text})"
    # a - (b + c) and a / (b * c) need parentheses even at equal precedence.
    if not isinstance(right, int) and (
        PRECEDENCE[right[0]] < PRECEDENCE[op] or (PRECEDENCE[right[0]] == PRECEDENCE[op] and op in "-/")
    ):
        right_text = f"({right_text})"
    return f"{left_text}{op}{right_text}"
