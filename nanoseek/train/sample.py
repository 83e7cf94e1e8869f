"""Rejection sampling (DeepSeek-R1 §2.3.3): SFT data from a model's own correct answers.

R1's third stage samples several responses per prompt from the RL checkpoint, keeps only the
correct ones, and filters out mixed languages, long paragraphs and code blocks; the survivors are
the reasoning half of the next SFT round. Here: k samples per train-split problem through the
engine (eval's `complete`: the R1 chat template, a seeded generator per problem), each checked by
`rejection_reason`; what survives is written as `nanoseek sft` conversations, with stats.json
saying how much was kept and why the rest was not. The chat template is fixed: a sample is only
a valid SFT target for the very prompt it was generated from, and SFT data is in the chat format.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.data import tasks_at
from nanoseek.data.task import Problem, Task
from nanoseek.data.task import sample as draw
from nanoseek.eval import EvalConfig, Suite, complete
from nanoseek.infer.engine import Engine
from nanoseek.model.checkpoint import load
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import Conversation, Tokenizer
from nanoseek.train import rewards
from nanoseek.train.state import atomic_write_text
from nanoseek.train.config import TrainConfigError, load_config, to_dict
from nanoseek.train.pretrain import resolve_device
from nanoseek.train.rewards import Rollout
from nanoseek.train.sft import write_conversations

# Every reason a sample is dropped, in the order `rejection_reason` checks them; "over_cap" is
# decided per prompt afterwards (`filter_prompt`).
REASONS = ("truncated", "format", "wrong", "repetitive", "duplicate", "over_cap")
# Prompts with no accepted sample shown in stats.json.
EXAMPLES_WITHOUT_SAMPLE = 5
# Repetitive: more than MAX_REPEATED of a completion's word n-grams (n = REPETITION_NGRAM) are
# repeats. The reference traces of the built-in tasks stay under 0.23 at n = 4 (arithmetic 1-10,
# countdown 3-6); a sample stuck in a loop approaches 1.
REPETITION_NGRAM = 4
MAX_REPEATED = 0.5


@dataclass
class SampleConfig:
    """k samples per train-split problem of `tasks` from the model folder `model`; the accepted ones
    go to out_dir/samples.jsonl (default MODEL/samples/) and the counts to out_dir/stats.json."""

    model: str = ""
    out_dir: str = ""
    tasks: dict[str, list[int]] = field(default_factory=lambda: {"arithmetic": [2, 3]})
    problems: int = 64  # per task difficulty, train split; repeats are drawn once
    samples: int = 8  # k per problem
    temperature: float = 0.6  # R1's evaluation sampling (docs/facts.md §11)
    top_p: float = 0.95
    max_new_tokens: int = 256
    seed: int = 0
    keep_per_prompt: int | None = None  # keep only the N shortest correct samples of a prompt
    repetition_ngram: int = REPETITION_NGRAM
    max_repeated: float = MAX_REPEATED
    batch_size: int = 512  # most sequences in one engine batch
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("problems", "repetition_ngram"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"'{name}' = {getattr(self, name)}: must be >= 1")
        if self.keep_per_prompt is not None and self.keep_per_prompt < 1:
            raise TrainConfigError(f"'keep_per_prompt' = {self.keep_per_prompt}: must be >= 1, or null for no cap")
        if not 0 <= self.max_repeated < 1:
            raise TrainConfigError(f"'max_repeated' = {self.max_repeated}: must be in [0, 1)")
        self.eval_config()  # bad sampling settings fail now, not after the model has loaded

    def eval_config(self) -> EvalConfig:
        """The settings `complete` generates with: k seeded samples per problem, no greedy decode."""
        return EvalConfig(samples=self.samples, temperature=self.temperature, top_p=self.top_p,
                          max_new_tokens=self.max_new_tokens, greedy=False, seed=self.seed, template="chat",
                          batch_size=self.batch_size)


# ---- the filter ----------------------------------------------------------------------------------
def rejection_reason(rollout: Rollout, seen: Container[str], ngram_size: int = REPETITION_NGRAM,
                     max_repeated: float = MAX_REPEATED) -> str | None:
    """Why this sample is dropped, or None to keep it: the first of REASONS[:-1] that applies.

    truncated: the model never stopped, and an SFT target ends in EOS, so it would be taught to stop
    where it did not (even if the text happens to end at </answer>). format: the whole completion is
    not in the strict R1 format. wrong: the strict answer fails the task's verifier (eval's strict
    correctness). repetitive: more than max_repeated of its word n-grams are repeats (`rewards.repetition`).
    duplicate: its text is in `seen`, the texts already kept for this prompt.
    """
    if rollout.truncated:
        return "truncated"
    if not rewards.format(rollout):
        return "format"
    if not rewards.accuracy(rollout, strict=True):
        return "wrong"
    if -rewards.repetition(rollout, ngram_size) > max_repeated:
        return "repetitive"
    if rollout.text in seen:
        return "duplicate"
    return None


def filter_prompt(rollouts: Sequence[Rollout], keep_per_prompt: int | None = None,
                  ngram_size: int = REPETITION_NGRAM, max_repeated: float = MAX_REPEATED) -> list[str | None]:
    """The rejection reason of each of one prompt's samples (None: accepted). With keep_per_prompt,
    only the N shortest accepted samples (in tokens; the earlier sample on a tie) stay, the rest
    become "over_cap", so the kept data leans towards concise reasoning and no prompt dominates it."""
    seen: set[str] = set()
    reasons: list[str | None] = []
    for rollout in rollouts:
        reason = rejection_reason(rollout, seen, ngram_size, max_repeated)
        if reason is None:
            seen.add(rollout.text)
        reasons.append(reason)
    if keep_per_prompt is not None:
        accepted = sorted((i for i, r in enumerate(reasons) if r is None), key=lambda i: rollouts[i].num_tokens)
        for i in accepted[keep_per_prompt:]:
            reasons[i] = "over_cap"
    return reasons


# ---- sampling ------------------------------------------------------------------------------------
def train_suites(tasks: dict[str, list[int]], problems: int, seed: int) -> list[tuple[Task, int, list[Problem]]]:
    """`problems` train-split problems per task and difficulty, deterministic in `seed`, each drawn
    once: a prompt's k samples are what the duplicate check and the per-prompt cap compare."""
    return [(task, difficulty, list(dict.fromkeys(draw(task, "train", problems, seed, difficulty))))
            for task in tasks_at(tasks) for difficulty in task.difficulties]


