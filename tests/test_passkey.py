"""Passkey retrieval: the standard prompt, deterministic keys in 1..50000, the key line at the
asked depth of the filler, an exact-integer scorer, lengths fitted to a token budget, and the
length x depth evaluation (`nanoseek eval --task passkey --lengths ...`)."""

import json
import re
import shutil
from types import SimpleNamespace

import pytest
from conftest import random_model, tiny_config
from test_extend import fit_passkey_tokenizer

from nanoseek import cli
from nanoseek.data import get_task, sample
from nanoseek.data.passkey import (
    FILLER,
    INSTRUCTION,
    KEY_LINE,
    QUESTION,
    repetitions_for,
)
from nanoseek.eval import (
    PASSKEY_NEW_TOKENS,
    format_passkey_table,
    parse_depths,
    parse_lengths,
    passkey_eval,
)
from nanoseek.tokenizer import Tokenizer

passkey = get_task("passkey")


@pytest.fixture(scope="module")
def passkey_tok(tmp_path_factory):
    return fit_passkey_tokenizer(tmp_path_factory.mktemp("tok"))


def test_registered_and_deterministic_in_seed():
    assert passkey.name == "passkey"
    for seed in range(50):
        assert passkey.generate(seed, 3) == passkey.generate(seed, 3)
    # The key depends on the seed alone: one seed asks the same key at every length and depth.
    assert passkey.problem_at(10, 0, seed=7).answer == passkey.problem_at(400, 80, seed=7).answer
    assert len({passkey.generate(seed, 2).answer for seed in range(50)}) > 45


def test_keys_in_range_and_prompt_in_standard_form():
    keys = [int(passkey.generate(seed, 1).answer) for seed in range(2000)]
    assert min(keys) >= 1 and max(keys) <= 50000 and max(keys) - min(keys) > 40000
    problem = passkey.problem_at(4, 50, seed=1)
    key = problem.answer
    assert problem.prompt == "\n".join([INSTRUCTION, f"{FILLER} {FILLER}", KEY_LINE.format(key=key),
                                        f"{FILLER} {FILLER}", QUESTION])
    assert problem.prompt.startswith("There is an important info hidden inside a lot of irrelevant text.")
    assert problem.prompt.endswith("What is the pass key? The pass key is")
    assert f"The pass key is {key}. Remember it. {key} is the pass key." in problem.prompt


def test_difficulty_sets_length_and_the_seed_sets_depth():
    for difficulty in passkey.difficulties:
        problem = passkey.generate(11, difficulty)
        assert problem.prompt.count(FILLER) == problem.meta["repetitions"] == 2**difficulty
        assert problem.meta["difficulty"] == difficulty
    depths = {passkey.generate(seed, 5).meta["depth"] for seed in range(300)}
    assert min(depths) <= 5 and max(depths) >= 95 and depths <= set(range(101))


@pytest.mark.parametrize("depth", [0, 10, 25, 33, 50, 75, 90, 100])
def test_key_sits_at_the_asked_fraction_of_the_filler(depth):
    repetitions = 200
    problem = passkey.problem_at(repetitions, depth, seed=3)
    key_line = KEY_LINE.format(key=problem.answer)
    before, after = problem.prompt.split(key_line)
    assert before.count(FILLER) + after.count(FILLER) == repetitions
    assert before.count(FILLER) / repetitions == pytest.approx(depth / 100, abs=0.5 / repetitions)
    # Depth 0 and 100 are the ends: right after the instruction, right before the question.
    if depth == 0:
        assert before == INSTRUCTION + "\n"
    if depth == 100:
        assert after == "\n" + QUESTION


def test_scorer_accepts_only_the_key():
    problem = passkey.problem_at(8, 40, seed=5)
    key = problem.answer
    assert passkey.check_answer(problem, key) and passkey.check_answer(problem, f" {key}\n")
    for wrong in (str(int(key) + 1), f"{key}0", f"{key}.5", f"-{key}", "", "the key", "9" * 10_000,
                  f"{key} {key}"):
        assert not passkey.check_answer(problem, wrong)
    # Through the task interface: the trace, the R1 format, and the lenient last-number fallback.
    assert passkey.verify(problem, passkey.render_solution(problem), strict=True)
    assert passkey.verify(problem, f" {key}.")
    assert not passkey.verify(problem, f" {int(key) - 1}.")


