"""Built-in verifiable reasoning tasks, their train/eval split, and token shards for pretraining."""

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

TASKS: dict[str, Task] = {task.name: task for task in (Arithmetic(), Countdown())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


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
    "is_eval_problem",
    "sample",
    "tag_count_reward",
    "write_shards",
    "write_shards_from_files",
]
