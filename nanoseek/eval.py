"""Evaluation on held-out problems with R1's protocol (docs/facts.md §11), for the CLI, the pipeline and
GRPO's periodic eval.

k samples per problem at T = 0.6, top-p 0.95 give pass@1 (the mean correctness of the k samples: R1
prefers it to greedy decoding, whose long traces repeat themselves and vary from checkpoint to
checkpoint), the unbiased pass@k and maj@k; one greedy decode per problem is reported beside them.
Strict extraction (the whole completion in the R1 format) and lenient extraction (an answer anywhere)
are reported side by side.

The work is split so that each piece can be checked alone: `complete` generates, `score` turns one
problem's completions into a `ProblemOutcome`, and the pure `summarise` aggregates outcomes.
"""

from __future__ import annotations

import hashlib
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from nanoseek.data import get_task, sample
from nanoseek.data.passkey import repetitions_for
from nanoseek.data.task import TEMPLATES, Problem, Task, Template, extract_answer, format_reward, prompt_ids
from nanoseek.infer.engine import Completion, Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import Tokenizer

# What `evaluate` takes: (task, difficulty, problems) per row of the results table.
Suite = tuple[Task, int, Sequence[Problem]]
# Example records kept in the results per (task, difficulty).
EXAMPLES_PER_SUITE = 2


@dataclass
class EvalConfig:
    samples: int = 8  # k: samples per problem
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 256
    greedy: bool = True  # also one greedy decode per problem
    seed: int = 0
    template: Template = "chat"
    batch_size: int = 512  # most sequences in one engine batch

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, not {self.template!r}")
        # Bad sampling settings fail now, not after a model has been loaded.
        SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p)


@dataclass(frozen=True)
class SampleOutcome:
    strict: bool  # correct, and the whole completion is in the strict format
    lenient: bool  # correct answer found by lenient extraction
    format: bool
    tokens: int  # generated tokens, a terminating EOS included
    truncated: bool  # stopped by max_new_tokens (or a full context), not by EOS


@dataclass(frozen=True)
class ProblemOutcome:
    samples: list[SampleOutcome]
    majority: bool  # the plurality answer of the samples is correct
    greedy: SampleOutcome | None = None


@dataclass
class Attempt:
    """One problem's completions: the k samples and, if asked, the greedy decode."""

    samples: list[Completion]
    greedy: Completion | None


# ---- the math ------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, §2.1):
    1 - C(n-c, k) / C(n, k), in the product form 1 - prod_{j=n-c+1..n} (1 - k/j), which never
    forms the huge binomials."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return 1.0 - math.prod(1.0 - k / j for j in range(n - c + 1, n + 1))


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The plurality answer, or None when no sample gave one.

    Answers are grouped by their text with all whitespace removed ("1 + 2" and "1+2" are one vote
    each for the same answer); the group's first answer as written represents it. Missing and empty
    answers do not vote. Tie rule: of the groups with the most votes, the one voted for first wins.
    """
    groups: dict[str, list[str]] = {}
    for answer in answers:
        key = "".join(answer.split()) if answer is not None else ""
        if key:
            groups.setdefault(key, []).append(answer)
    if not groups:
        return None
    # max() returns the first maximal item, and dicts iterate in insertion order: the tie rule.
    return max(groups.values(), key=len)[0]


def summarise(outcomes: Sequence[ProblemOutcome], k: int) -> dict[str, float]:
    """Metrics over problems, each weighted once (see `evaluate` for the keys). pass@1 is the mean over
    problems of the fraction of its samples that are strictly correct; its standard error is the
    sample standard deviation of those fractions over sqrt(n)."""
    if not outcomes:
        raise ValueError("no problems to summarise")
    n = len(outcomes)
    fractions = [statistics.fmean(s.strict for s in o.samples) for o in outcomes]
    samples = [s for o in outcomes for s in o.samples]
    metrics: dict[str, float] = {
        "n": n,
        "pass@1": statistics.fmean(fractions),
        "pass@1_stderr": statistics.stdev(fractions) / math.sqrt(n) if n >= 2 else 0.0,
        f"pass@{k}": statistics.fmean(pass_at_k(len(o.samples), sum(s.strict for s in o.samples), k)
                                      for o in outcomes),
        f"maj@{k}": statistics.fmean(o.majority for o in outcomes),
        "pass@1_lenient": statistics.fmean(statistics.fmean(s.lenient for s in o.samples) for o in outcomes),
    }
    if all(o.greedy is not None for o in outcomes):
        metrics["greedy"] = statistics.fmean(o.greedy.strict for o in outcomes)
        metrics["greedy_lenient"] = statistics.fmean(o.greedy.lenient for o in outcomes)
    metrics["format"] = statistics.fmean(s.format for s in samples)
    metrics["mean_tokens"] = statistics.fmean(s.tokens for s in samples)
    metrics["truncation"] = statistics.fmean(s.truncated for s in samples)
    return metrics


# ---- scoring -------------------------------------------------------------------------------------
def score_sample(task: Task, problem: Problem, completion: Completion) -> SampleOutcome:
    text = completion.text or ""
    return SampleOutcome(strict=task.verify(problem, text, strict=True),
                         lenient=task.verify(problem, text, strict=False), format=bool(format_reward(text)), tokens=len(completion.tokens),
                         truncated=completion.finish_reason == "length")


def score(task: Task, problem: Problem, attempt: Attempt) -> ProblemOutcome:
    """The outcome of each sample, and whether the samples' majority answer (lenient extraction,
    the task's own check) is right."""
    answers = [extract_answer(c.text or "", strict=False, pattern=task.answer_pattern) for c in attempt.samples]
    voted = majority_vote(answers)
    return ProblemOutcome(samples=[score_sample(task, problem, c) for c in attempt.samples],
                          majority=voted is not None and task.check_answer(problem, voted),
                          greedy=None if attempt.greedy is None else score_sample(task, problem, attempt.greedy))