def test_splits_and_repetitions_for_a_token_budget():
    assert len(list(sample(passkey, "eval", 5, seed=0, difficulty=2))) == 5
    words = lambda text: len(text.split())  # any token counter will do
    for length in (100, 500, 4000):
        repetitions = repetitions_for(length, words)
        longest = passkey.problem_at(repetitions, 50, seed=0).prompt + " 50000"
        assert words(longest) <= length < words(longest) + words(FILLER) + 1
    assert repetitions_for(1, words) == 1


def test_repetitions_for_a_bpe_tokenizer_are_the_most_that_fit(passkey_tok):
    """A BPE merges across sentences, so tokens per repetition are not constant: the fit is searched."""
    tok = Tokenizer.load(passkey_tok)
    count = lambda text: len(tok.encode(text)) + 1  # with BOS
    for length in (300, 993, 2000):
        repetitions = repetitions_for(length, count)
        longest = [passkey.problem_at(r, 50, seed=0).prompt for r in (repetitions, repetitions + 1)]
        answer = passkey.problem_at(1, 50, seed=0).answer
        fits = [count(p.replace(answer, "50000") + " 50000") <= length for p in longest]
        assert fits == [True, False]


# --- the length x depth evaluation -----------------------------------------------------------


class FirstHalfOracle:
    """An engine stand-in that reads the prompt and answers the key only when it sits in the first
    half of the prompt, so the expected grid is known: right at depths < 50, wrong after."""

    def __init__(self, tokenizer):
        self.tokenizer, self.model = tokenizer, None

    def generate(self, prompts, params, n):
        completions = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            key = re.search(r"The pass key is ([0-9]+)\. Remember", text)
            right = key.start() < len(text) / 2
            completions.append([SimpleNamespace(text=f" {key.group(1) if right else 7}. The pass key is {key.group(1)}")])
        return completions


def test_lengths_and_depths_parse():
    assert parse_lengths("1k, 2K,4096") == [1024, 2048, 4096]
    assert parse_depths("0,25,50.5,100") == [0, 25, 50.5, 100]
    for bad in ("", "1m", "0", "-1k"):
        with pytest.raises(ValueError):
            parse_lengths(bad)
    for bad in ("", "101", "a"):
        with pytest.raises(ValueError):
            parse_depths(bad)


def test_grid_scores_each_cell_by_the_first_number(passkey_tok):
    tok = Tokenizer.load(passkey_tok)
    model = random_model(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=1024))
    results = passkey_eval(model, tok, [300, 1000], [0, 25, 75, 100], problems=3, engine=FirstHalfOracle(tok))
    assert results["accuracy"] == {n: {"0": 1.0, "25": 1.0, "75": 0.0, "100": 0.0} for n in ("300", "1000")}
    slack = PASSKEY_NEW_TOKENS + 2 * len(tok.encode(" " + FILLER)) + len(tok.encode(" 50000"))
    for length in (300, 1000):  # prompts fill the length within a repetition, leaving room for the answer
        assert length - slack < results["prompt_tokens"][str(length)] <= length - PASSKEY_NEW_TOKENS + 2
    table = format_passkey_table(results)
    assert "100.0" in table and table.splitlines()[-1].split() == ["all", "50.0", "50.0"]
    with pytest.raises(ValueError, match="context"):
        passkey_eval(model, tok, [2048], [50], problems=1)


def test_eval_verb_writes_table_json_and_heatmap(passkey_tok, tmp_path, capsys):
    tok = Tokenizer.load(passkey_tok)
    random_model(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=512)).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(passkey_tok / name, tmp_path / name)
    cli.main(["eval", str(tmp_path), "--task", "passkey", "--lengths", "256,512", "--depths", "0,50,100",
              "--problems", "2"])
    results = json.loads((tmp_path / "passkey.json").read_text())
    assert set(results["accuracy"]) == {"256", "512"} and set(results["accuracy"]["256"]) == {"0", "50", "100"}
    assert (tmp_path / "passkey.png").read_bytes()[:4] == b"\x89PNG"
    assert "depth \\ length" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["eval", str(tmp_path), "--lengths", "1k"])  # the grid is passkey's only
