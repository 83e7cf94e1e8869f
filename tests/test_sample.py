"""Rejection sampling: each rejection reason on crafted samples, the reference traces never rejected,
the shortest-N cap, the config's errors, and `nanoseek sample` end to end on a tiny model fit to a few
train-split problems (so some samples pass and some do not)."""

import json

import pytest
import torch

from conftest import random_model, tiny_config
from nanoseek import cli
from nanoseek.data import get_task, is_eval_problem, sample
from nanoseek.tokenizer import train_tokenizer
from nanoseek.train.config import TrainConfigError
from nanoseek.train.rewards import Rollout
from nanoseek.train.sample import (
    REASONS,
    SampleConfig,
    filter_prompt,
    load_sample_config,
    rejection_reason,
    train_suites,
)
from nanoseek.train.sft import ConversationLoader, read_conversations, tokenize

ARITHMETIC = get_task("arithmetic")
PROBLEM = next(sample(ARITHMETIC, "train", 1, seed=0, difficulty=2))


def _rollout(text: str, tokens: int = 10, truncated: bool = False) -> Rollout:
    return Rollout(ARITHMETIC, PROBLEM, text, num_tokens=tokens, truncated=truncated, max_tokens=64)


def _formatted(think: str, answer: str) -> str:
    return f"<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"


RIGHT = ARITHMETIC.render_solution(PROBLEM)
WRONG_ANSWER = str(int(PROBLEM.answer) + 1)


@pytest.mark.parametrize("rollout,seen,reason", [
    (_rollout(RIGHT), set(), None),
    (_rollout(RIGHT, truncated=True), set(), "truncated"),  # ends at </answer>, but never stopped
    (_rollout(_formatted("no idea", WRONG_ANSWER), truncated=True), set(), "truncated"),  # first reason wins
    (_rollout(f"the answer is {PROBLEM.answer}"), set(), "format"),  # right, but only leniently
    (_rollout(f"<answer>\n{PROBLEM.answer}\n</answer>"), set(), "format"),
    (_rollout(RIGHT + "\nmore"), set(), "format"),  # trailing text after the strict format
    (_rollout(_formatted("guessing", WRONG_ANSWER)), set(), "wrong"),
    (_rollout(_formatted("1+1+0=2 c0 " * 40, PROBLEM.answer)), set(), "repetitive"),
    (_rollout(RIGHT), {RIGHT}, "duplicate"),
    (_rollout(_formatted("guessing", WRONG_ANSWER)), {_formatted("guessing", WRONG_ANSWER)}, "wrong"),
])
def test_rejection_reason_on_crafted_samples(rollout, seen, reason):
    assert rejection_reason(rollout, seen) == reason


def test_repetition_threshold_is_configurable():
    looping = _rollout(_formatted("1+1+0=2 c0 " * 40, PROBLEM.answer))
    assert rejection_reason(looping, set(), max_repeated=0.99) is None
    assert rejection_reason(_rollout(RIGHT), set(), max_repeated=0.0) is None  # no 4-gram of it repeats


@pytest.mark.parametrize("name", ["arithmetic", "countdown"])
def test_reference_traces_are_accepted(name):
    """The task's own worked solutions are what a good sample looks like: none may be filtered out."""
    task = get_task(name)
    for difficulty in task.difficulties:
        for problem in dict.fromkeys(sample(task, "train", 100, seed=3, difficulty=difficulty)):
            rollout = Rollout(task, problem, task.render_solution(problem), 50, False, 64)
            assert rejection_reason(rollout, set()) is None, (name, difficulty, rollout.text)


def test_filter_prompt_drops_duplicates_and_keeps_the_shortest():
    other = ARITHMETIC.render_solution(PROBLEM).replace("<think>\n", "<think>\nadd digit by digit\n")
    third = ARITHMETIC.render_solution(PROBLEM).replace("<think>\n", "<think>\ncarry as needed\n")
    rollouts = [_rollout(RIGHT, tokens=30), _rollout(RIGHT, tokens=30), _rollout(other, tokens=20),
                _rollout(_formatted("hm", WRONG_ANSWER), tokens=5), _rollout(third, tokens=20),
                _rollout(f"it is {PROBLEM.answer}", tokens=64, truncated=True)]
    assert filter_prompt(rollouts) == [None, "duplicate", None, "wrong", None, "truncated"]
    # the two shortest accepted (20 and 20 tokens) stay; the 30-token one goes over the cap
    assert filter_prompt(rollouts, keep_per_prompt=2) == ["over_cap", "duplicate", None, "wrong", None, "truncated"]
    # a tie in length keeps the earlier sample
    assert filter_prompt(rollouts, keep_per_prompt=1) == ["over_cap", "duplicate", None, "wrong", "over_cap",
                                                          "truncated"]
    assert filter_prompt(rollouts, keep_per_prompt=5) == filter_prompt(rollouts)


