"""Built-in verifiable reasoning tasks, their train/eval split, and token shards for pretraining."""

import copy

from nanoseek.data.arithmetic import Arithmetic
from nanoseek.data.corpus import (
    TokenLoader,
    TokenShardDataset,
    build_task_corpus,
    find_contamination,
    write_shards,
    write_shards_from_files,
)
from nanoseek.data.countdown import Countdown
from nanoseek.data.passkey import Passkey
from nanoseek.data.task import (
    Problem,
    Task,
    accuracy_reward,
    extract_answer,
    format_reward,
    is_eval_problem,
    sample,
    tag_count_reward,
)

TASKS: dict[str, Task] = {task.name: task for task in (Arithmetic(), Countdown(), Passkey())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def tasks_at(spec: dict[str, list[int]]) -> list[Task]:
    """Copies of the named tasks restricted to the given difficulties (task name -> difficulties),
    which is how every stage walks them; a bad name or difficulty is an error that names it."""
    tasks = []
    for name, levels in spec.items():
        task = copy.copy(get_task(name))
        bad = [d for d in levels if d not in task.difficulties]
        if bad or not levels:
            raise ValueError(f"{name}: difficulties {levels} must be a non-empty subset of {list(task.difficulties)}")
        task.difficulties = list(levels)
        tasks.append(task)
    return tasks


__all__ = [
    "TASKS",
    "Problem",
    "Task",
    "TokenLoader",
    "TokenShardDataset",
    "accuracy_reward",
    "build_task_corpus",
    "extract_answer",
    "find_contamination",
    "format_reward",
    "get_task",
    "tasks_at",
    "is_eval_problem",
    "sample",
    "tag_count_reward",
    "write_shards",
    "write_shards_from_files",
]