def tally(reasons: Sequence[str | None]) -> dict[str, Any]:
    """samples, accepted, acceptance (a fraction; 0 with no samples) and a count per rejection reason."""
    counts = Counter(reasons)
    accepted = counts.pop(None, 0)
    return {"samples": len(reasons), "accepted": accepted,
            "acceptance": accepted / len(reasons) if reasons else 0.0,
            "rejected": {reason: counts[reason] for reason in REASONS}}


def rejection_sample(model: Transformer, tokenizer: Tokenizer, suites: Sequence[Suite], config: SampleConfig,
                     engine: Engine | None = None) -> tuple[list[Conversation], dict[str, Any]]:
    """Sample, filter and count. Returns the accepted samples as SFT conversations (problem order,
    then sample order) and the stats:

        {**TALLY, "prompts", "prompts_without_sample", "examples_without_sample": [{"task",
         "difficulty", "prompt", "answer", "completion", "reason"}, ...] (first sample of the first few),
         "tasks": {task: {**TALLY, "difficulties": {str(difficulty): TALLY}}}, "config", "wall_s"}

    with TALLY = `tally`: samples, accepted, acceptance, rejected {reason: count}.
    """
    started = time.perf_counter()
    attempts = complete(model, tokenizer, suites, config.eval_config(), engine)
    conversations: list[Conversation] = []
    by_task: dict[str, dict[str, list[str | None]]] = {}
    prompts, without = 0, []
    for (task, difficulty, problems), suite_attempts in zip(suites, attempts):
        suite_reasons = by_task.setdefault(task.name, {}).setdefault(str(difficulty), [])
        for problem, attempt in zip(problems, suite_attempts):
            rollouts = [Rollout.of(task, problem, c, config.max_new_tokens) for c in attempt.samples]
            reasons = filter_prompt(rollouts, config.keep_per_prompt, config.repetition_ngram, config.max_repeated)
            # The prompt turn is the task's own, so the conversation renders to exactly the prompt sampled from.
            conversations += [[*task.conversation(problem)[:-1], {"role": "assistant", "content": r.text}]
                              for r, reason in zip(rollouts, reasons) if reason is None]
            suite_reasons += reasons
            prompts += 1
            if None not in reasons:
                without.append({"task": task.name, "difficulty": difficulty, "prompt": problem.prompt,
                                "answer": problem.answer, "completion": rollouts[0].text, "reason": reasons[0]})
    every = [r for levels in by_task.values() for reasons in levels.values() for r in reasons]
    stats = {**tally(every), "prompts": prompts, "prompts_without_sample": len(without),
             "examples_without_sample": without[:EXAMPLES_WITHOUT_SAMPLE],
             "tasks": {name: {**tally([r for reasons in levels.values() for r in reasons]),
                              "difficulties": {level: tally(reasons) for level, reasons in levels.items()}}
                       for name, levels in by_task.items()},
             "config": to_dict(config), "wall_s": time.perf_counter() - started}
    return conversations, stats


