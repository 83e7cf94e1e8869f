"""Evaluation: pass@k and maj@k against their definitions, the aggregation on hand-computed outcomes,
and evaluate() / the eval verb end to end on a tiny random model."""

import itertools
import json
import math

import pytest

from conftest import random_model, tiny_config
from nanoseek import cli
from nanoseek.data import get_task, is_eval_problem, sample
from nanoseek.eval import (
    Attempt,
    EvalConfig,
    ProblemOutcome,
    SampleOutcome,
    complete,
    eval_suites,
    evaluate,
    format_table,
    majority_vote,
    parse_tasks,
    pass_at_k,
    score,
    summarise,
)
from nanoseek.infer.engine import Completion
from nanoseek.tokenizer import train_tokenizer

ARITHMETIC = get_task("arithmetic")


@pytest.mark.parametrize("n,c,k", [(5, 2, 1), (5, 2, 2), (6, 3, 3), (8, 1, 4), (7, 5, 2), (10, 4, 6), (4, 4, 4)])
def test_pass_at_k_matches_enumerating_every_k_subset(n, c, k):
    correct = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(correct, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)


def test_pass_at_k_edges():
    assert pass_at_k(8, 0, 4) == 0.0
    assert pass_at_k(8, 5, 4) == 1.0  # n - c = 3 < k
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_majority_vote_groups_whitespace_ties_to_first_and_skips_missing():
    assert majority_vote(["12", " 1 2", "7", None, "7 ", "12"]) == "12"
    assert majority_vote(["3+4", "5", "3 + 4"]) == "3+4"  # one group, represented by its first form
    assert majority_vote(["5", "9", "9", "5"]) == "5"  # tie: 5 was voted for first
    assert majority_vote(["9", "5", "5", "9"]) == "9"
    assert majority_vote([None, "", "  ", None]) is None


def _completion(text: str, tokens: int = 5, finish: str = "stop") -> Completion:
    return Completion(list(range(tokens)), finish, None, text, 0, 0)


def test_score_reads_strict_lenient_format_and_majority():
    problem = next(sample(ARITHMETIC, "eval", 1, seed=0, difficulty=2))
    right, wrong = problem.answer, str(int(problem.answer) + 1)
    attempt = Attempt(samples=[_completion(f"<think>\nok\n</think>\n<answer>\n{right}\n</answer>"),
                               _completion(f"so it is {right}", tokens=8, finish="length"),
                               _completion(f"{wrong}"), _completion(f"<answer>{wrong}</answer>"),
                               _completion("no idea")],
                      greedy=_completion(f"it is {right}"))
    outcome = score(ARITHMETIC, problem, attempt)
    assert [s.strict for s in outcome.samples] == [True, False, False, False, False]
    assert [s.lenient for s in outcome.samples] == [True, True, False, False, False]
    assert [s.format for s in outcome.samples] == [True, False, False, False, False]
    assert [s.truncated for s in outcome.samples] == [False, True, False, False, False]
    assert [s.tokens for s in outcome.samples] == [5, 8, 5, 5, 5]
    assert outcome.majority  # two votes each; the right answer came first
    wrong_first = score(ARITHMETIC, problem, Attempt(attempt.samples[2:] + attempt.samples[:2], None))
    assert not wrong_first.majority and wrong_first.greedy is None
    assert outcome.greedy == SampleOutcome(strict=False, lenient=True, format=False, tokens=5, truncated=False)


def _s(strict: bool, lenient: bool | None = None, fmt: bool = False, tokens: int = 10,
       truncated: bool = False) -> SampleOutcome:
    return SampleOutcome(strict, strict if lenient is None else lenient, fmt, tokens, truncated)


def test_summarise_on_hand_computed_outcomes():
    outcomes = [
        # 2 of 4 strict, 3 of 4 lenient
        ProblemOutcome([_s(True, fmt=True), _s(True, fmt=True, tokens=20), _s(False, True), _s(False, truncated=True)],
                       majority=True, greedy=_s(True)),
        # none strict
        ProblemOutcome([_s(False), _s(False), _s(False, True), _s(False, truncated=True)],
                       majority=False, greedy=_s(False, True)),
        # 4 of 4 strict
        ProblemOutcome([_s(True, fmt=True)] * 4, majority=True, greedy=_s(False)),
    ]
    m = summarise(outcomes, k=2)
    fractions = [0.5, 0.0, 1.0]
    assert m["n"] == 3
    assert m["pass@1"] == pytest.approx(0.5)
    stdev = math.sqrt(sum((f - 0.5) ** 2 for f in fractions) / 2)
    assert m["pass@1_stderr"] == pytest.approx(stdev / math.sqrt(3))
    assert m["pass@2"] == pytest.approx((1 - 1 / 6 + 0 + 1) / 3)  # C(2,2)/C(4,2) = 1/6 misses both
    assert m["maj@2"] == pytest.approx(2 / 3)
    assert m["pass@1_lenient"] == pytest.approx((0.75 + 0.25 + 1.0) / 3)
    assert m["greedy"] == pytest.approx(1 / 3) and m["greedy_lenient"] == pytest.approx(2 / 3)
    assert m["format"] == pytest.approx(6 / 12)
    assert m["mean_tokens"] == pytest.approx(130 / 12)
    assert m["truncation"] == pytest.approx(2 / 12)
    single = summarise(outcomes[:1], k=4)
    assert single["pass@1_stderr"] == 0.0 and single["pass@4"] == 1.0
    no_greedy = summarise([ProblemOutcome(o.samples, o.majority) for o in outcomes], k=2)
    assert "greedy" not in no_greedy and "greedy_lenient" not in no_greedy


