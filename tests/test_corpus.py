import json

import numpy as np
import pytest
import torch

from nanoseek.data import TASKS, sample
from nanoseek.data.corpus import (
    INDEX_FILE,
    TokenLoader,
    TokenShardDataset,
    build_task_corpus,
    find_contamination,
    find_sequences,
    write_shards,
    write_shards_from_files,
)
from nanoseek.tokenizer import train_tokenizer

TASK_LIST = list(TASKS.values())


@pytest.fixture(scope="module")
def tok():
    texts = []
    for task in TASK_LIST:
        for difficulty in task.difficulties:
            for problem in sample(task, "train", 10, seed=99, difficulty=difficulty):
                texts += [problem.prompt, task.render_solution(problem)]
    return train_tokenizer(texts, vocab_size=800)


@pytest.fixture(scope="module")
def corpus(tok, tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    index = build_task_corpus(tok, directory, TASK_LIST, problems_per_difficulty=25, seed=0, shard_tokens=30_000)
    return directory, index


def test_task_corpus_index_and_shards(tok, corpus):
    directory, index = corpus
    assert json.loads((directory / INDEX_FILE).read_text()) == index
    assert index["dtype"] == "uint16" and index["vocab_size"] == tok.vocab_size
    assert index["documents"] == 25 * sum(len(task.difficulties) for task in TASK_LIST)
    assert len(index["shards"]) > 1
    assert index["total_tokens"] == sum(shard["tokens"] for shard in index["shards"])
    for shard in index["shards"]:
        assert (directory / shard["file"]).stat().st_size == 2 * shard["tokens"]
    dataset = TokenShardDataset(directory)
    tokens = dataset.tokens(0, len(dataset))
    assert tokens[0] == tok.bos_id and (tokens == tok.bos_id).sum() == index["documents"]
    text = tok.decode(tokens)
    assert "<|bos|>What is" in text and "\nAnswer: " in text and "Using the numbers" in text
    # Base data: plain worked solutions, never the chat format or the R1 tags (SFT teaches those).
    assert not any(t in text for t in ("<|user|>", "<|assistant|>", "<think>", "</think>", "<answer>", "</answer>"))


def test_task_corpus_is_deterministic(tok, corpus, tmp_path):
    directory, index = corpus
    again = build_task_corpus(tok, tmp_path, TASK_LIST, problems_per_difficulty=25, seed=0, shard_tokens=30_000)
    assert again == index
    for shard in index["shards"]:
        assert (tmp_path / shard["file"]).read_bytes() == (directory / shard["file"]).read_bytes()


def test_eval_problems_do_not_occur_in_the_train_corpus(tok, corpus):
    dataset = TokenShardDataset(corpus[0])
    evals = [p for task in TASK_LIST for d in task.difficulties if not (task.name == "arithmetic" and d == 1)
             for p in sample(task, "eval", 25, 0, d)]
    assert find_contamination(dataset, tok, evals) == []
    # The check can see: the corpus's own problems are all found.
    trains = [p for task in TASK_LIST for d in task.difficulties for p in sample(task, "train", 5, 0, d)]
    assert find_contamination(dataset, tok, trains) == trains


@pytest.mark.parametrize("vocab_size, dtype", [(1000, np.uint16), (1 << 16, np.uint16), ((1 << 16) + 1, np.uint32)])
def test_write_shards_round_trip(tmp_path, vocab_size, dtype):
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, vocab_size, size=n).tolist() for n in (0, 1, 7, 100, 33, 250)]
    index = write_shards(documents, tmp_path, vocab_size, shard_tokens=64)
    assert np.dtype(index["dtype"]) == dtype
    assert [shard["tokens"] for shard in index["shards"]] == [64] * 6 + [7]
    stream = np.concatenate([np.asarray(d, dtype=np.int64) for d in documents])
    dataset = TokenShardDataset(tmp_path)
    assert len(dataset) == len(stream)
    assert np.array_equal(dataset.tokens(0, len(dataset)), stream)
    assert np.array_equal(dataset.tokens(60, 200), stream[60:200])  # across shard boundaries
    raw = np.memmap(tmp_path / index["shards"][1]["file"], dtype=dtype, mode="r")
    assert np.array_equal(raw, stream[64:128])
    with pytest.raises(IndexError):
        dataset.tokens(0, len(dataset) + 1)


def test_write_shards_refuses_out_of_range_ids(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        write_shards([[1, 2], [3, 1000]], tmp_path, vocab_size=1000)


def test_empty_corpus(tmp_path):
    index = write_shards([], tmp_path, vocab_size=10)
    assert index["total_tokens"] == 0 and len(TokenShardDataset(tmp_path)) == 0


def test_missing_index_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / INDEX_FILE)):
        TokenShardDataset(tmp_path)


