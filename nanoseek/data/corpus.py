"""Flat token shards: writing them (from the built-in tasks or your own files), reading them
through np.memmap with a resumable loader, and checking them for eval contamination.

A shard directory holds ``shard_00000.bin``, ... (raw token ids, uint16 when the vocabulary
fits, else uint32) and ``index.json`` (dtype, vocab size, token counts, shard list).
Every document starts with BOS, so documents are delimited inside the flat stream.
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoseek.data.task import Problem, Task, sample
from nanoseek.tokenizer import Tokenizer

INDEX_FILE = "index.json"
SHARD_TOKENS = 1 << 24
# Odd multiplier of the polynomial window hash, modulo 2**64 by uint64 wrap-around.
HASH_BASE = np.uint64(0x100000001B3)
HASH_INVERSE = np.uint64(pow(int(HASH_BASE), -1, 1 << 64))


def shard_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_shards(
    documents: Iterable[Sequence[int]], out_dir: str | Path, vocab_size: int, shard_tokens: int = SHARD_TOKENS
) -> dict[str, Any]:
    """Concatenate token documents into shards of `shard_tokens` ids; returns the index it writes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = shard_dtype(vocab_size)
    shards: list[dict[str, Any]] = []
    buffer = np.empty(shard_tokens, dtype=dtype)
    filled, n_documents = 0, 0

    def flush() -> None:
        name = f"shard_{len(shards):05d}.bin"
        buffer[:filled].tofile(out_dir / name)
        shards.append({"file": name, "tokens": filled})

    for document in documents:
        ids = np.asarray(document, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"document {n_documents} has token ids outside [0, {vocab_size})")
        n_documents += 1
        while ids.size:
            take = min(ids.size, shard_tokens - filled)
            buffer[filled : filled + take] = ids[:take]
            filled, ids = filled + take, ids[take:]
            if filled == shard_tokens:
                flush()
                filled = 0
    if filled or not shards:
        flush()
    index = {
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "total_tokens": sum(shard["tokens"] for shard in shards),
        "documents": n_documents,
        "shards": shards,
    }
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index


def base_text(task: Task, problem: Problem) -> str:
    """A problem and its worked solution as plain text: what a base model reads in pretraining.
    Never the chat format nor the <think>/<answer> tags, which SFT (or R1-Zero RL) teaches."""
    return f"{problem.prompt}\n{task.reasoning_trace(problem)}\nAnswer: {problem.answer}"


def task_documents(
    tokenizer: Tokenizer, tasks: Sequence[Task], problems_per_difficulty: int, seed: int = 0
) -> Iterator[list[int]]:
    """Train-split problems of every task and difficulty as plain-text worked solutions (base_text)
    between BOS and EOS, randomly interleaved so that a sequential read sees a mix."""
    streams = [
        sample(task, "train", problems_per_difficulty, seed, difficulty)
        for task in tasks
        for difficulty in task.difficulties
    ]
    owners = [task for task in tasks for _ in task.difficulties]
    rng = random.Random(seed)
    while streams:
        k = rng.randrange(len(streams))
        problem = next(streams[k], None)
        if problem is None:
            del streams[k], owners[k]
            continue
        # EOS ends each document, as in web-scale corpora, so a base model learns where a solution
        # stops (R1-Zero samples from it with no chat format to end its turn).
        yield [tokenizer.bos_id] + tokenizer.encode(base_text(owners[k], problem)) + [tokenizer.eos_id]


def build_task_corpus(
    tokenizer: Tokenizer,
    out_dir: str | Path,
    tasks: Sequence[Task],
    problems_per_difficulty: int,
    seed: int = 0,
    shard_tokens: int = SHARD_TOKENS,
) -> dict[str, Any]:
    """Write a pretraining corpus of the tasks' train problems; returns the index."""
    documents = task_documents(tokenizer, tasks, problems_per_difficulty, seed)
    return write_shards(documents, out_dir, tokenizer.vocab_size, shard_tokens)


def read_documents(path: str | Path, split_blank_lines: bool = False) -> Iterator[str]:
    """Texts of a .txt file (the whole file, or each blank-line separated part) or of a .jsonl
    file (the "text" field of each line)."""
    path = Path(path)
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        parts = re.split(r"\n\s*\n", text) if split_blank_lines else [text]
        yield from (part for part in parts if part.strip())
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{number}: expected an object with a 'text' string")
                yield record["text"]
    else:
        raise ValueError(f"{path}: expected a .txt or .jsonl file")


def write_shards_from_files(
    paths: Iterable[str | Path],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    split_blank_lines: bool = False,
    shard_tokens: int = SHARD_TOKENS,
) -> dict[str, Any]:
    """Tokenize your own .txt / .jsonl files into shards; returns the index."""
    paths = [Path(p) for p in paths]
    for path in paths:  # fail before writing anything
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
    texts = (text for path in paths for text in read_documents(path, split_blank_lines))
    documents = ([tokenizer.bos_id] + tokenizer.encode(text) for text in texts)
    return write_shards(documents, out_dir, tokenizer.vocab_size, shard_tokens)


