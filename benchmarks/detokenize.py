"""Per-token cost of turning generated tokens into text: incremental against whole-text decoding.

    python benchmarks/detokenize.py [--tokens 4000] [--repeats 3]

Protocol: a byte-level BPE (vocab 2000) trained in-process on English and multi-byte text; the token
stream is that text encoded, so characters split across tokens occur. Two cases, each token fed one at
a time to `update`, as the server does: "stop strings" (two that never match, so every token is
searched) is the scheduler thread's work per token; "streaming" (no stop strings) is a stream's work per
notification: update, then read the whole text (which joins the final text's pieces: a copy, O(n)). `WholeTextDetokenizer` is the approach the engine used before (decode all
tokens, search all text, at every token), measured in the same run. Per-token time is the mean over
tokens 1-500 (early) and the last 500 (late), median of the repeats; flat means late/early near 1.
The last line of output is one JSON object holding every figure of the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nanoseek.infer.detokenize import Detokenizer, WholeTextDetokenizer  # noqa: E402
from nanoseek.tokenizer import train_tokenizer  # noqa: E402

SENTENCES = ["The quick brown fox jumps over the lazy dog while the cat watches from the window.",
             "Numbers such as 1234 and 5678 appear in tables, lists and reports every day.",
             "Héllo wörld: ça va? Naïve café owners serve crème brûlée to their guests.",
             "日本語のテキストと中文文本混合在一起。", "Emoji 😀🎉🚀 carry four bytes each in UTF-8."]
STOP = ["<|stop here|>", "THE END."]
WINDOW = 500


def per_token_times(detokenizer: Detokenizer | WholeTextDetokenizer, tokens: list[int], read: bool) -> list[float]:
    fed, times = [], []
    for token in tokens:
        fed.append(token)
        started = time.perf_counter()
        hit = detokenizer.update(fed)
        if read:
            detokenizer.text  # noqa: B018 (a stream reads the whole text at each notification)
        times.append(time.perf_counter() - started)
        assert hit is None, "a stop string matched: the benchmark needs every token searched"
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tokenizer = train_tokenizer(SENTENCES * 50, vocab_size=2000)
    tokens = []
    while len(tokens) < args.tokens:
        tokens += tokenizer.encode(" ".join(SENTENCES))
    tokens = tokens[:args.tokens]
    print(f"{args.tokens} tokens, {len(tokenizer.decode(tokens))} characters, stop strings {STOP}, "
          f"median of {args.repeats}")
    print(f"{'case':<13} {'approach':<12} | {'early us/tok':>12} {'late us/tok':>11} {'late/early':>10} | "
          f"{'whole/incremental (late)':>24}")
    results = {"tokens": args.tokens, "repeats": args.repeats, "cases": {}}
    for case, stop in (("stop strings", STOP), ("streaming", [])):
        rows = {}
        for name, kind in (("incremental", Detokenizer), ("whole text", WholeTextDetokenizer)):
            runs = [per_token_times(kind(tokenizer.decode, stop), tokens, read=not stop) for _ in range(args.repeats)]
            early = statistics.median(sum(r[:WINDOW]) / WINDOW for r in runs) * 1e6
            late = statistics.median(sum(r[-WINDOW:]) / WINDOW for r in runs) * 1e6
            rows[name] = {"early_us": early, "late_us": late, "late_over_early": late / early,
                          "total_s": statistics.median(sum(r) for r in runs)}
        fast, slow = rows["incremental"], rows["whole text"]
        fast["whole_over_incremental_late"] = slow["late_us"] / fast["late_us"]
        for name, row in rows.items():
            ratio = f"{row['whole_over_incremental_late']:.1f}x" if "whole_over_incremental_late" in row else ""
            print(f"{case:<13} {name:<12} | {row['early_us']:>12.1f} {row['late_us']:>11.1f} "
                  f"{row['late_over_early']:>10.2f} | {ratio:>24}")
        final = Detokenizer(tokenizer.decode, stop)
        final.update(tokens)
        assert final.text == tokenizer.decode(tokens)
        results["cases"][case] = rows
    print(json.dumps(results))


if __name__ == "__main__":
    main()
