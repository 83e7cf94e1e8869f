import ast
import random
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.data import (
    TASKS,
    Problem,
    Task,
    accuracy_reward,
    extract_answer,
    format_reward,
    get_task,
    is_eval_problem,
    sample,
    tag_count_reward,
)
from nanoseek.data.countdown import parse_equation
from nanoseek.data.task import STRICT_FORMAT, strict_answer

arithmetic, countdown = TASKS["arithmetic"], TASKS["countdown"]


def wrap(answer: str, trace: str = "working") -> str:
    return f"<think>\n{trace}\n</think>\n<answer>\n{answer}\n</answer>"


def problems(task: Task):
    return st.builds(task.generate, st.integers(0, 2**63), st.sampled_from(task.difficulties))


def group_thousands(digits: str, separator: str) -> str:
    head = len(digits) % 3 or 3
    return separator.join([digits[:head]] + [digits[i : i + 3] for i in range(head, len(digits), 3)])


@st.composite
def normal_forms(draw, value: int) -> str:
    """A random accepted spelling of an integer."""
    digits = str(abs(value))
    separator = draw(st.sampled_from(["", ",", " "]))
    body = group_thousands(digits, separator) if separator else digits
    sign = "-" if value < 0 else draw(st.sampled_from(["", "+"]))
    fraction = draw(st.sampled_from(["", ".0", ".00"]))
    pad = st.text(" \t\n", max_size=3)
    return f"{draw(pad)}{sign}{body}{fraction}{draw(pad)}"


# --- the task interface ----------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS.values(), ids=TASKS.keys())
def test_generation_is_deterministic_and_solutions_verify(task):
    for difficulty in task.difficulties:
        for seed in range(25):
            problem = task.generate(seed, difficulty)
            assert problem == task.generate(seed, difficulty)
            assert problem.task == task.name and problem.meta["difficulty"] == difficulty
            solution = task.render_solution(problem)
            assert strict_answer(solution) == problem.answer
            assert task.verify(problem, solution, strict=True)
            assert task.verify(problem, solution, strict=False)
            assert task.conversation(problem)[1]["content"] == solution


@pytest.mark.parametrize("task", TASKS.values(), ids=TASKS.keys())
def test_difficulty_out_of_range(task):
    with pytest.raises(ValueError, match="difficulty"):
        task.generate(0, task.difficulties.stop)


def test_registry():
    assert get_task("countdown") is countdown
    with pytest.raises(KeyError, match="arithmetic, countdown"):
        get_task("gsm8k")


