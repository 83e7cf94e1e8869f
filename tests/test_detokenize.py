"""Incremental detokenisation (what the server's scheduler runs per token) against the whole-text
reference: the same text and the same stops, token by token."""

import random
import sys
import threading

import pytest

from nanoseek.infer import SamplingParams
from nanoseek.infer.detokenize import Detokenizer, WholeTextDetokenizer
from nanoseek.infer.engine import Sequence
from nanoseek.tokenizer import train_tokenizer

# Multi-byte characters (2, 3 and 4 UTF-8 bytes) that the BPE mostly leaves as single-byte tokens.
TEXTS = ["the quick brown fox jumps over the lazy dog", "héllo wörld, ça va? naïve café",
         "日本語のテキスト", "emoji 😀🎉 and symbols !?.,;:"] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=340)


def token_lists(tokenizer, count=200, seed=0):
    """Encoded sentences (characters split across tokens) and random ids (invalid UTF-8, specials)."""
    rng = random.Random(seed)
    for i in range(count):
        if i % 2:
            yield [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 50))]
        else:
            yield tokenizer.encode(" ".join(rng.choice(TEXTS[:4]) for _ in range(3)))


def test_incremental_text_and_stops_equal_whole_text_decoding(tokenizer):
    rng = random.Random(1)
    for tokens in token_lists(tokenizer):
        text = tokenizer.decode(tokens)
        start = rng.randrange(len(text))
        stop = [text[start:start + rng.randint(1, 4)], "never in this text"]
        fast, reference = Detokenizer(tokenizer.decode, stop), WholeTextDetokenizer(tokenizer.decode, stop)
        n = 0
        while n < len(tokens):
            n += rng.choice([1, 1, 1, 2, 5])  # the event loop catches up several tokens at once
            hit = reference.update(tokens[:n])
            assert fast.update(tokens[:n]) == hit, (tokens, n, stop)
            assert fast.text == reference.text == tokenizer.decode(tokens[:n])
            if hit is not None:
                break


def test_stop_string_across_tokens_and_inside_a_split_character(tokenizer):
    tokens = tokenizer.encode("ab 😀cd ef")
    pieces = [tokenizer.decode([t]) for t in tokens]
    assert "\ufffd" in pieces and "😀" not in pieces  # the emoji's bytes are split across tokens
    for stop, before in [("😀c", "ab "), ("d e", "ab 😀c"), ("\U0001f600", "ab ")]:
        seq = Sequence([0], SamplingParams(max_new_tokens=100, stop=[stop]), None, set(), tokenizer.decode)
        shown = []
        for token in tokens:
            seq.append(token)
            shown.append(seq.stream_text())
            if seq.done:
                break
        whole = tokenizer.decode(seq.tokens)
        assert seq.finish_reason == "stop" and seq.text() == before and whole.index(stop) == len(before)
        assert stop in whole and stop not in tokenizer.decode(seq.tokens[:-1])  # stopped at the first token it could
        # What streams is always a prefix of the final text: no placeholder, no half of the stop string.
        assert all(before.startswith(s) for s in shown), shown


def test_text_read_from_another_thread_never_shows_a_stop_token(tokenizer):
    """The server's event loop streams text while the scheduler appends: whatever it reads is a
    prefix of the final text, which leaves the EOS out."""
    eos, interval = tokenizer.eos_id, sys.getswitchinterval()
    tokens = tokenizer.encode(" ".join(TEXTS[:4]))

    def read(seq, seen, finished):
        while not finished.is_set():
            seen.append(seq.stream_text())

    sys.setswitchinterval(1e-6)  # switch threads as often as possible, to hit the races
    try:
        for _ in range(20):
            seq = Sequence([0], SamplingParams(max_new_tokens=1000), None, {eos}, tokenizer.decode)
            seen, finished = [], threading.Event()
            reader = threading.Thread(target=read, args=(seq, seen, finished))
            reader.start()
            for token in tokens + [eos]:
                seq.append(token)
            finished.set()
            reader.join()
            final = seq.text()
            assert final == tokenizer.decode(tokens)
            assert all(final.startswith(text) for text in seen)
    finally:
        sys.setswitchinterval(interval)
