"""The main job: from nothing to an evaluated model and its report, one stage after another.

    nanoseek pipeline                      # tokenizer -> corpus -> pretrain -> eval -> report.md
    nanoseek pipeline pretrain.steps=50    # any config key can be overridden

Every stage is a function `(Run) -> dict` that writes its outputs under runs/NAME/ and returns a
JSON-able summary; a stage whose outputs exist is skipped, so an interrupted pipeline is resumed by
running the same command again (pretraining itself resumes from its last step checkpoint). The
recipe stages (SFT, RL, rejection sampling, distillation) extend STAGES.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.train.config import load_config, to_dict
from nanoseek.train.pretrain import DataConfig, TrainConfig


def _default_pretrain() -> TrainConfig:
    # ~2.6M parameters (1.1M active): big enough to learn 1-2 digit arithmetic from its traces in
    # a few CPU minutes, small enough to get there. 4 MoE layers of 8 experts show the balancing.
    return TrainConfig(
        model={"hidden_size": 128, "intermediate_size": 384, "moe_intermediate_size": 64, "num_hidden_layers": 4,
               "num_attention_heads": 4, "q_lora_rank": 64, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
               "qk_rope_head_dim": 16, "v_head_dim": 16, "n_routed_experts": 8, "n_shared_experts": 1,
               "num_experts_per_tok": 2, "first_k_dense_replace": 1, "num_nextn_predict_layers": 1,
               "max_position_embeddings": 512},
        data=DataConfig(seq_len=256, batch_size=16),
        steps=600, save_every=200, log_every=25,
    )


@dataclass
class PipelineConfig:
    name: str = "nanoseek"
    out_dir: str = "runs"
    seed: int = 0
    tasks: dict[str, list[int]] = field(default_factory=lambda: {"arithmetic": [1, 2], "countdown": [3]})
    tokenizer_vocab_size: int = 512
    tokenizer_problems: int = 300  # train problems per task difficulty the BPE is fitted on
    corpus_problems: int = 3000  # train problems per task difficulty in the pretraining corpus
    eval_problems: int = 50  # held-out problems drawn per task difficulty (repeats are evaluated once)
    max_new_tokens: int = 192
    pretrain: TrainConfig = field(default_factory=_default_pretrain)


@dataclass
class Run:
    config: PipelineConfig
    dir: Path
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / "tokenizer"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    def pretrain_config(self) -> TrainConfig:
        """The pretraining config with the run's own paths filled in."""
        cfg = copy.deepcopy(self.config.pretrain)
        cfg.name, cfg.out_dir, cfg.stage = self.config.name, self.config.out_dir, "pretrain"
        cfg.tokenizer, cfg.data.path, cfg.seed = str(self.tokenizer_dir), str(self.data_dir), self.config.seed
        cfg.analysis_tasks = dict(self.config.tasks)
        return cfg


def _tasks(config: PipelineConfig) -> list:
    """Task objects restricted to the configured difficulties (corpus.task_documents walks
    `task.difficulties`)."""
    from nanoseek.data import get_task

    tasks = []
    for name, levels in config.tasks.items():
        task = copy.copy(get_task(name))
        bad = [d for d in levels if d not in task.difficulties]
        if bad or not levels:
            raise ValueError(f"tasks.{name}: difficulties {levels} must be a non-empty subset of {list(task.difficulties)}")
        task.difficulties = list(levels)
        tasks.append(task)
    return tasks


def _replace_dir(tmp: Path, final: Path) -> None:
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


# ---- stages -------------------------------------------------------------------------------------
def tokenizer_stage(run: Run) -> dict[str, Any]:
    """Byte-level BPE fitted on train problems of every task (prompt and worked solution)."""
    from nanoseek.data import sample
    from nanoseek.tokenizer import Tokenizer, train_tokenizer

    if (run.tokenizer_dir / "tokenizer.json").exists():
        return {"skipped": True, "vocab_size": Tokenizer.load(run.tokenizer_dir).vocab_size}
    cfg = run.config
    texts = [f"{problem.prompt}\n{task.render_solution(problem)}"
             for task in _tasks(cfg) for level in task.difficulties
             for problem in sample(task, "train", cfg.tokenizer_problems, cfg.seed, level)]
    tokenizer = train_tokenizer(texts, cfg.tokenizer_vocab_size)
    tmp = run.tokenizer_dir.with_name("tokenizer.partial")
    tokenizer.save(tmp)
    _replace_dir(tmp, run.tokenizer_dir)
    return {"vocab_size": tokenizer.vocab_size, "texts": len(texts)}