class TokenShardDataset:
    """The shards of a directory as one memory-mapped token stream."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        index_path = directory / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"no shard index at {index_path}")
        self.index = json.loads(index_path.read_text())
        self.vocab_size: int = self.index["vocab_size"]
        dtype = np.dtype(self.index["dtype"])
        for shard in self.index["shards"]:
            # Bare file names only: an absolute or `../` name would map a file outside the directory.
            name = shard["file"]
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"{index_path}: shard entry {shard!r} names {name!r}, which is not a file "
                                 f"in {directory} (only bare file names are allowed)")
        self.shards = [
            np.memmap(directory / shard["file"], dtype=dtype, mode="r", shape=(shard["tokens"],))
            for shard in self.index["shards"]
            if shard["tokens"]
        ]
        self.offsets = np.cumsum([0] + [len(shard) for shard in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream, across shard boundaries."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"[{start}, {stop}) outside the {len(self)} tokens")
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        while start < stop:
            begin = start - int(self.offsets[first])
            take = min(stop - start, len(self.shards[first]) - begin)
            pieces.append(self.shards[first][begin : begin + take])
            start, first = start + take, first + 1
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.dtype(self.index["dtype"]))


class StepBatches:
    """A BatchSource whose batch is a pure function of the step: `batch(step)` and `settings()` (what a
    resumed run must share with the saved one) are the subclass's; resuming restores the step."""

    step: int = 0

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batch(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, **self.settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        changed = [k for k, v in self.settings().items() if k not in state or state[k] != v]
        if changed:
            raise ValueError(f"cannot resume exactly: {', '.join(changed)} differ from the saved loader state")
        self.step = state["step"]


class TokenLoader(StepBatches):
    """Batches of (inputs, targets), each (batch_size, seq_len) int64, cut from windows of
    seq_len + 1 tokens.

    Batch `step` depends only on (seed, step, rank): shuffle=True draws uniform random window
    starts, shuffle=False walks the stream in order and wraps around. So the state is one step
    counter, and `load_state_dict` resumes the exact sequence of batches.
    """

    def __init__(
        self,
        dataset: TokenShardDataset,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if len(dataset) < seq_len + 1:
            raise ValueError(f"{len(dataset)} tokens cannot fill a window of seq_len + 1 = {seq_len + 1}")
        self.dataset, self.batch_size, self.seq_len = dataset, batch_size, seq_len
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.step = 0

    def window_starts(self, step: int) -> np.ndarray:
        if self.shuffle:
            rng = np.random.default_rng([self.seed, step, self.rank])
            return rng.integers(0, len(self.dataset) - self.seq_len, size=self.batch_size)
        # Consecutive windows share one token, so every position is a target exactly once per pass.
        n_windows = (len(self.dataset) - 1) // self.seq_len
        first = (step * self.world_size + self.rank) * self.batch_size
        return (np.arange(first, first + self.batch_size) % n_windows) * self.seq_len

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        windows = np.stack(
            [self.dataset.tokens(int(s), int(s) + self.seq_len + 1) for s in self.window_starts(step)]
        ).astype(np.int64)
        tokens = torch.from_numpy(windows)
        return tokens[:, :-1], tokens[:, 1:]

    def settings(self) -> dict[str, Any]:
        return {"seed": self.seed, "shuffle": self.shuffle, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "rank": self.rank, "world_size": self.world_size}

def find_sequences(
    dataset: TokenShardDataset, sequences: Sequence[Sequence[int]], chunk_tokens: int = 1 << 22
) -> list[bool]:
    """Whether each token sequence occurs contiguously somewhere in the dataset.

    Compares rolling hashes of every window of each distinct query length, then confirms hash
    hits token by token, so the answer is exact.
    """
    found = [len(sequence) == 0 for sequence in sequences]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, sequence in enumerate(sequences):
        if sequence:
            by_length[len(sequence)].append(i)
    if not by_length:
        return found
    longest = max(by_length)
    queries = {i: np.asarray(sequences[i], dtype=np.uint64) for indices in by_length.values() for i in indices}
    query_hashes = {i: _prefix_hashes(query)[0][-1] for i, query in queries.items()}
    for start in range(0, len(dataset), chunk_tokens):
        # Overlap chunks by longest - 1 tokens so that no window is cut in two.
        chunk = dataset.tokens(start, min(len(dataset), start + chunk_tokens + longest - 1)).astype(np.uint64)
        prefix, inverse_powers = _prefix_hashes(chunk)
        for length, indices in by_length.items():
            pending = np.array([i for i in indices if not found[i]])
            if not pending.size or len(chunk) < length:
                continue
            hashes = _window_hashes(prefix, inverse_powers, length)
            for i in pending[np.isin([query_hashes[i] for i in pending], hashes)]:
                for position in np.flatnonzero(hashes == query_hashes[i]):
                    if np.array_equal(chunk[position : position + length], queries[i]):
                        found[i] = True
                        break
    return found


def find_contamination(dataset: TokenShardDataset, tokenizer: Tokenizer, problems: Sequence[Problem]) -> list[Problem]:
    """The problems whose tokenized prompt occurs verbatim in the dataset."""
    found = find_sequences(dataset, [tokenizer.encode(problem.prompt) for problem in problems])
    return [problem for problem, hit in zip(problems, found) if hit]


def _prefix_hashes(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prefix sums P[i] = sum_{k<i} tokens[k] * B**k and the powers B**-i, all mod 2**64."""
    prefix = np.concatenate([np.zeros(1, np.uint64), np.cumsum(tokens * _powers(HASH_BASE, len(tokens)))])
    return prefix, _powers(HASH_INVERSE, len(tokens))


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """base**0 .. base**(n-1) mod 2**64 (uint64 products wrap around)."""
    factors = np.full(n, base, dtype=np.uint64)
    factors[:1] = 1
    return np.cumprod(factors)


def _window_hashes(prefix: np.ndarray, inverse_powers: np.ndarray, length: int) -> np.ndarray:
    """h[i] = sum_j tokens[i + j] * B**j (mod 2**64) for every window of `length` tokens,
    as (P[i + length] - P[i]) * B**-i. B is odd, hence invertible mod 2**64, so each query
    length costs O(n) rather than O(n * length)."""
    n = len(prefix) - length
    return (prefix[length:] - prefix[:n]) * inverse_powers[:n]