# ---- generation ----------------------------------------------------------------------------------
def prompt_seed(seed: int, task: str, difficulty: int, index: int) -> int:
    """The sampling seed of one problem: a hash, so it is the same in every process (unlike hash())
    and does not depend on which other problems are evaluated or how they are batched."""
    digest = hashlib.sha256(f"eval:{seed}:{task}:{difficulty}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _generate(engine: Engine, prompts: list[list[int]], params: list[SamplingParams], n: int,
              batch_size: int) -> list[list[Completion]]:
    """Completions [prompt][sample], at most batch_size rows per engine call; prompts go in order of
    length so a batch pads little. A prompt's n samples always share a batch (one prefill), even
    when n alone exceeds batch_size."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    per_batch = max(1, batch_size // n)
    completions: list[list[Completion]] = [[] for _ in prompts]
    for start in range(0, len(order), per_batch):
        chunk = order[start:start + per_batch]
        outputs = engine.generate([prompts[i] for i in chunk], [params[i] for i in chunk], n)
        for i, output in zip(chunk, outputs):
            completions[i] = output
    return completions


def complete(model: Transformer, tokenizer: Tokenizer, suites: Sequence[Suite], config: EvalConfig,
             engine: Engine | None = None) -> list[list[Attempt]]:
    """Generate every problem's attempt, [suite][problem]. Each problem samples from its own seed
    (`prompt_seed`), so the completions repeat across runs and batch sizes. The model is put in eval
    mode for the call and left as it was found (GRPO evaluates mid-training)."""
    engine = engine or Engine(model, eos_token_ids=[tokenizer.eos_id], decode=tokenizer.decode)
    if engine.model is not model:
        raise ValueError("the engine must wrap the model being evaluated")
    if engine.decode is None:
        raise ValueError("the engine needs a `decode` function: answers are read from the completion text")
    jobs = [(task, difficulty, i, problem)
            for task, difficulty, problems in suites for i, problem in enumerate(problems)]
    prompts = [prompt_ids(tokenizer, task, problem, config.template) for task, _, _, problem in jobs]
    sampled = [SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                              top_p=config.top_p, seed=prompt_seed(config.seed, task.name, difficulty, i))
               for task, difficulty, i, _ in jobs]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            samples = _generate(engine, prompts, sampled, config.samples, config.batch_size)
            greedy: list[Completion | None] = [None] * len(jobs)
            if config.greedy:
                params = [SamplingParams(max_new_tokens=config.max_new_tokens)] * len(jobs)
                greedy = [g for (g,) in _generate(engine, prompts, params, 1, config.batch_size)]
    finally:
        model.train(was_training)
    attempts = iter(Attempt(s, g) for s, g in zip(samples, greedy))
    return [[next(attempts) for _ in problems] for _, _, problems in suites]


def evaluate(model: Transformer, tokenizer: Tokenizer, suites: Sequence[Suite], config: EvalConfig,
             engine: Engine | None = None) -> dict[str, Any]:
    """Generate, score and summarise. Returns

        {"overall": METRICS,
         "tasks": {task: {**METRICS, "difficulties": {str(difficulty): METRICS}}},
         "samples": [{"task", "difficulty", "prompt", "expected", "completion", "correct", "correct_lenient"}, ...],
         "config": asdict(config), "wall_s": seconds}

    where METRICS (`summarise`) = n (distinct problems), pass@1, pass@1_stderr, pass@k, maj@k,
    pass@1_lenient, greedy and greedy_lenient (if config.greedy), format, mean_tokens, truncation, with
    k = config.samples; all but n and mean_tokens are fractions. A task's and the overall metrics pool
    their problems, each weighted once. "samples" holds the first sample of the first two problems
    of each (task, difficulty), with its strict correctness.
    """
    started = time.perf_counter()
    keys = [(task.name, difficulty) for task, difficulty, _ in suites]
    if not suites or len(set(keys)) != len(keys):
        raise ValueError(f"need one or more distinct (task, difficulty) suites, got {keys}")
    if any(not problems for _, _, problems in suites):
        raise ValueError(f"a suite has no problems: {[k for k, (_, _, p) in zip(keys, suites) if not p]}")
    attempts = complete(model, tokenizer, suites, config, engine)
    k = config.samples
    by_task: dict[str, dict[str, list[ProblemOutcome]]] = {}
    examples = []
    for (task, difficulty, problems), suite_attempts in zip(suites, attempts):
        outcomes = [score(task, p, a) for p, a in zip(problems, suite_attempts)]
        by_task.setdefault(task.name, {})[str(difficulty)] = outcomes
        examples += [{"task": task.name, "difficulty": difficulty, "prompt": p.prompt, "expected": p.answer,
                      "completion": a.samples[0].text, "correct": o.samples[0].strict,
                      "correct_lenient": o.samples[0].lenient}
                     for p, a, o in list(zip(problems, suite_attempts, outcomes))[:EXAMPLES_PER_SUITE]]
    tasks = {name: {**summarise([o for outcomes in levels.values() for o in outcomes], k),
                    "difficulties": {level: summarise(outcomes, k) for level, outcomes in levels.items()}}
             for name, levels in by_task.items()}
    every = [o for levels in by_task.values() for outcomes in levels.values() for o in outcomes]
    return {"overall": summarise(every, k), "tasks": tasks, "samples": examples, "config": asdict(config),
            "wall_s": time.perf_counter() - started}


# ---- choosing problems and showing results -------------------------------------------------------
def parse_tasks(spec: str) -> dict[str, list[int]]:
    """Read "name:d1,d2;name2:d3" as {name: [d1, d2], name2: [d3]}; a bare name means all its difficulties."""
    tasks: dict[str, list[int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, levels = (s.strip() for s in part.partition(":"))
        try:
            task = get_task(name)
        except KeyError as error:
            raise ValueError(error.args[0]) from None
        if not levels:
            tasks[name] = list(task.difficulties)
            continue
        try:
            difficulties = [int(d) for d in levels.split(",")]
        except ValueError:
            raise ValueError(f"{part!r}: difficulties must be comma-separated integers, e.g. {name}:2,3") from None
        bad = [d for d in difficulties if d not in task.difficulties]
        if bad:
            valid = task.difficulties
            raise ValueError(f"{name}: difficulty {bad[0]} not in {valid.start}..{valid.stop - 1}")
        tasks[name] = list(dict.fromkeys(tasks.get(name, []) + difficulties))
    if not tasks:
        raise ValueError(f"no tasks in {spec!r}; expected e.g. 'arithmetic:2,3;countdown:3'")
    return tasks


def eval_suites(tasks: dict[str, list[int]], problems: int, seed: int) -> list[tuple[Task, int, list[Problem]]]:
    """`problems` held-out (eval-split) problems per task and difficulty, deterministic in `seed`."""
    if problems < 1:
        raise ValueError(f"problems must be >= 1, got {problems}")
    suites = []
    for name, difficulties in tasks.items():
        task = get_task(name)
        for difficulty in difficulties:
            try:
                drawn = list(sample(task, "eval", problems, seed, difficulty))
            except RuntimeError as error:  # an empty held-out split, e.g. a difficulty made of facts
                raise ValueError(f"nothing to evaluate: {error}") from None
            # Distinct problems only: a small space (2-digit arithmetic holds out about 500) would
            # otherwise count the same problems many times, so it yields fewer.
            suites.append((task, difficulty, list(dict.fromkeys(drawn))))
    return suites


def format_table(results: dict[str, Any]) -> str:
    """The results of `evaluate` as a fixed-width table: a row per task and difficulty, a row per
    task ("all") and an overall row. Fractions in %."""
    k = results["config"]["samples"]
    header = (f"{'task':<12} {'diff':>4} {'n':>5} {'pass@1 ± se':>13} {f'pass@{k}':>7} {f'maj@{k}':>7} "
              f"{'greedy':>7} {'lenient':>7} {'format':>7} {'tokens':>7} {'trunc':>6}")

    def row(name: str, level: str, m: dict[str, float]) -> str:
        greedy = f"{100 * m['greedy']:7.1f}" if "greedy" in m else f"{'-':>7}"
        return (f"{name:<12} {level:>4} {m['n']:>5} {100 * m['pass@1']:6.1f} ± {100 * m['pass@1_stderr']:4.1f} "
                f"{100 * m[f'pass@{k}']:7.1f} {100 * m[f'maj@{k}']:7.1f} {greedy} {100 * m['pass@1_lenient']:7.1f} "
                f"{100 * m['format']:7.1f} {m['mean_tokens']:7.1f} {100 * m['truncation']:6.1f}")

    lines = [header, "-" * len(header)]
    for name, task in results["tasks"].items():
        lines += [row(name, level, m) for level, m in task["difficulties"].items()]
        lines.append(row(name, "all", task))
    lines += ["-" * len(header), row("overall", "", results["overall"])]
    return "\n".join(lines)


def periodic_evaluator(tasks: dict[str, list[int]], problems: int, config: EvalConfig
                       ) -> Callable[[Transformer, Tokenizer], dict[str, float]]:
    """The small sampled evaluation a training stage runs every few steps: eval-split problems drawn
    once, `model, tokenizer -> {"eval_pass@1", "eval_format"}`."""
    suites = eval_suites(tasks, problems, config.seed)

    def run(model: Transformer, tokenizer: Tokenizer) -> dict[str, float]:
        overall = evaluate(model, tokenizer, suites, config)["overall"]
        return {"eval_pass@1": overall["pass@1"], "eval_format": overall["format"]}

    return run


# ---- passkey retrieval over context lengths and depths -------------------------------------------
# " 12345." and EOS fit with room to spare; the first number of the completion is the answer.
PASSKEY_NEW_TOKENS = 8
FIRST_NUMBER = re.compile(r"[0-9]+")


def parse_lengths(spec: str) -> list[int]:
    """Read "1k,2k,4096" as [1024, 2048, 4096] tokens (k = 1024)."""
    lengths = []
    for part in filter(None, (p.strip().lower() for p in spec.split(","))):
        number = part.removesuffix("k")
        if not number.isdigit() or int(number) < 1:
            raise ValueError(f"length {part!r}: expected a positive number of tokens, e.g. 4096 or 4k")
        lengths.append(int(number) * (1024 if part.endswith("k") else 1))
    if not lengths:
        raise ValueError(f"no lengths in {spec!r}; expected e.g. '1k,2k'")
    return lengths


def parse_depths(spec: str) -> list[float]:
    """Read "0,25,50" as [0.0, 25.0, 50.0], percentages of the filler before the key."""
    try:
        depths = [float(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"depths {spec!r}: expected comma-separated percentages, e.g. 0,50,100") from None
    if not depths or not all(0 <= d <= 100 for d in depths):
        raise ValueError(f"depths {spec!r}: need one or more percentages in 0..100")
    return depths


def passkey_eval(model: Transformer, tokenizer: Tokenizer, lengths: Sequence[int], depths: Sequence[float],
                 problems: int, seed: int = 0, batch_size: int = 64, engine: Engine | None = None) -> dict[str, Any]:
    """Greedy passkey retrieval (data/passkey.py) on a grid of prompt lengths (in tokens, the answer
    included) and key depths (in %), `problems` keys per cell. Scored as Landmark Attention and YaRN
    score it: the first number of the completion must be the key. Returns

        {"lengths", "depths", "problems", "accuracy": {length: {depth: fraction}},
         "prompt_tokens": {length: mean prompt tokens}, "samples": [one per length], "wall_s"}

    with lengths and depths as strings. One seed's key is the same at every depth, so a depth's
    row differs from another only in where the key sits."""
    started = time.perf_counter()
    task = get_task("passkey")
    context = model.config.max_position_embeddings
    if problems < 1 or any(length > context for length in lengths):
        raise ValueError(f"need problems >= 1 and lengths within the model's context ({context} tokens, "
                         f"max_position_embeddings); got problems={problems}, lengths={list(lengths)}")
    engine = engine or Engine(model, eos_token_ids=[tokenizer.eos_id], decode=tokenizer.decode)
    greedy = SamplingParams(max_new_tokens=PASSKEY_NEW_TOKENS)
    results: dict[str, Any] = {"lengths": [str(n) for n in lengths], "depths": [f"{d:g}" for d in depths],
                               "problems": problems, "accuracy": {}, "prompt_tokens": {}, "samples": []}
    was_training = model.training
    model.eval()
    try:
        for length in lengths:
            repetitions = repetitions_for(length - PASSKEY_NEW_TOKENS + 1,
                                          lambda text: len(tokenizer.encode(text)) + 1)  # + BOS
            cells = [(f"{depth:g}", task.problem_at(repetitions, depth, prompt_seed(seed, task.name, length, i)))
                     for depth in depths for i in range(problems)]
            # The prompt ends mid-sentence ("The pass key is"): the model continues it, no template.
            prompts = [[tokenizer.bos_id] + tokenizer.encode(problem.prompt) for _, problem in cells]
            with torch.inference_mode():
                completions = _generate(engine, prompts, [greedy] * len(prompts), 1, batch_size)
            correct: dict[str, list[bool]] = {}
            for (depth, problem), (completion,) in zip(cells, completions):
                number = FIRST_NUMBER.search(completion.text or "")
                correct.setdefault(depth, []).append(number is not None and task.check_answer(problem, number.group(0)))
            results["accuracy"][str(length)] = {depth: statistics.fmean(hits) for depth, hits in correct.items()}
            results["prompt_tokens"][str(length)] = statistics.fmean(len(p) for p in prompts)
            results["samples"].append({"length": length, "depth": cells[0][0], "expected": cells[0][1].answer,
                                       "completion": completions[0][0].text})
    finally:
        model.train(was_training)
    results["wall_s"] = time.perf_counter() - started
    return results


def format_passkey_table(results: dict[str, Any]) -> str:
    """Accuracy in % with a row per depth and a column per length, and a row of each length's mean."""
    lengths, accuracy = results["lengths"], results["accuracy"]
    header = "depth \\ length".ljust(15) + "".join(f"{length:>9}" for length in lengths)
    lines = [header, "-" * len(header)]
    for depth in results["depths"]:
        lines.append(f"{depth + '%':<15}" + "".join(f"{100 * accuracy[n][depth]:9.1f}" for n in lengths))
    lines += ["-" * len(header),
              f"{'all':<15}" + "".join(f"{100 * statistics.fmean(accuracy[n].values()):9.1f}" for n in lengths)]
    return "\n".join(lines)


def plot_passkey_heatmap(results: dict[str, Any], path: str) -> None:
    """The accuracy grid as a heatmap, depth down and length across, each cell labelled in %."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; must precede pyplot
    import matplotlib.pyplot as plt

    lengths, depths = results["lengths"], results["depths"]
    grid = [[results["accuracy"][n][d] for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.5 * len(depths) + 2))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for row, values in enumerate(grid):
        for col, value in enumerate(values):
            ax.text(col, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), lengths)
    ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("key depth")
    ax.set_title(f"passkey retrieval, {results['problems']} keys per cell")
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