def corpus_stage(run: Run) -> dict[str, Any]:
    """Token shards of train problems: chat-format conversations and plain worked solutions."""
    from nanoseek.data.corpus import INDEX_FILE, build_task_corpus
    from nanoseek.tokenizer import Tokenizer

    if (run.data_dir / INDEX_FILE).exists():
        index = json.loads((run.data_dir / INDEX_FILE).read_text())
        return {"skipped": True, "tokens": index["total_tokens"], "documents": index["documents"]}
    tmp = run.data_dir.with_name("data.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    index = build_task_corpus(Tokenizer.load(run.tokenizer_dir), tmp, _tasks(run.config),
                              run.config.corpus_problems, seed=run.config.seed)
    _replace_dir(tmp, run.data_dir)
    return {"tokens": index["total_tokens"], "documents": index["documents"]}


def pretrain_stage(run: Run) -> dict[str, Any]:
    """Pretrain the MoE model on the corpus (resuming from its last checkpoint if interrupted)."""
    from nanoseek.train.metrics import read_metrics
    from nanoseek.train.pretrain import pretrain

    cfg = run.pretrain_config()
    final = cfg.stage_dir / "final"
    skipped = final.exists()
    if not skipped:
        pretrain(cfg, resume=True)
    records = read_metrics(cfg.stage_dir / "metrics.jsonl")
    last = records[-10:]
    summary: dict[str, Any] = {"model_dir": str(final), "steps": cfg.steps, "skipped": skipped,
                               "tokens": records[-1]["tokens"] if records else 0}
    if last:
        for key in ("loss", "ce", "mtp", "aux", "tok_per_s", "mfu", "imbalance"):
            values = [r[key] for r in last if r.get(key) is not None]
            if values:
                summary[f"final_{key}"] = sum(values) / len(values)
        summary["first_loss"] = records[0]["loss"]
    spec = cfg.stage_dir / "specialisation.json"
    if spec.exists():
        summary["specialisation"] = [
            {"layer": layer["layer"],
             **{kind: {k: layer[kind][k] for k in ("nmi", "nmi_shuffled")} for kind in ("task", "segment")}}
            for layer in json.loads(spec.read_text())["layers"]]
    return summary