def test_a_user_task_needs_only_three_methods():
    class Parity(Task):
        name = "parity"
        difficulties = range(1, 4)

        def generate(self, seed, difficulty):
            n = self._rng(seed, difficulty).randrange(10**difficulty)
            return Problem(self.name, f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd", {"n": n})

        def reasoning_trace(self, problem):
            return f"The last digit of {problem.meta['n']} decides."

        def check_answer(self, problem, answer):
            return answer.strip().lower() == problem.answer

    task = Parity()
    problem = task.generate(3, 2)
    assert task.verify(problem, task.render_solution(problem), strict=True)
    assert not task.verify(problem, wrap("even" if problem.answer == "odd" else "odd"), strict=True)
    assert list(sample(task, "train", 5, 0, 3))


# --- arithmetic ------------------------------------------------------------------------------


COLUMN = re.compile(r"(\d)([-+*])(\d)([-+])(\d)=(\d+) ([cb])(\d)")
BORROW = re.compile(r"(\d)-(\d)-(\d)<0 1\1-\2-\3=(\d) b1")


def test_arithmetic_traces_are_single_digit_steps_that_compute_the_answer():
    """Each trace line is one column: a single-digit fact with a carry or borrow, all correct; the
    written digits, read from the last, are the answer's digits (the model composes facts only)."""
    for seed in range(400):
        problem = arithmetic.generate(seed, 1 + seed % 6)
        a, b, op = problem.meta["a"], problem.meta["b"], problem.meta["op"]
        assert problem.prompt == f"What is {a} {op} {b}?"
        assert int(problem.answer) == {"+": a + b, "-": a - b, "*": a * b}[op]
        lines = arithmetic.reasoning_trace(problem).splitlines()
        assert lines[-1] == f"{a}{op}{b}={problem.answer}"
        written = []
        for line in lines[:-1]:
            if line.startswith(f"{a}<{b} so "):
                continue
            if match := BORROW.fullmatch(line):
                x, y, borrow, digit = map(int, match.groups())
                assert x - y - borrow < 0 and digit == 10 + x - y - borrow
                written.append(digit)
            elif match := COLUMN.fullmatch(line):
                x, first, y, second, carry, total, kind, out = match.groups()
                x, y, carry, total, out = map(int, (x, y, carry, total, out))
                expected = {"+": x + y, "-": x - y, "*": x * y}[first] + (carry if second == "+" else -carry)
                assert expected == total and out == total // 10 and kind == ("b" if first == "-" else "c")
                written.append(total % 10)
            else:
                assert re.fullmatch(r"c(\d)", line), line
                written.append(int(line[1:]))
        assert int("".join(map(str, reversed(written)))) == abs(int(problem.answer))


def test_arithmetic_facts_are_never_held_out():
    facts = [arithmetic.generate(seed, 1) for seed in range(2000)]
    assert all(p.fact for p in facts) and not any(map(is_eval_problem, facts))
    assert not any(arithmetic.generate(seed, 2).fact for seed in range(100))
    with pytest.raises(RuntimeError, match="eval problems"):
        next(sample(arithmetic, "eval", 1, 0, 1))


@settings(max_examples=300, deadline=None)
@given(st.data(), problems(arithmetic))
def test_arithmetic_accepts_every_normal_form(data, problem):
    answer = data.draw(normal_forms(int(problem.answer)))
    assert arithmetic.check_answer(problem, answer), answer
    assert arithmetic.verify(problem, wrap(answer), strict=True)
    assert arithmetic.verify(problem, f"I computed it. The result is {answer.strip()}", strict=False)


@settings(max_examples=300, deadline=None)
@given(st.data(), problems(arithmetic), st.integers(-10**6, 10**6).filter(bool))
def test_arithmetic_rejects_wrong_numbers(data, problem, k):
    wrong = data.draw(normal_forms(int(problem.answer) + k))
    assert not arithmetic.check_answer(problem, wrong)
    assert not arithmetic.verify(problem, wrap(wrong), strict=True)


@pytest.mark.parametrize(
    "answer",
    ["", "abc", "1,0000", "12,34", "1,234 567", "1e3", "0x10", "١٢٣", "1234.5", "1234.", "--1234", "+-1234", "12 34"],
)
def test_arithmetic_rejects_garbage(answer):
    problem = Problem("arithmetic", "What is 1200 + 34?", "1234", {"a": 1200, "b": 34, "op": "+"})
    assert arithmetic.check_answer(problem, "1 234") and arithmetic.check_answer(problem, "1234")
    assert not arithmetic.check_answer(problem, answer)


def test_negative_results():
    problem = Problem("arithmetic", "What is 34 - 1200?", "-1166", {"a": 34, "b": 1200, "op": "-"})
    for answer in ["-1166", " -1,166.0 ", "-1 166"]:
        assert arithmetic.check_answer(problem, answer)
    for answer in ["1166", "+1166", "- 1166"]:
        assert not arithmetic.check_answer(problem, answer)
    assert "-(1200-34)" in arithmetic.reasoning_trace(problem)


HUGE = ["9" * 10**6, "2**99999999", "(" * 10**5 + "1" + ")" * 10**5, "1+" * 10**5 + "1", "<answer>" * 10**5]


@pytest.mark.parametrize("task", TASKS.values(), ids=TASKS.keys())
@pytest.mark.parametrize("huge", HUGE, ids=["nines", "power", "parens", "sum", "tags"])
def test_huge_inputs_are_rejected_quickly(task, huge):
    problem = task.generate(0, task.difficulties[0])
    start = time.perf_counter()
    for completion in (huge, wrap(huge), f"The answer is {huge}"):
        assert not task.verify(problem, completion, strict=True)
        assert not task.verify(problem, completion, strict=False)
        assert not task.check_answer(problem, huge)
    assert time.perf_counter() - start < 1.0


# --- countdown -------------------------------------------------------------------------------

EXAMPLE = Problem("countdown", "Using 25, 5, 4, 3 make 83.", "(25-5)*4+3", {"numbers": [25, 5, 4, 3], "target": 83})


def commuted(equation: str, rng: random.Random) -> str:
    """Another correct spelling: swap the operands of random + and * nodes, fully parenthesised."""

    class Swap(ast.NodeTransformer):
        def visit_BinOp(self, node):
            self.generic_visit(node)
            if isinstance(node.op, (ast.Add, ast.Mult)) and rng.random() < 0.5:
                node.left, node.right = node.right, node.left
            return node

    tree = Swap().visit(ast.parse(equation, mode="eval"))
    return ast.unparse(tree)


def test_countdown_problems_are_solvable():
    for seed in range(200):
        problem = countdown.generate(seed, 3 + seed % 4)
        value, literals = parse_equation(problem.answer)
        assert value == problem.meta["target"] and 1 <= value <= 1000
        assert sorted(literals) == sorted(problem.meta["numbers"])
        assert len(problem.meta["numbers"]) == problem.meta["difficulty"]
        assert all(str(n) in problem.prompt for n in problem.meta["numbers"])


@settings(max_examples=300, deadline=None)
@given(problems(countdown), st.randoms(use_true_random=False))
def test_countdown_accepts_any_correct_equation(problem, rng):
    equation = commuted(problem.answer, rng)
    target = problem.meta["target"]
    for answer in (equation, f"({equation})", f"{equation} = {target}", equation.replace(" ", "")):
        assert countdown.check_answer(problem, answer), answer
        assert countdown.verify(problem, wrap(answer), strict=True)
    assert countdown.verify(problem, f"So {equation} = {target}.", strict=False)


@settings(max_examples=200, deadline=None)
@given(problems(countdown), st.integers(1, 50))
def test_countdown_rejects_wrong_equations(problem, k):
    numbers, target, equation = problem.meta["numbers"], problem.meta["target"], problem.answer
    assert not countdown.check_answer(problem, f"{equation} = {target + k}")
    assert not countdown.check_answer(problem, f"{equation}+{k}")  # an extra number
    assert not countdown.check_answer(problem, f"{equation}+{numbers[0]}-{numbers[0]}")  # reused numbers
    one_more = Problem(problem.task, problem.prompt, equation, {**problem.meta, "numbers": numbers + [k]})
    assert not countdown.check_answer(one_more, equation)  # a given number left out


@pytest.mark.parametrize(
    "answer",
    ["(25-5)*4+3", "3+4*(25-5)", "( 25 - 5 ) * 4 + 3", "(25-5)*4+3 = 83", "4*(25-5)+3=83", "((25-5)*4)+3"],
)
def test_countdown_example_accepted(answer):
    assert countdown.check_answer(EXAMPLE, answer)


@pytest.mark.parametrize(
    "answer",
    [
        "(25-5)*4",  # 3 unused
        "(25-5)*4+3+3-3",  # 3 reused
        "(25-5)*4+3 = 84",
        "83 = (25-5)*4+3",
        "(25-5)*4+3 = 83 = 83",
        "(25-5)*4+3 = 80+3",
        "-(5-25)*4+3",  # unary minus
        "(25-5)*4+3.0",
        "(25-5)*4+3)",
        "((25-5)*4+3",
        "(25-5)4+3",
        "25 5 4 3",
        "(25-5)**4+3",
        "__import__('os').system('true')",
        "",
        "eighty-three",
        "(25-5)×4+3",
        "(25-5)*4+٣",
    ],
)
def test_countdown_example_rejected(answer):
    assert not countdown.check_answer(EXAMPLE, answer)


def test_countdown_exact_fractions_and_division_by_zero():
    problem = Problem("countdown", "", "", {"numbers": [1, 3, 3], "target": 1})
    assert countdown.check_answer(problem, "1/3*3")  # 1/3 is an exact intermediate
    assert parse_equation("3/(3-3)") is None
    assert not countdown.check_answer(Problem("countdown", "", "", {"numbers": [2, 2, 7], "target": 0}), "7/(2-2)")


def test_countdown_bounds():
    assert parse_equation("1000000*2")[0] == 2000000
    assert parse_equation("1000001*2") is None  # literal too large
    assert parse_equation("999999*999999*999999") is None  # intermediate too large
    assert parse_equation("(" * 99 + "1" + ")" * 99)[0] == 1
    assert parse_equation("(" * 150 + "1" + ")" * 150) is None  # too long


# --- extraction and rewards ------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, strict, lenient",
    [
        (wrap("42"), "42", "42"),
        (wrap("42") + "\n", None, "42"),
        (wrap("42") + "\nI changed my mind: 7", None, "42"),
        ("<answer>\n42\n</answer>", None, "42"),
        ("<think>\nhm</think>\n<answer>\n42\n</answer>", None, "42"),
        ("junk " + wrap("42"), None, "42"),
        ("<answer>1</answer> then <answer> 2 </answer>", None, "2"),
        ("The answer is 1,234.", None, "1,234"),
        ("3 then -5.0", None, "-5.0"),
        ("no numbers", None, None),
        ("<answer>unfinished 17", None, "17"),
        (wrap("a\nb"), "a\nb", "a\nb"),
        ("<think>\n\n</think>\n<answer>\n\n</answer>", "", ""),
    ],
)
def test_extract_answer(completion, strict, lenient):
    assert extract_answer(completion, strict=True) == strict
    assert extract_answer(completion, strict=False) == lenient