def test_parse_tasks_and_suites():
    assert parse_tasks("arithmetic:2,3; countdown:3") == {"arithmetic": [2, 3], "countdown": [3]}
    assert parse_tasks("countdown") == {"countdown": [3, 4, 5, 6]}
    with pytest.raises(ValueError, match="valid tasks: arithmetic, countdown"):
        parse_tasks("algebra:1")
    with pytest.raises(ValueError, match="not in 1..10"):
        parse_tasks("arithmetic:11")
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_tasks("arithmetic:two")
    with pytest.raises(ValueError, match="no tasks"):
        parse_tasks(" ; ")
    (_, _, two_digit), = eval_suites({"arithmetic": [2]}, problems=1000, seed=0)
    assert len(set(two_digit)) == len(two_digit) < 1000  # the 2-digit eval split is small: distinct only
    suites = eval_suites({"arithmetic": [6], "countdown": [4]}, problems=50, seed=0)
    assert [(t.name, d, len(p)) for t, d, p in suites] == [("arithmetic", 6, 50), ("countdown", 4, 50)]
    assert all(p.meta["difficulty"] == d for _, d, problems in suites for p in problems)
    assert all(is_eval_problem(p) for p in two_digit + suites[0][2] + suites[1][2])


@pytest.fixture(scope="module")
def tok():
    texts = []
    for task_name, difficulties in (("arithmetic", (1, 2)), ("countdown", (3,))):
        task = get_task(task_name)
        for d in difficulties:
            for problem in sample(task, "train", 10, seed=5, difficulty=d):
                texts += [problem.prompt, task.render_solution(problem)]
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def model(tok):
    return random_model(tiny_config(vocab_size=tok.vocab_size))


SUITES = eval_suites({"arithmetic": [2, 3], "countdown": [3]}, problems=3, seed=0)
CONFIG = EvalConfig(samples=3, max_new_tokens=8, temperature=1.0)


def test_evaluate_layout_ranges_and_reproducibility(model, tok):
    model.train()
    results = evaluate(model, tok, SUITES, CONFIG)
    assert model.training  # left as it was found
    assert set(results) == {"overall", "tasks", "samples", "config", "wall_s"}
    assert results["config"] == {**vars(CONFIG)}
    assert list(results["tasks"]) == ["arithmetic", "countdown"]
    assert list(results["tasks"]["arithmetic"]["difficulties"]) == ["2", "3"]
    keys = ["n", "pass@1", "pass@1_stderr", "pass@3", "maj@3", "pass@1_lenient", "greedy", "greedy_lenient",
            "format", "mean_tokens", "truncation"]
    rows = [results["overall"]] + [t for t in results["tasks"].values()] + [
        m for t in results["tasks"].values() for m in t["difficulties"].values()]
    for m in rows:
        assert list(m)[:len(keys)] == keys
        n = m["n"]
        for key, per_problem in (("pass@1", 3), ("pass@1_lenient", 3), ("format", 3), ("truncation", 3),
                                 ("pass@3", 1), ("maj@3", 1), ("greedy", 1), ("greedy_lenient", 1)):
            scored = m[key] * n * per_problem  # a rate over n problems x per_problem scored items
            assert 0 <= round(scored) <= n * per_problem and abs(scored - round(scored)) < 1e-6, key
        assert m["pass@3"] >= m["pass@1"] and m["pass@1_lenient"] >= m["pass@1"]
        assert 1 <= m["mean_tokens"] <= 8
    assert results["overall"]["n"] == sum(len(p) for _, _, p in SUITES)
    assert results["tasks"]["arithmetic"]["n"] == len(SUITES[0][2]) + len(SUITES[1][2])
    assert len(results["samples"]) == 2 * len(SUITES)
    assert set(results["samples"][0]) == {"task", "difficulty", "prompt", "expected", "completion", "correct",
                                         "correct_lenient"}
    table = format_table(results)
    assert "overall" in table and "pass@3" in table and "countdown" in table
    again = evaluate(model, tok, SUITES, CONFIG)
    assert {**results, "wall_s": 0} == {**again, "wall_s": 0}


def test_completions_do_not_depend_on_batching(model, tok):
    def tokens(batch_size: int) -> list:
        attempts = complete(model, tok, SUITES, EvalConfig(**{**vars(CONFIG), "batch_size": batch_size}))
        return [[([c.tokens for c in a.samples], a.greedy.tokens) for a in suite] for suite in attempts]

    small = tokens(3)  # one prompt's 3 samples per engine call
    assert small == tokens(512)
    assert any(len({tuple(t) for t in samples}) > 1 for suite in small for samples, _ in suite)  # samples differ


def test_eval_verb_writes_json(model, tok, tmp_path, capsys):
    model.save_pretrained(tmp_path)
    tok.save(tmp_path)
    cli.main(["eval", str(tmp_path), "--tasks", "arithmetic:2", "--problems", "2", "--samples", "2",
              "--max-new-tokens", "8", "--no-greedy"])
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["overall"]["n"] == 2 and "pass@2" in results["overall"] and "greedy" not in results["overall"]
    out = capsys.readouterr().out
    assert "overall" in out and f"wrote {tmp_path / 'eval.json'}" in out
    other = tmp_path / "sub" / "e.json"
    cli.eval(str(tmp_path), tasks="arithmetic:2", problems=2, samples=2, max_new_tokens=8, out=str(other))
    assert json.loads(other.read_text())["overall"]["greedy"] >= 0.0