@pytest.mark.parametrize("entry", ["absolute", "parent"])
def test_index_naming_a_shard_outside_the_directory_is_refused(tmp_path, entry):
    """A crafted index must not map a file outside the shard directory, even a valid shard (as here)."""
    write_shards([[1, 2, 3]], tmp_path / "data", vocab_size=10)
    (tmp_path / "data" / "shard_00000.bin").rename(tmp_path / "outside.bin")
    name = str(tmp_path / "outside.bin") if entry == "absolute" else "../outside.bin"
    index = json.loads((tmp_path / "data" / INDEX_FILE).read_text())
    index["shards"][0]["file"] = name
    (tmp_path / "data" / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{tmp_path / 'data' / INDEX_FILE}: shard entry .* names '{name}', which is "
                                         "not a file in"):
        TokenShardDataset(tmp_path / "data")


@pytest.mark.parametrize("shuffle", [True, False])
def test_loader_resumes_exactly(corpus, shuffle):
    dataset = TokenShardDataset(corpus[0])
    loader = TokenLoader(dataset, batch_size=4, seq_len=32, seed=7, shuffle=shuffle)
    for _ in range(5):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(3)]
    resumed = TokenLoader(dataset, batch_size=4, seq_len=32, seed=7, shuffle=shuffle)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state survives a JSON checkpoint
    for (x, y), (x2, y2) in zip(expected, (next(resumed) for _ in range(3))):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    x, y = expected[0]
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # The seed picks the random windows; the sequential order does not depend on it.
    first = next(TokenLoader(dataset, batch_size=4, seq_len=32, seed=7, shuffle=shuffle))[0]
    other_seed = next(TokenLoader(dataset, batch_size=4, seq_len=32, seed=8, shuffle=shuffle))[0]
    assert torch.equal(first, other_seed) == (not shuffle)


def test_sequential_loader_walks_the_stream(corpus):
    dataset = TokenShardDataset(corpus[0])
    stream = torch.from_numpy(dataset.tokens(0, len(dataset)).astype(np.int64))
    loader = TokenLoader(dataset, batch_size=3, seq_len=16, shuffle=False)
    inputs = torch.cat([next(loader)[0].flatten() for _ in range(4)])
    assert torch.equal(inputs, stream[: 4 * 3 * 16])
    ranks = [TokenLoader(dataset, batch_size=3, seq_len=16, shuffle=False, rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(torch.cat([next(ranks[0])[0], next(ranks[1])[0]]).flatten(), stream[: 2 * 3 * 16])


def test_loader_refuses_a_mismatched_state(corpus):
    dataset = TokenShardDataset(corpus[0])
    state = TokenLoader(dataset, batch_size=4, seq_len=32).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        TokenLoader(dataset, batch_size=8, seq_len=32).load_state_dict(state)
    with pytest.raises(ValueError, match="window"):
        TokenLoader(dataset, batch_size=1, seq_len=len(dataset))


def test_shards_from_user_files(tok, tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond one,\nstill second.\n\n\n")
    (tmp_path / "b.jsonl").write_text('{"text": "From JSONL 🙂"}\n\n{"text": "two"}\n')
    paths = [tmp_path / "a.txt", tmp_path / "b.jsonl"]
    index = write_shards_from_files(paths, tok, tmp_path / "whole")
    assert index["documents"] == 3
    dataset = TokenShardDataset(tmp_path / "whole")
    expected = "<|bos|>First paragraph.\n\nSecond one,\nstill second.\n\n\n<|bos|>From JSONL 🙂<|bos|>two"
    assert tok.decode(dataset.tokens(0, len(dataset))) == expected
    index = write_shards_from_files(paths, tok, tmp_path / "split", split_blank_lines=True)
    assert index["documents"] == 4


def test_shards_from_files_errors(tok, tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        write_shards_from_files([missing], tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"content": "no text"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        write_shards_from_files([tmp_path / "bad.jsonl"], tok, tmp_path / "out")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=".txt or .jsonl"):
        write_shards_from_files([tmp_path / "data.csv"], tok, tmp_path / "out")


def test_find_sequences_matches_brute_force(tmp_path):
    rng = np.random.default_rng(1)
    stream = rng.integers(0, 5, size=3000)  # a small alphabet, so many queries do occur
    write_shards([stream[:1234].tolist(), stream[1234:].tolist()], tmp_path, vocab_size=5, shard_tokens=500)
    dataset = TokenShardDataset(tmp_path)
    queries = [stream[s : s + n].tolist() for s, n in rng.integers([0, 1], [2980, 12], size=(40, 2))]
    queries += [rng.integers(0, 5, size=n).tolist() for n in rng.integers(1, 12, size=60)] + [[], [7]]
    text = "".join(map(str, stream))
    expected = ["".join(map(str, q)) in text for q in queries]
    assert any(expected) and not all(expected)
    for chunk_tokens in (1 << 22, 97):  # small chunks: matches that straddle chunk edges are still found
        assert find_sequences(dataset, queries, chunk_tokens=chunk_tokens) == expected


def test_plain_prompt_is_how_a_base_document_starts(tok):
    """The `plain` eval template asks the base model exactly as its corpus starts a document."""
    from nanoseek.data.corpus import base_text
    from nanoseek.data.task import prompt_ids

    task = TASKS["arithmetic"]
    for problem in sample(task, "train", 20, seed=3, difficulty=3):
        document = [tok.bos_id] + tok.encode(base_text(task, problem))
        prompt = prompt_ids(tok, task, problem, "plain")
        assert document[:len(prompt)] == prompt and len(prompt) < len(document)