pieces = st.sampled_from(["<think>\n", "\n</think>\n", "<answer>\n", "\n</answer>", "\n", "x", "</think>", "<answer>"])


@settings(max_examples=500, deadline=None)
@given(st.lists(pieces, max_size=10).map("".join))
def test_strict_answer_is_a_whole_string_regex_match(completion):
    match = STRICT_FORMAT.fullmatch(completion)
    assert strict_answer(completion) == (match.group(1) if match else None)


def test_strict_match_is_linear_on_repeated_tags():
    completion = "<think>\n" + "\n</think>\n<answer>\n" * 100_000
    start = time.perf_counter()
    assert strict_answer(completion) is None
    assert strict_answer(completion + "x\n</answer>") == "\n</think>\n<answer>\n" * 99_999 + "x"
    assert time.perf_counter() - start < 0.5


def test_rewards():
    problem = arithmetic.generate(5, 3)
    solution = arithmetic.render_solution(problem)
    assert accuracy_reward(arithmetic, problem, solution, strict=True) == 1.0
    assert accuracy_reward(arithmetic, problem, solution + " trailing", strict=True) == 0.0
    assert accuracy_reward(arithmetic, problem, f"It is {problem.answer}") == 1.0
    assert accuracy_reward(arithmetic, problem, wrap(str(int(problem.answer) + 1))) == 0.0
    assert format_reward(solution) == 1.0
    assert format_reward(solution + "\n") == 0.0  # the MULTILINE `$` pitfall of docs/facts.md §9
    assert format_reward(solution.replace("<think>", "<thinking>")) == 0.0
    assert tag_count_reward(solution) == 1.0
    assert tag_count_reward(f"<answer>\n{problem.answer}\n</answer>") == 0.25  # only "\n</answer>" as such
    assert tag_count_reward(solution + solution) == 0.0
    assert tag_count_reward("<think>\nx\n</think>\n") == 0.5
    assert tag_count_reward("") == 0.0


# --- splits ----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS.values(), ids=TASKS.keys())
def test_splits_are_disjoint_and_deterministic(task):
    for difficulty in task.difficulties:
        if difficulty == 1 and task is arithmetic:
            continue  # single-digit facts: all train (test_arithmetic_facts_are_never_held_out)
        train = list(sample(task, "train", 400, seed=1, difficulty=difficulty))
        evals = list(sample(task, "eval", 40, seed=1, difficulty=difficulty))
        assert len(train) == 400 and len(evals) == 40
        assert not any(map(is_eval_problem, train)) and all(map(is_eval_problem, evals))
        assert not {p.prompt for p in train} & {p.prompt for p in evals}
        assert evals == list(sample(task, "eval", 40, seed=1, difficulty=difficulty))
        assert train != list(sample(task, "train", 400, seed=2, difficulty=difficulty))


def test_eval_share_is_about_five_percent():
    drawn = [countdown.generate(seed, 4) for seed in range(4000)]
    share = sum(map(is_eval_problem, drawn)) / len(drawn)
    assert 0.035 < share < 0.065


def test_sample_validates_split():
    with pytest.raises(ValueError, match="split"):
        next(sample(arithmetic, "test", 1, 0, 2))
