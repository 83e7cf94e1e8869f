"""Context extension compared at an equal fine-tune budget: one passkey base model (pretrained at
L0 tokens) extended with each of YaRN, PI, NTK and no scaling (`nanoseek extend --method ...`), the
same steps, batch and fine-tune length for all, then greedy passkey retrieval at --eval-length
(`problems` keys at each depth 0/25/50/75/100%), and a length x depth heatmap of one method up to 32K.

    python benchmarks/passkey.py --fit-tokenizer runs/passkey/tokenizer
    nanoseek pretrain --config configs/pretrain-passkey.yaml   # see its header for the L0 = 256 base
    python benchmarks/passkey.py --base runs/passkey/pretrain/final [--steps 600] [--out DIR]

Every stage is skipped when its output exists (an extend run's final/, an eval's JSON), so an
interrupted run continues where it stopped. Writes OUT/eval-METHOD.json, OUT/heatmap-METHOD.{json,png},
OUT/results.json (every figure) and OUT/report.md (the table). The base model itself is evaluated at
L0 for reference (its context ends there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nanoseek import cli  # noqa: E402
from nanoseek.eval import format_passkey_table, parse_lengths, passkey_eval, plot_passkey_heatmap  # noqa: E402
from nanoseek.data.passkey import Passkey  # noqa: E402
from nanoseek.model.checkpoint import load  # noqa: E402
from nanoseek.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

DEPTHS = [0.0, 25.0, 50.0, 75.0, 100.0]
TARGET = 0.9  # the bar: >= 90% at every depth at 16 x L0


def fit_tokenizer(directory: str, vocab_size: int = 320) -> None:
    """The base model's tokenizer: a byte-level BPE fitted to passkey documents (600 of them, four
    filler sentences each, keys at 0/50/100% depth), one token per digit as every nanoseek BPE."""
    task = Passkey()
    problems = [task.problem_at(4, depth, seed) for seed in range(200) for depth in (0, 50, 100)]
    train_tokenizer([f"{p.prompt} {p.answer}." for p in problems], vocab_size).save(directory)


def extended(args: argparse.Namespace, method: str) -> Path:
    final = Path(args.runs) / f"{args.name}-{method}" / "extend" / "final"
    if not final.exists():
        cli.main(["extend", args.base, f"out_dir={args.runs}", f"name={args.name}-{method}", f"steps={args.steps}",
                  f"data.batch_size={args.batch_size}", f"data.min_fill={args.min_fill}", f"optimizer.lr={args.lr}",
                  "optimizer.warmup_steps=10", f"beta_slow={args.beta_slow}", f"data.pose_length={args.pose_length}",
                  f"logn={str(args.logn).lower()}",
                  "progress=false", "tensorboard=false", "peak_flops=1.6e11", "analysis_problems=0", "log_every=10",
                  f"save_every={args.steps}", "--factor", str(args.factor), "--seq-len", str(args.seq_len),
                  "--method", method])
    return final


def grid(model_dir: Path | str, lengths: list[int], problems: int, path: Path, batch_size: int) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    model = load(model_dir, device="cpu", dtype=torch.float32)
    results = passkey_eval(model, Tokenizer.load(model_dir), lengths, DEPTHS, problems, batch_size=batch_size)
    results["model"] = str(model_dir)
    path.write_text(json.dumps(results, indent=1))
    print(f"{model_dir}\n{format_passkey_table(results)}", flush=True)
    return results


def report(args: argparse.Namespace, base: dict, evals: dict[str, dict], heatmap: dict, out: Path) -> str:
    length = str(args.eval_length)
    depths = evals[next(iter(evals))]["depths"]
    lines = [f"# Passkey retrieval after context extension ({out.name})", "",
             f"Base model: `{args.base}`, pretrained at L0 = {args.l0} tokens; at L0 it retrieves "
             f"{100 * statistics.fmean(base['accuracy'][str(args.l0)].values()):.0f}% "
             f"({base['problems']} keys per depth).",
             f"Fine-tune, identical for every method: {args.steps} steps x {args.batch_size} passkey documents of "
             f"{args.seq_len} tokens ({args.seq_len // args.l0} x L0, each at least {args.min_fill:g} of it), "
             f"lr {args.lr}, scaling factor {args.factor:g} (YaRN beta_slow {args.beta_slow:g}) "
             f"(max_position_embeddings {int(args.l0 * args.factor)})"
             + (f", PoSE positions over {args.pose_length} tokens" if args.pose_length else "")
             + (f", log-n attention beyond {args.seq_len} tokens" if args.logn else "") + ".", "",
             f"## Accuracy at {args.eval_length} tokens ({args.eval_length // args.l0} x L0), "
             f"{evals[next(iter(evals))]['problems']} keys per depth, greedy", "",
             "| method | " + " | ".join(f"{d}%" for d in depths) + " | all | >= 90% at every depth |",
             "|---" * (len(depths) + 3) + "|"]
    for method, results in evals.items():
        cells = results["accuracy"][length]
        lines.append(f"| {method} | " + " | ".join(f"{100 * cells[d]:.0f}" for d in depths)
                     + f" | {100 * statistics.fmean(cells.values()):.0f} | "
                     + ("yes" if min(cells.values()) >= TARGET else "no") + " |")
    lines += ["", f"## {args.heatmap_method}: length x depth ({heatmap['problems']} keys per cell)", "",
              "```", format_passkey_table(heatmap), "```", "",
              f"![heatmap](heatmap-{args.heatmap_method}.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fit-tokenizer", metavar="DIR", help="only write the base model's tokenizer to DIR")
    parser.add_argument("--base", help="the pretrained passkey model folder")
    parser.add_argument("--out", help="results folder, e.g. benchmarks/results/passkey-DATE")
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--name", default="passkey")
    parser.add_argument("--methods", default="yarn,pi,ntk,none")
    parser.add_argument("--l0", type=int, default=256)
    parser.add_argument("--factor", type=float, default=640.0, help="context x factor: 640 x 256 = 160K, as V3's 40 x 4K = 128K")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta-slow", type=float, default=1.0, help="YaRN's beta_slow (the others ignore it)")
    parser.add_argument("--min-fill", type=float, default=0.0, help="shortest fine-tune document / seq-len")
    parser.add_argument("--pose-length", type=int, default=0,
                        help="PoSE: spread each fine-tune row's positions over this many (0: off)")
    parser.add_argument("--logn", action="store_true", help="log-n attention beyond the fine-tune length")
    parser.add_argument("--eval-length", type=int, default=4096)
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--heatmap-method", default="yarn")
    parser.add_argument("--heatmap-lengths", default="1k,4k,16k,32k")
    parser.add_argument("--heatmap-problems", type=int, default=4)
    parser.add_argument("--eval-batch", type=int, default=20)
    args = parser.parse_args()
    if args.fit_tokenizer:
        fit_tokenizer(args.fit_tokenizer)
        return
    if not args.base or not args.out:
        parser.error("--base and --out are required (or --fit-tokenizer DIR alone)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    methods = args.methods.split(",")
    finals = {method: extended(args, method) for method in methods}
    base = grid(args.base, [args.l0], args.problems, out / "eval-base.json", args.eval_batch)
    evals = {method: grid(final, [args.eval_length], args.problems, out / f"eval-{method}.json", args.eval_batch)
             for method, final in finals.items()}
    heatmap = grid(finals[args.heatmap_method], parse_lengths(args.heatmap_lengths), args.heatmap_problems,
                   out / f"heatmap-{args.heatmap_method}.json", args.eval_batch)
    plot_passkey_heatmap(heatmap, str(out / f"heatmap-{args.heatmap_method}.png"))
    (out / "report.md").write_text(report(args, base, evals, heatmap, out))
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "base": base, "evals": evals,
                                                  "heatmap": heatmap}, indent=1))
    print((out / "report.md").read_text())


if __name__ == "__main__":
    main()
