"""Passkey retrieval: a number hidden at a chosen depth of a long, repetitive filler, asked for at the end.

The prompt is the standard one of Landmark Attention (arXiv 2305.16300) and YaRN (arXiv 2309.00071
§4.3), so scores compare with theirs: the instruction line, the filler sentence repeated, the key
line inserted after a `depth` percentage of the repetitions, and the question that the model
completes with the key. It measures whether a context extension really attends that far, not
reasoning: the trace is one line.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Any

import torch

from nanoseek.data.corpus import StepBatches
from nanoseek.data.task import Problem, Task
from nanoseek.tokenizer import Tokenizer

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
KEYS = range(1, 50001)
# `generate`'s difficulty d has 2**d filler repetitions, about 23 tokens each with a Llama-size
# vocabulary: d=6 is ~1.5K tokens, d=8 ~6K. Longer contexts (to 128K) are built for a length in
# tokens with `repetitions_for` and `problem_at`; capping d keeps task-wide walks (corpus, SFT) small.
MAX_DIFFICULTY = 8
# An answer longer than this is wrong without parsing (the largest key has 5 digits).
MAX_ANSWER_CHARS = 16
KEY_FORM = re.compile(r"[0-9]+")


class Passkey(Task):
    """The key (1..50000) and the depth (an integer percentage, 0..100) come from the seed; the
    difficulty sets the length, 2**difficulty filler repetitions. `problem_at` builds the problem
    of a given length and depth directly, for the length x depth grid of an evaluation."""

    name = "passkey"
    difficulties = range(MAX_DIFFICULTY + 1)

    def generate(self, seed: int, difficulty: int) -> Problem:
        depth = self._rng(seed, difficulty).randint(0, 100)
        problem = self.problem_at(2**difficulty, depth, seed)
        problem.meta["difficulty"] = difficulty
        return problem

    def problem_at(self, repetitions: int, depth: float, seed: int) -> Problem:
        """The key line after round(depth% of `repetitions`) filler sentences: depth 0 puts it right
        after the instruction, 100 right before the question. The key depends on the seed alone,
        so one seed asks for the same key at every length and depth."""
        if repetitions < 1 or not 0 <= depth <= 100:
            raise ValueError(f"passkey: need repetitions >= 1 and depth in 0..100, not {repetitions}, {depth}")
        key = random.Random(f"{self.name}:key:{seed}").choice(KEYS)
        before = round(repetitions * depth / 100)
        lines = [INSTRUCTION, " ".join([FILLER] * before), KEY_LINE.format(key=key),
                 " ".join([FILLER] * (repetitions - before)), QUESTION]
        return Problem(task=self.name, prompt="\n".join(line for line in lines if line), answer=str(key),
                       meta={"seed": seed, "key": key, "depth": depth, "repetitions": repetitions})

    def reasoning_trace(self, problem: Problem) -> str:
        return KEY_LINE.format(key=problem.answer)

    def check_answer(self, problem: Problem, answer: str) -> bool:
        answer = answer.strip()
        return len(answer) <= MAX_ANSWER_CHARS and KEY_FORM.fullmatch(answer) is not None and int(answer) == int(
            problem.answer)


def repetitions_for(length: int, count_tokens: Callable[[str], int]) -> int:
    """The most filler repetitions whose longest prompt (a 5-digit key) with its answer is at most
    `length` tokens as `count_tokens` counts them (at least 1). Tokens per repetition are measured,
    not assumed: they differ between tokenizers, and a merge across two repetitions can shift them.
    A BPE may split another key into more tokens than 50000: callers with a hard limit re-check."""
    task, longest_key = Passkey(), str(max(KEYS))

    def tokens(repetitions: int) -> int:
        problem = task.problem_at(repetitions, 50, seed=0)
        return count_tokens(problem.prompt.replace(problem.answer, longest_key) + " " + longest_key)

    # A linear estimate from two short prompts, then corrected a step at a time either way.
    per_repetition = max(1, tokens(2) - tokens(1))
    repetitions = max(1, (length - tokens(1)) // per_repetition + 1)
    while tokens(repetitions + 1) <= length:
        repetitions += 1
    while repetitions > 1 and tokens(repetitions) > length:
        repetitions -= 1
    return repetitions


class PasskeyLoader(StepBatches):
    """Rows of one passkey document each, the key at a random depth. The document has a random number
    of filler repetitions (1 up to what fills `seq_len`) and starts at a random offset, after a run of
    filler text: a model trained on documents always at position 0, always full length, predicts the
    fixed text by absolute position, and any rescaling of RoPE then breaks it (measured 2026-12-05: such
    a base retrieving 100% at its length fell to 0% there under YaRN x4 or PI x4 before any fine-tune).
    The loss is on every token up to EOS: the filler costs nothing to predict after a few repetitions,
    so the gradient comes from the key's repeats and the answer, the retrieval the extension must learn.
    `min_fill` is the shortest document as a fraction of the row: uniform lengths (0) put most keys
    within a few hundred tokens of their question, and an extension fine-tune needs the far ones.
    Batch `step` depends only on (seed, step)."""

    def __init__(self, tokenizer: Tokenizer, batch_size: int, seq_len: int, seed: int = 0, min_fill: float = 0.0,
                 pose_length: int = 0):
        if not 0 <= min_fill <= 1:
            raise ValueError(f"passkey min_fill = {min_fill}: must be in [0, 1]")
        if pose_length and pose_length < seq_len:
            raise ValueError(f"passkey pose_length = {pose_length}: must be 0 (off) or at least seq_len ({seq_len})")
        self.tokenizer, self.batch_size, self.seq_len, self.seed = tokenizer, batch_size, seq_len, seed
        self.pose_length = pose_length
        # BOS, the "." after the key and EOS are the three tokens on top of prompt + " " + key.
        self.repetitions = repetitions_for(seq_len + 1, lambda text: len(tokenizer.encode(text + ".")) + 2)
        self.min_repetitions = max(1, round(min_fill * self.repetitions))
        # Text to cut the leading run from: at least seq_len tokens of filler sentences.
        self.filler = tokenizer.encode(" ".join([FILLER] * (self.repetitions + 2)))
        self.step = 0

    def document(self, seed: int, depth: int, repetitions: int) -> list[int]:
        """At most seq_len + 1 tokens: a key that tokenizes longer than the one `repetitions_for`
        measured with costs a filler repetition, never the answer at the end."""
        tok = self.tokenizer
        for fewer in range(repetitions, 0, -1):
            problem = Passkey().problem_at(fewer, depth, seed)
            ids = [tok.bos_id] + tok.encode(f"{problem.prompt} {problem.answer}.") + [tok.eos_id]
            if len(ids) <= self.seq_len + 1:
                break
        return ids[:self.seq_len + 1]

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        inputs = torch.full((self.batch_size, self.seq_len), self.tokenizer.pad_id, dtype=torch.long)
        labels = torch.full((self.batch_size, self.seq_len), -100, dtype=torch.long)
        positions = torch.arange(self.seq_len).repeat(self.batch_size, 1)
        for row in range(self.batch_size):
            rng = random.Random(f"extend:{self.seed}:{step}:{row}")
            repetitions = rng.randint(self.min_repetitions, self.repetitions)
            document = self.document(rng.getrandbits(63), rng.randint(0, 100), repetitions)
            lead = rng.randint(0, self.seq_len + 1 - len(document))
            ids = self.filler[len(self.filler) - lead:] + document
            inputs[row, :len(ids) - 1] = torch.tensor(ids[:-1])
            labels[row, :len(ids) - 1] = torch.tensor(ids[1:])
            if self.pose_length:
                # PoSE (arXiv 2309.10400) with two chunks: the row's tail from a random split point on
                # is moved a random skip further, so distances up to pose_length occur in seq_len tokens.
                split = rng.randint(1, self.seq_len - 1)
                positions[row, split:] += rng.randint(0, self.pose_length - self.seq_len)
        return (inputs, labels, positions) if self.pose_length else (inputs, labels)

    def settings(self) -> dict[str, Any]:
        # The floor is named only when there is one: states saved before it existed had none, and resume.
        floor = {"min_repetitions": self.min_repetitions} if self.min_repetitions > 1 else {}
        pose = {"pose_length": self.pose_length} if self.pose_length else {}
        return {"seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "repetitions": self.repetitions, **floor, **pose}