def test_config_errors_name_the_key():
    config = load_sample_config(None, ["keep_per_prompt=2", "tasks={countdown: [3]}", "samples=4"])
    assert (config.keep_per_prompt, config.tasks, config.samples) == (2, {"countdown": [3]}, 4)
    assert SampleConfig().keep_per_prompt is None
    with pytest.raises(TrainConfigError, match="'keep_per_promt'.*keep_per_prompt"):
        load_sample_config(None, ["keep_per_promt=2"])
    with pytest.raises(TrainConfigError, match="keep_per_prompt"):
        SampleConfig(keep_per_prompt=0)
    with pytest.raises(TrainConfigError, match="max_repeated"):
        SampleConfig(max_repeated=1.0)
    with pytest.raises(ValueError, match="samples"):
        SampleConfig(samples=0)


def test_train_suites_are_train_split_and_distinct():
    suites = train_suites({"arithmetic": [1, 6], "countdown": [3]}, problems=40, seed=0)
    assert [(t.name, d) for t, d, _ in suites] == [("arithmetic", 1), ("arithmetic", 6), ("countdown", 3)]
    assert all(not is_eval_problem(p) and p.meta["difficulty"] == d for _, d, problems in suites for p in problems)
    assert all(len(set(problems)) == len(problems) for _, _, problems in suites)
    assert len(suites[0][2]) < 40 == len(suites[1][2])  # 1-digit sums: a small space, drawn once each
    with pytest.raises(ValueError, match="arithmetic"):
        train_suites({"arithmetic": [11]}, problems=1, seed=0)


# ---- end to end ---------------------------------------------------------------------------------
TASKS = {"arithmetic": [1, 2]}
SEED = 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, one_thread):
    """A tiny random model fit for a few steps to the difficulty-1 problems the run will draw: those
    samples pass (and repeat each other), the unseen difficulty-2 ones mostly fail."""
    (task, _, memorised), (_, _, unseen) = train_suites(TASKS, problems=2, seed=SEED)
    conversations = [task.conversation(p) for p in memorised + unseen]
    tok = train_tokenizer([m["content"] for c in conversations for m in c], vocab_size=300)
    examples = tokenize(tok, [task.conversation(p) for p in memorised], max_len=128)
    model = random_model(tiny_config(vocab_size=tok.vocab_size)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    inputs, labels = ConversationLoader(examples, len(examples), tok.pad_id).batch(0)
    for _ in range(150):
        optimizer.zero_grad()
        model.compute_loss(inputs, labels)["ce"].backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("sample") / "model"
    model.save_pretrained(path)
    tok.save(path)
    return path


def test_sample_verb_writes_sft_data_and_stats_that_add_up(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    cli.main(["sample", str(model_dir), "tasks={arithmetic: [1, 2]}", "problems=2", "samples=4",
              "max_new_tokens=40", f"seed={SEED}", "--out", str(out)])
    assert "overall" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["samples.jsonl", "stats.json"]  # no partial files left
    stats = json.loads((out / "stats.json").read_text())
    conversations = read_conversations(out / "samples.jsonl")
    suites = train_suites(TASKS, problems=2, seed=SEED)
    prompts = sum(len(problems) for _, _, problems in suites)
    assert stats["prompts"] == prompts and stats["samples"] == 4 * prompts
    assert stats["accepted"] == len(conversations) > 0
    for tally in [stats, *stats["tasks"].values(), *stats["tasks"]["arithmetic"]["difficulties"].values()]:
        assert list(tally["rejected"]) == list(REASONS)
        assert tally["accepted"] + sum(tally["rejected"].values()) == tally["samples"]
        assert tally["acceptance"] == pytest.approx(tally["accepted"] / tally["samples"])
    levels = stats["tasks"]["arithmetic"]["difficulties"]
    assert sum(t["samples"] for t in levels.values()) == stats["samples"]
    assert levels["1"]["accepted"] > 0 and levels["1"]["rejected"]["duplicate"] > 0  # the fit answers repeat
    assert stats["prompts_without_sample"] == len(stats["examples_without_sample"]) <= prompts
    assert stats["config"]["model"] == str(model_dir)
    by_prompt = {p.prompt: p for _, _, problems in suites for p in problems}
    for user, assistant in conversations:
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert ARITHMETIC.verify(by_prompt[user["content"]], assistant["content"], strict=True)
    assert len({(u["content"], a["content"]) for u, a in conversations}) == len(conversations)  # no duplicates