def evaluate_stage(run: Run) -> dict[str, Any]:
    """Greedy accuracy on held-out (eval-split) problems per task and difficulty, strict and lenient."""
    import torch

    from nanoseek.data import sample
    from nanoseek.generate import generate
    from nanoseek.model.checkpoint import load
    from nanoseek.tokenizer import Tokenizer

    stage_dir = run.pretrain_config().stage_dir
    out = stage_dir / "eval.json"
    if out.exists():
        return {**json.loads(out.read_text()), "skipped": True}
    model = load(stage_dir / "final", device="cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = Tokenizer.load(stage_dir / "final")
    cfg = run.config
    results: dict[str, Any] = {"tasks": {}, "samples": []}
    for task in _tasks(cfg):
        per_level = {}
        for level in task.difficulties:
            # Distinct problems only: small spaces (1-digit arithmetic has 300 problems, 5% held out)
            # would otherwise count the same few problems many times.
            problems = list(dict.fromkeys(sample(task, "eval", cfg.eval_problems, cfg.seed, level)))
            prompts = [tokenizer.render_prompt(task.conversation(p)) for p in problems]
            completions = []
            for start in range(0, len(prompts), 64):
                outputs = generate(model, prompts[start:start + 64], cfg.max_new_tokens, temperature=0.0,
                                   eos_token_id=tokenizer.eos_id)
                completions += [tokenizer.decode([t for t in ids if t != tokenizer.eos_id]) for ids in outputs]
            strict = [task.verify(p, c, strict=True) for p, c in zip(problems, completions)]
            lenient = [task.verify(p, c, strict=False) for p, c in zip(problems, completions)]
            per_level[str(level)] = {"n": len(problems), "strict": sum(strict) / len(problems),
                                     "lenient": sum(lenient) / len(problems)}
            results["samples"] += [{"task": task.name, "difficulty": level, "prompt": p.prompt,
                                    "expected": p.answer, "completion": c, "correct": ok}
                                   for p, c, ok in list(zip(problems, completions, strict))[:2]]
        n = sum(v["n"] for v in per_level.values())
        results["tasks"][task.name] = {
            "difficulties": per_level,
            "strict": sum(v["strict"] * v["n"] for v in per_level.values()) / n,
            "lenient": sum(v["lenient"] * v["n"] for v in per_level.values()) / n,
        }
    out.write_text(json.dumps(results, indent=1))
    return results


Stage = Callable[[Run], dict[str, Any]]
STAGES: list[tuple[str, Stage]] = [
    ("tokenizer", tokenizer_stage),
    ("corpus", corpus_stage),
    ("pretrain", pretrain_stage),
    ("eval", evaluate_stage),
]


def write_report(run: Run) -> Path:
    """report.json (every stage's summary) and report.md, with the plots and the chat command."""
    r = run.results
    (run.dir / "report.json").write_text(json.dumps({"config": to_dict(run.config), "stages": r}, indent=1))
    pre, ev = r["pretrain"], r["eval"]
    chat_dir = Path(pre["model_dir"])
    lines = [f"# nanoseek pipeline: {run.config.name}", ""]
    lines += ["## Stages", "", "| stage | wall time | summary |", "|---|---|---|"]
    for name, _ in STAGES:
        s = r[name]
        brief = {k: v for k, v in s.items() if isinstance(v, (int, float, str, bool)) and k != "wall_s"}
        wall = "skipped (done earlier)" if s.get("skipped") else f"{s['wall_s']:.1f} s"
        lines.append(f"| {name} | {wall} | {', '.join(f'{k}={_fmt(v)}' for k, v in brief.items())} |")
    lines += ["", "## Held-out accuracy (greedy)", "",
              "Strict: the whole completion is `<think>...</think><answer>...</answer>` and the answer is right. "
              "Lenient: a right answer can be found anywhere in the completion.", "",
              "| task | difficulty | distinct problems | strict | lenient |", "|---|---|---|---|---|"]
    for task, t in ev["tasks"].items():
        for level, v in t["difficulties"].items():
            lines.append(f"| {task} | {level} | {v['n']} | {100 * v['strict']:.1f}% | {100 * v['lenient']:.1f}% |")
        lines.append(f"| **{task}** | all | {sum(v['n'] for v in t['difficulties'].values())} | "
                     f"**{100 * t['strict']:.1f}%** | **{100 * t['lenient']:.1f}%** |")
    lines += ["", "## Pretraining", "",
              f"{pre['steps']} steps, {pre['tokens']:,} tokens; loss {_fmt(pre.get('first_loss'))} -> "
              f"{_fmt(pre.get('final_loss'))} (mean of the last 10 steps), expert imbalance (max/mean load) "
              f"{_fmt(pre.get('final_imbalance'))}.", "",
              "![loss](pretrain/loss.png)", "", "![expert load](pretrain/expert_load.png)", ""]
    if pre.get("specialisation"):
        lines += ["### Do experts specialise?", "",
                  "Normalised mutual information between a token's label and its routed experts, next to the "
                  "same with labels shuffled across tokens (chance level):", "",
                  "| layer | NMI(task) | shuffled | NMI(prompt/reasoning/answer) | shuffled |", "|---|---|---|---|---|"]
        for layer in pre["specialisation"]:
            lines.append(f"| {layer['layer']} | {layer['task']['nmi']:.4f} | {layer['task']['nmi_shuffled']:.4f} | "
                         f"{layer['segment']['nmi']:.4f} | {layer['segment']['nmi_shuffled']:.4f} |")
        lines += ["", "![expert specialisation](pretrain/expert_specialisation.png)", ""]
    lines += ["## Samples", ""]
    for s in ev["samples"]:
        lines += [f"**{s['task']} (difficulty {s['difficulty']})**: {s['prompt']} (expected `{s['expected']}`, "
                  f"{'correct' if s['correct'] else 'wrong'})", "", "```", s["completion"], "```", ""]
    lines += ["## Next", "", "Chat with the model:", "", "```", f"nanoseek chat {chat_dir}", "```", ""]
    path = run.dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def run_pipeline(config: PipelineConfig) -> Path:
    """Run (or resume) every stage, then write the report; returns report.md."""
    run = Run(config, Path(config.out_dir) / config.name)
    run.dir.mkdir(parents=True, exist_ok=True)
    for name, stage in STAGES:
        print(f"== {name}: {(stage.__doc__ or '').splitlines()[0]}", flush=True)
        start = time.perf_counter()
        result = stage(run)
        result["wall_s"] = time.perf_counter() - start
        run.results[name] = result
        status = "skipped, already done" if result.get("skipped") else f"done in {result['wall_s']:.1f} s"
        print(f"== {name}: {status}", flush=True)
    report = write_report(run)
    for task, t in run.results["eval"]["tasks"].items():
        print(f"{task}: strict {100 * t['strict']:.1f}%, lenient {100 * t['lenient']:.1f}% on held-out problems")
    print(f"report: {report}")
    print(f"chat with the model: nanoseek chat {run.results['pretrain']['model_dir']}")
    return report


def load_pipeline_config(path: str | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    return load_config(PipelineConfig, path, overrides)
