"""Supervised fine-tuning (R1's cold start, §2.3.1): conversations in the chat format, loss on the
assistant tokens only, from any model folder.

Each row of a batch is one whole conversation, right-padded: no token ever attends across two
conversations (padding sits after every real token, and attention is causal). Batches are cut
from length-sorted windows of the shuffled data, so rows of a batch have similar lengths and
padding stays small. Batch `step` depends only on (seed, step), so resuming needs only the step
counter, and the loop, checkpoints, metrics and plots are pretraining's (`pretrain.train`).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoseek.data.corpus import StepBatches
from nanoseek.data.task import Problem, Task, Template, sample
from nanoseek.model.config import ModelConfig
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import ROLE_TOKENS, Conversation, Tokenizer
from nanoseek.train.config import TrainConfigError, load_config
from nanoseek.train.pretrain import Evaluator, TrainConfig, train

# Rows are sorted by length within windows of this many batches (more = less padding, less mixing).
SORT_WINDOW_BATCHES = 16


@dataclass
class SFTConfig(TrainConfig):
    """A training config whose `data.path` is a JSONL file of {"messages": [...]} conversations and
    whose `init` is the model folder to fine-tune. `data.seq_len` is the longest conversation kept
    (longer ones are cut). Every `eval_every` steps: held-out loss on eval-split conversations and a
    small sampled evaluation (pass@1 and format rate) of `eval_tasks`."""

    stage: str = "sft"
    steps: int = 100
    eval_tasks: dict[str, list[int]] = field(default_factory=dict)
    eval_problems: int = 32  # per task difficulty, eval split
    eval_samples: int = 2
    eval_max_new_tokens: int = 128
    template: Template = "chat"


def read_conversations(path: str | Path) -> list[Conversation]:
    """The conversations of a JSONL file, one {"messages": [{"role", "content"}, ...]} per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no conversation file at {path}")
    conversations = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            messages = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(messages, list) or not messages:
                raise ValueError(f"{path}:{number}: expected an object with a non-empty 'messages' list")
            for message in messages:
                if (not isinstance(message, dict) or message.get("role") not in ROLE_TOKENS
                        or not isinstance(message.get("content"), str)):
                    raise ValueError(f"{path}:{number}: each message needs a role in {sorted(ROLE_TOKENS)} "
                                     f"and a string content")
            if not any(m["role"] == "assistant" for m in messages):
                raise ValueError(f"{path}:{number}: no assistant turn, so nothing to learn from")
            conversations.append(messages)
    if not conversations:
        raise ValueError(f"{path}: no conversations")
    return conversations


def write_conversations(path: str | Path, conversations: Iterable[Conversation]) -> int:
    """Write a JSONL conversation file atomically; returns how many it wrote."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    count = 0
    with tmp.open("w", encoding="utf-8") as f:
        for conversation in conversations:
            f.write(json.dumps({"messages": list(conversation)}) + "\n")
            count += 1
    os.replace(tmp, path)
    return count


def task_conversations(tasks: Sequence[Task], problems: int, seed: int, split: str = "train") -> list[Conversation]:
    """R1-format conversations (reasoning in <think>, answer in <answer>) of distinct problems,
    `problems` per task difficulty, in a seeded random order."""
    chosen: list[tuple[Task, Problem]] = []
    for task in tasks:
        for difficulty in task.difficulties:
            drawn = dict.fromkeys(sample(task, split, problems, seed, difficulty))
            chosen += [(task, p) for p in drawn]
    random.Random(seed).shuffle(chosen)
    return [task.conversation(p) for task, p in chosen]


def tokenize(tokenizer: Tokenizer, conversations: Sequence[Conversation], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per conversation: labels are the next token where it is an assistant
    token (the tokenizer's loss mask), else -100; cut to max_len inputs."""
    examples = []
    for conversation in conversations:
        ids, mask = tokenizer.render_conversation(conversation)
        ids, mask = ids[:max_len + 1], mask[:max_len + 1]
        labels = [t if m else -100 for t, m in zip(ids[1:], mask[1:])]
        if any(label != -100 for label in labels):
            examples.append((ids[:-1], labels))
    return examples