def format_table(stats: dict[str, Any]) -> str:
    """A row per task and difficulty, one per task ("all") and an overall row: samples, accepted,
    acceptance in %, then the count of each rejection reason."""
    short = {"truncated": "trunc", "format": "format", "wrong": "wrong", "repetitive": "repeat",
             "duplicate": "dup", "over_cap": "cap"}
    header = f"{'task':<12} {'diff':>4} {'samples':>7} {'kept':>6} {'kept%':>6} " + " ".join(
        f"{short[r]:>6}" for r in REASONS)

    def row(name: str, level: str, t: dict[str, Any]) -> str:
        return (f"{name:<12} {level:>4} {t['samples']:>7} {t['accepted']:>6} {100 * t['acceptance']:6.1f} "
                + " ".join(f"{t['rejected'][r]:>6}" for r in REASONS))

    lines = [header, "-" * len(header)]
    for name, task in stats["tasks"].items():
        lines += [row(name, level, t) for level, t in task["difficulties"].items()]
        lines.append(row(name, "all", task))
    lines += ["-" * len(header), row("overall", "", stats),
              f"{stats['prompts_without_sample']} of {stats['prompts']} prompts have no accepted sample"]
    return "\n".join(lines)


def sample(config: SampleConfig) -> Path:
    """Rejection-sample `config.model` and write out_dir/samples.jsonl (the `nanoseek sft` format)
    and out_dir/stats.json; returns the JSONL path. Each file appears whole or not at all, and
    stats.json is written last, so its presence means the run finished."""
    if not config.model:
        raise TrainConfigError("'model' is empty: rejection sampling needs the model folder to sample from")
    out_dir = Path(config.out_dir or Path(config.model) / "samples")
    suites = train_suites(config.tasks, config.problems, config.seed)
    model = load(config.model, device=resolve_device(config.device))
    conversations, stats = rejection_sample(model, Tokenizer.load(config.model), suites, config)
    print(format_table(stats))
    path = out_dir / "samples.jsonl"
    write_conversations(path, conversations)
    atomic_write_text(out_dir / "stats.json", json.dumps(stats, indent=1))
    print(f"wrote {stats['accepted']} conversations to {path}")
    return path


def load_sample_config(path: str | None, overrides: list[str] | None = None) -> SampleConfig:
    return load_config(SampleConfig, path, overrides)
