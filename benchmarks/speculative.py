"""MTP self-speculative decoding against plain decoding on a trained model, batch 1, one run.

    python benchmarks/speculative.py runs/nanoseek/grpo/final [--threads 1] [--prompts 8] [--repeats 3]
        [--draft-tokens 1 2] [--temperatures 0 0.7] [--modes eager compiled]

Protocol: held-out arithmetic problems ("What is 347 + 589?", difficulty 3 by default) rendered with
the model's chat template, generated one at a time (batch 1) to EOS or --new-tokens. In each mode
(eager: `Engine()`; compiled: `Engine(compile=True)`, its graphs compiled by `warm_up` before timing)
a plain engine and one speculative engine per --draft-tokens value generate every prompt in turn, so
the engines alternate A/B/A/B through the run and a change in the machine's load falls on all of
them alike; each engine's tokens/s is its tokens over its summed wall time (prefill included), and
the ratio is against the plain engine of the same mode in the same run. Sampled runs seed each prompt
alike for every engine. Reported per row: tokens/s, the ratio, acceptance rate (accepted / drafted
over the run), tokens per verification step, answers correct (task.verify), and for greedy runs
whether the tokens equal plain greedy decoding. The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nanoseek.data.arithmetic import Arithmetic  # noqa: E402
from nanoseek.data.task import prompt_ids, sample  # noqa: E402
from nanoseek.infer import Engine, SamplingParams  # noqa: E402
from nanoseek.model.checkpoint import load  # noqa: E402
from nanoseek.tokenizer import load_tokenizer  # noqa: E402


def run(engines: dict[str, Engine], prompts: list[list[int]], params: list[SamplingParams], repeats: int) -> dict:
    """Every prompt through every engine in turn, `repeats` times; per engine: seconds, tokens, the
    completions of the last repeat, and summed draft statistics."""
    out = {name: {"seconds": 0.0, "tokens": 0, "drafted": 0, "accepted": 0, "verified_steps": 0, "emitted": 0,
                  "completions": []}
           for name in engines}
    for repeat in range(repeats):
        for prompt, p in zip(prompts, params):
            for name, engine in engines.items():
                started = time.perf_counter()
                completion = engine.generate([prompt], p)[0][0]
                row = out[name]
                row["seconds"] += time.perf_counter() - started
                row["tokens"] += len(completion.tokens)
                if repeat == repeats - 1:
                    row["completions"].append(completion)
                stats = engine.last_speculative_stats
                if stats:
                    row["drafted"] += stats["drafted"]
                    row["accepted"] += stats["accepted"]
                    steps = round(stats["drafted"] / engine.draft_tokens)  # row-steps: one row here
                    row["verified_steps"] += steps
                    row["emitted"] += round(stats["tokens_per_step"] * steps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a model folder with an MTP module (num_nextn_predict_layers >= 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--difficulty", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.7])
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model), load_tokenizer(args.model)
    if not len(model.mtp):
        raise SystemExit(f"{args.model} has no MTP module to draft with")
    task = Arithmetic()
    problems = list(sample(task, "eval", args.prompts, seed=0, difficulty=args.difficulty))
    prompts = [prompt_ids(tokenizer, task, problem) for problem in problems]
    eos = sorted(set(model.config.eos_token_ids) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set()))
    print(f"torch {torch.__version__}, {args.threads} threads (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}, "
          f"load {os.getloadavg()[0]:.1f}), {model.num_parameters()['total'] / 1e6:.2f}M parameters "
          f"(MTP {model.num_parameters()['mtp'] / 1e6:.2f}M), {len(prompts)} prompts of {len(prompts[0])} tokens, "
          f"e.g. {problems[0].prompt!r}")
    results = {"model": args.model, "threads": args.threads, "torch": torch.__version__,
               "load_average_1min_start": os.getloadavg()[0], "prompts": len(prompts), "repeats": args.repeats,
               "new_tokens": args.new_tokens, "rows": []}
    print(f"{'mode':>8} {'T':>4} {'engine':>7} | {'tok/s':>7} {'ratio':>6} | {'accepted':>8} {'tok/step':>8} | "
          f"{'correct':>7} {'=greedy':>7} | {'warm-up s':>9}")
    for mode in args.modes:
        compiled = mode == "compiled"
        engines = {"plain": Engine(model, eos, tokenizer.decode, compile=compiled)}
        for k in args.draft_tokens:
            engines[f"spec k={k}"] = Engine(model, eos, tokenizer.decode, compile=compiled, speculative=True,
                                            draft_tokens=k)
        warm_up = {}
        for name, engine in engines.items():
            started = time.perf_counter()
            engine.warm_up(1)
            # The graphs of a real prompt's first steps (and, eager, oneDNN's packed weights).
            engine.generate([prompts[0]], SamplingParams(max_new_tokens=4))
            warm_up[name] = time.perf_counter() - started
        for temperature in args.temperatures:
            params = [SamplingParams(max_new_tokens=args.new_tokens, temperature=temperature, seed=i)
                      for i in range(len(prompts))]
            out = run(engines, prompts, params, args.repeats)
            plain = out["plain"]
            for name, row in out.items():
                texts = [c.text for c in row["completions"]]
                entry = {"mode": mode, "temperature": temperature, "engine": name,
                         "tok_s": row["tokens"] / row["seconds"], "seconds": row["seconds"], "tokens": row["tokens"],
                         "ratio": (row["tokens"] / row["seconds"]) / (plain["tokens"] / plain["seconds"]),
                         "correct": sum(task.verify(pr, t) for pr, t in zip(problems, texts)) / len(problems),
                         "warmup_s": warm_up[name], "recompiles": engines[name].decode_recompiles}
                if name != "plain":
                    entry.update(drafted=row["drafted"], accepted=row["accepted"],
                                 acceptance_rate=row["accepted"] / max(row["drafted"], 1),
                                 tokens_per_step=row["emitted"] / max(row["verified_steps"], 1))
                if temperature == 0:
                    entry["identical_to_greedy"] = ([c.tokens for c in row["completions"]]
                                                    == [c.tokens for c in plain["completions"]])
                results["rows"].append(entry)
                fmt = lambda key, spec: format(entry[key], spec) if key in entry else "-"  # noqa: E731
                print(f"{mode:>8} {temperature:>4} {name:>7} | {entry['tok_s']:>7.1f} {entry['ratio']:>6.2f} | "
                      f"{fmt('acceptance_rate', '>8.1%')} {fmt('tokens_per_step', '>8.2f')} | {entry['correct']:>7.0%} "
                      f"{str(entry.get('identical_to_greedy', '-')):>7} | {entry['warmup_s']:>9.1f}", flush=True)
    results["load_average_1min_end"] = os.getloadavg()[0]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