class ConversationLoader(StepBatches):
    """Batches of whole conversations, right-padded to the longest row; an epoch is a seeded
    shuffle, sorted by length within windows, cut into batches whose order is shuffled again."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, seed: int = 0):
        if len(examples) < batch_size:
            raise ValueError(f"{len(examples)} conversations cannot fill a batch of {batch_size}")
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.batches_per_epoch = len(examples) // batch_size
        self.step = 0
        self._epoch: tuple[int, list[list[int]]] | None = None

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = random.Random(f"sft:{self.seed}:{epoch}")
            order = list(range(len(self.examples)))
            rng.shuffle(order)
            order = order[:self.batches_per_epoch * self.batch_size]
            window = SORT_WINDOW_BATCHES * self.batch_size
            for start in range(0, len(order), window):
                order[start:start + window] = sorted(order[start:start + window], key=lambda i: len(self.examples[i][0]))
            batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            rng.shuffle(batches)
            self._epoch = (epoch, batches)
        return self._epoch[1]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.examples[i] for i in self._batches(step // self.batches_per_epoch)[step % self.batches_per_epoch]]
        width = max(len(ids) for ids, _ in rows)
        inputs = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, (ids, target) in enumerate(rows):
            inputs[r, :len(ids)] = torch.tensor(ids)
            labels[r, :len(target)] = torch.tensor(target)
        return inputs, labels

    def settings(self) -> dict[str, Any]:
        return {"seed": self.seed, "batch_size": self.batch_size, "examples": len(self.examples)}


def conversation_loader(config: TrainConfig, mcfg: ModelConfig) -> ConversationLoader:
    tokenizer = Tokenizer.load(config.tokenizer)
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise TrainConfigError(f"tokenizer '{config.tokenizer}' has {tokenizer.vocab_size} tokens > model "
                               f"vocab_size {mcfg.vocab_size}")
    examples = tokenize(tokenizer, read_conversations(config.data.path), config.data.seq_len)
    return ConversationLoader(examples, config.data.batch_size, tokenizer.pad_id, config.seed)


def sft_evaluator(config: SFTConfig) -> Evaluator | None:
    """Held-out loss on eval-split conversations and a small sampled eval, both of `eval_tasks`."""
    if not config.eval_tasks:
        return None
    from nanoseek.eval import EvalConfig, eval_suites, periodic_evaluator

    tokenizer = Tokenizer.load(config.tokenizer)
    held_out = tokenize(tokenizer, [task.conversation(p) for task, _, problems in
                                    eval_suites(config.eval_tasks, config.eval_problems, config.seed) for p in problems],
                        config.data.seq_len)
    loader = ConversationLoader(held_out, len(held_out), tokenizer.pad_id)
    sampled = periodic_evaluator(config.eval_tasks, config.eval_problems, EvalConfig(
        samples=config.eval_samples, max_new_tokens=config.eval_max_new_tokens, greedy=False, seed=config.seed,
        template=config.template))

    @torch.no_grad()
    def run(model: Transformer, step: int) -> dict[str, Any]:
        inputs, labels = (t.to(model.device) for t in loader.batch(0))
        return {"eval_loss": float(model.compute_loss(inputs, labels)["ce"]), **sampled(model, tokenizer)}

    return run


def sft(config: SFTConfig, resume: bool = False) -> Path:
    """Fine-tune `config.init` on the conversations at `config.data.path`; returns final/."""
    if not config.init:
        raise TrainConfigError("'init' is empty: SFT needs the model folder to start from")
    if not config.data.path:
        raise TrainConfigError("'data.path' is empty: give a JSONL file of {\"messages\": [...]} conversations")
    config.tokenizer = config.tokenizer or config.init
    return train(config, conversation_loader, resume=resume, evaluate=sft_evaluator(config))


def load_sft_config(path: str | None, overrides: list[str] | None = None) -> SFTConfig:
    return load_config(SFTConfig, path, overrides)
