"""The main job: the DeepSeek-R1 recipe from nothing to an evaluated set of models and their report.

    nanoseek pipeline                      # tokenizer -> corpus -> pretrain -> sft -> grpo (+ arms) -> report
    nanoseek pipeline --preset smoke       # every stage on a tiny budget, in a few minutes
    nanoseek pipeline grpo.steps=80        # any config key can be overridden

Data roles (R1 §2): the base model is pretrained on plain-text worked solutions (never the chat
format or the <think>/<answer> tags); cold-start SFT teaches the R1 format from 1,500
train-split conversations; GRPO's prompts are train-split problems; every stage is evaluated on
eval-split problems only. Two control arms make the GRPO result mean something: `sft_control` (the
SFT model trained on with more SFT data for GRPO's wall time) and `grpo_zero` (R1-Zero: GRPO
straight from the base model with the R1-Zero prompt, no SFT).

Every stage is a function `(Run) -> dict` that writes its outputs under runs/NAME/ and a
summary.json; a stage whose outputs exist is skipped and its summary reloaded, so an interrupted
pipeline is resumed by running the same command again (training stages also resume from their
last step checkpoint).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.data import tasks_at
from nanoseek.eval import EvalConfig
from nanoseek.train.config import TrainConfigError, apply_overrides, from_dict, read_yaml, to_dict
from nanoseek.train.distill import DistillConfig
from nanoseek.train.grpo import GRPOConfig
from nanoseek.train.optim import OptimizerConfig
from nanoseek.train.pretrain import DataConfig, TrainConfig
from nanoseek.train.sample import SampleConfig
from nanoseek.train.sft import SFTConfig
from nanoseek.train.state import atomic_write_text

MODEL_STAGES = ("pretrain", "sft", "sft_control", "grpo", "grpo_zero", "sft2", "grpo2", "student_rl",
                "student_distill")


def _default_pretrain() -> TrainConfig:
    # ~2.6M parameters (1.1M active): 4 MoE layers of 8 routed experts + 1 shared, MLA, MTP.
    return TrainConfig(
        model={"hidden_size": 128, "intermediate_size": 384, "moe_intermediate_size": 64, "num_hidden_layers": 4,
               "num_attention_heads": 4, "q_lora_rank": 64, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
               "qk_rope_head_dim": 16, "v_head_dim": 16, "n_routed_experts": 8, "n_shared_experts": 1,
               "num_experts_per_tok": 2, "first_k_dense_replace": 1, "num_nextn_predict_layers": 1,
               "max_position_embeddings": 512},
        data=DataConfig(seq_len=256, batch_size=16),
        steps=800, save_every=200, log_every=50,
    )


def _default_student() -> dict[str, Any]:
    # The same family at under a third of the teacher's active parameters: half the width, 3 layers.
    return {"hidden_size": 64, "intermediate_size": 192, "moe_intermediate_size": 32, "num_hidden_layers": 3,
            "num_attention_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8, "n_shared_experts": 1,
            "num_experts_per_tok": 2, "first_k_dense_replace": 1, "num_nextn_predict_layers": 1,
            "max_position_embeddings": 512}


def _default_sample() -> SampleConfig:
    # R1 stage 3 samples a broad prompt set and keeps the verified answers; two per prompt at most
    # keeps easy prompts from crowding the set.
    return SampleConfig(tasks={"arithmetic": [2, 3]}, problems=400, samples=4, max_new_tokens=160, keep_per_prompt=2)


def _default_sft() -> SFTConfig:
    return SFTConfig(data=DataConfig(seq_len=256, batch_size=16), steps=300, save_every=0, log_every=50,
                     optimizer=OptimizerConfig(lr=1e-3, warmup_steps=5), eval_every=0)


def _default_grpo() -> GRPOConfig:
    # Accuracy-led rewards: cold-start SFT already writes the format (~100%). The SFT policy is nearly
    # deterministic (entropy ~0.07 nats/token at T=0.8), so most groups score all alike: T=1 widens them.
    # DAPO's dynamic sampling (refill the batch with groups that carry a gradient) is off by default: it
    # about doubles the rollouts for no measured gain here (docs/recipe.md). On train-split rollouts, lr 3e-4
    # (even with warmup) and 5e-4 lowered the reward within 10-20 steps; 1e-4 with a short warmup did not.
    return GRPOConfig(tasks={"arithmetic": [2, 3]}, steps=30, prompts=32, group_size=8, save_every=10,
                      temperature=1.0, dynamic_sampling=False, rewards={"accuracy": 1.0, "format": 0.25},
                      optimizer=OptimizerConfig(lr=1e-4, min_lr_ratio=1.0, weight_decay=0.0, warmup_steps=5,
                                                betas=(0.9, 0.99)))


@dataclass
class PipelineConfig:
    name: str = "nanoseek"
    out_dir: str = "runs"
    seed: int = 0
    # Base data: task -> difficulties of the pretraining corpus (arithmetic: digits per operand;
    # difficulty 1 is the single-digit facts, which are never held out).
    tasks: dict[str, list[int]] = field(default_factory=lambda: {"arithmetic": [1, 2, 3]})
    tokenizer_vocab_size: int = 512
    tokenizer_problems: int = 300  # per task difficulty
    corpus_problems: int = 8000  # per task difficulty, train split only
    # Cold-start SFT data: a user's JSONL of {"messages": [...]}, or built-in train-split conversations.
    sft_data: str = ""
    sft_tasks: dict[str, list[int]] = field(default_factory=lambda: {"arithmetic": [1, 2, 3]})
    sft_problems: int = 500  # per SFT task difficulty
    # Evaluation: eval-split problems only, `eval_problems` distinct ones per task difficulty.
    eval_tasks: dict[str, list[int]] = field(default_factory=lambda: {"arithmetic": [2, 3]})
    eval_problems: int = 320  # arithmetic 2 has 180 eval problems in all: 180 + 320 = 500 distinct
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(max_new_tokens=160))
    pretrain: TrainConfig = field(default_factory=_default_pretrain)
    sft: SFTConfig = field(default_factory=_default_sft)
    grpo: GRPOConfig = field(default_factory=_default_grpo)
    grpo_zero: GRPOConfig = field(default_factory=lambda: GRPOConfig(zero=True, steps=10, save_every=5))
    # Second round (R1 stage 3): rejection-sample the GRPO model, SFT the base model on the accepted
    # answers plus the cold-start set (sft2, with the `sft` settings and `sft2_steps`), GRPO again (grpo2).
    sample: SampleConfig = field(default_factory=_default_sample)
    sft2_steps: int = 600
    grpo2: GRPOConfig = field(default_factory=_default_grpo)
    # Students: one smaller architecture, pretrained like the teacher (`student_pretrain_steps`), then
    # either distilled from the final teacher (grpo2) or given cold-start SFT and GRPO of its own, the
    # two post-training runs on the same wall-time budget.
    student: dict[str, Any] = field(default_factory=_default_student)
    student_pretrain_steps: int = 600
    # student_rl's GRPO runs the teacher's `grpo` settings for this many steps; its post-training wall
    # time (SFT + GRPO) is also student_distill's budget, so this sets the compute of both arms.
    student_grpo_steps: int = 75
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(
        data=DataConfig(seq_len=256, batch_size=16), save_every=0, log_every=50, eval_every=0,
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=5)))


# `nanoseek pipeline --preset smoke`: every stage on a budget of a few minutes (CI runs it).
PRESETS: dict[str, list[str]] = {
    "default": [],
    "smoke": [
        "name=smoke", "tasks={arithmetic: [1, 2]}", "sft_tasks={arithmetic: [1, 2]}", "eval_tasks={arithmetic: [2]}",
        "tokenizer_problems=60", "corpus_problems=400", "sft_problems=48", "eval_problems=24",
        "eval.samples=4", "eval.max_new_tokens=64",
        "pretrain.model={hidden_size: 64, intermediate_size: 128, moe_intermediate_size: 32, num_hidden_layers: 2, "
        "num_attention_heads: 2, q_lora_rank: 32, kv_lora_rank: 16, qk_nope_head_dim: 16, qk_rope_head_dim: 8, "
        "v_head_dim: 16, n_routed_experts: 4, n_shared_experts: 1, num_experts_per_tok: 2, first_k_dense_replace: 1, "
        "num_nextn_predict_layers: 1, max_position_embeddings: 256}",
        "pretrain.steps=300", "pretrain.save_every=50", "pretrain.data.seq_len=128", "pretrain.analysis_problems=8",
        "sft.steps=150", "sft.data.batch_size=8", "sft.optimizer.lr=3e-3",
        "grpo.tasks={arithmetic: [2]}", "grpo.steps=20", "grpo.prompts=8", "grpo.group_size=4",
        "grpo.max_new_tokens=64", "grpo.save_every=5", "grpo.dynamic_sampling=false",
        # a signal a 20-step run follows: the smoke SFT model misses the format ~1 time in 4
        "grpo.rewards={accuracy: 1.0, format: 1.0}", "grpo.optimizer.lr=3e-4", "grpo.optimizer.warmup_steps=2",
        "grpo_zero.steps=4", "grpo_zero.prompts=4", "grpo_zero.group_size=4", "grpo_zero.max_new_tokens=64",
        "grpo_zero.save_every=2",
        "sample.tasks={arithmetic: [2]}", "sample.problems=24", "sample.max_new_tokens=64", "sft2_steps=100",
        "grpo2.tasks={arithmetic: [2]}", "grpo2.steps=6", "grpo2.prompts=8", "grpo2.group_size=4",
        "grpo2.max_new_tokens=64", "grpo2.save_every=3", "grpo2.dynamic_sampling=false",
        "student={hidden_size: 32, intermediate_size: 64, moe_intermediate_size: 16, num_hidden_layers: 2, "
        "num_attention_heads: 2, q_lora_rank: 16, kv_lora_rank: 16, qk_nope_head_dim: 8, qk_rope_head_dim: 8, "
        "v_head_dim: 8, n_routed_experts: 4, n_shared_experts: 1, num_experts_per_tok: 2, first_k_dense_replace: 1, "
        "num_nextn_predict_layers: 1, max_position_embeddings: 256}",
        "student_pretrain_steps=150", "student_grpo_steps=20", "distill.data.batch_size=8", "distill.optimizer.lr=3e-3",
    ],
}


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

    def model_dir(self, stage: str) -> Path:
        return self.dir / stage / "final"

    def pretrain_config(self) -> TrainConfig:
        """The pretraining config with the run's own paths filled in."""
        cfg = copy.deepcopy(self.config.pretrain)
        cfg.name, cfg.out_dir, cfg.stage = self.config.name, self.config.out_dir, "pretrain"
        cfg.tokenizer, cfg.data.path, cfg.seed = str(self.tokenizer_dir), str(self.data_dir), self.config.seed
        cfg.analysis_tasks = dict(self.config.eval_tasks)
        return cfg

    def student_pretrain_config(self) -> TrainConfig:
        cfg = self.pretrain_config()
        cfg.stage, cfg.model, cfg.steps = "student_pretrain", dict(self.config.student), self.config.student_pretrain_steps
        return cfg

    def sft_config(self, stage: str, data: Path, init: str, steps: int | None = None) -> SFTConfig:
        cfg = copy.deepcopy(self.config.sft)
        cfg.name, cfg.out_dir, cfg.stage, cfg.seed = self.config.name, self.config.out_dir, stage, self.config.seed
        cfg.init, cfg.tokenizer, cfg.data.path = str(self.model_dir(init)), "", str(data)
        cfg.analysis_tasks = dict(self.config.eval_tasks)
        if steps is not None:
            cfg.steps = steps
        return cfg

    def grpo_config(self, stage: str, init: str) -> GRPOConfig:
        cfg = copy.deepcopy({"grpo_zero": self.config.grpo_zero, "grpo2": self.config.grpo2}.get(stage, self.config.grpo))
        cfg.name, cfg.out_dir, cfg.stage, cfg.seed = self.config.name, self.config.out_dir, stage, self.config.seed
        cfg.init = str(self.model_dir(init))
        return cfg


def _replace_dir(tmp: Path, final: Path) -> None:
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


# ---- stages -------------------------------------------------------------------------------------
def tokenizer_stage(run: Run) -> dict[str, Any]:
    """Byte-level BPE fitted on train problems: plain worked solutions and the R1-format answers."""
    from nanoseek.data import sample
    from nanoseek.data.corpus import base_text
    from nanoseek.tokenizer import Tokenizer, train_tokenizer

    if (run.tokenizer_dir / "tokenizer.json").exists():
        return {"skipped": True, "vocab_size": Tokenizer.load(run.tokenizer_dir).vocab_size}
    cfg = run.config
    texts = [text for task in tasks_at(cfg.tasks) for level in task.difficulties
             for problem in sample(task, "train", cfg.tokenizer_problems, cfg.seed, level)
             for text in (base_text(task, problem), task.render_solution(problem))]
    tokenizer = train_tokenizer(texts, cfg.tokenizer_vocab_size)
    tmp = run.tokenizer_dir.with_name("tokenizer.partial")
    tokenizer.save(tmp)
    _replace_dir(tmp, run.tokenizer_dir)
    return {"vocab_size": tokenizer.vocab_size, "texts": len(texts)}


def corpus_stage(run: Run) -> dict[str, Any]:
    """Base data: token shards of train problems as plain-text worked solutions, checked against the
    eval split (no held-out prompt may occur in it)."""
    from nanoseek.data.corpus import INDEX_FILE, TokenShardDataset, build_task_corpus, find_contamination
    from nanoseek.eval import eval_suites
    from nanoseek.tokenizer import Tokenizer

    out = run.data_dir / INDEX_FILE
    skipped = out.exists()
    if not skipped:
        tmp = run.data_dir.with_name("data.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        build_task_corpus(Tokenizer.load(run.tokenizer_dir), tmp, tasks_at(run.config.tasks),
                          run.config.corpus_problems, seed=run.config.seed)
        _replace_dir(tmp, run.data_dir)
    index = json.loads(out.read_text())
    held_out = [p for _, _, problems in eval_suites(run.config.eval_tasks, run.config.eval_problems, run.config.seed)
                for p in problems]
    contaminated = find_contamination(TokenShardDataset(run.data_dir), Tokenizer.load(run.tokenizer_dir), held_out)
    if contaminated:
        raise RuntimeError(f"{len(contaminated)} held-out prompts occur in the corpus, e.g. {contaminated[0].prompt!r}")
    return {"tokens": index["total_tokens"], "documents": index["documents"], "eval_prompts_checked": len(held_out),
            "eval_prompts_in_corpus": 0, "skipped": skipped}


def sft_data_stage(run: Run) -> dict[str, Any]:
    """Cold-start SFT conversations (R1 format, train split; or the user's file) and the control
    arm's extra conversations (other train problems of the same tasks)."""
    from nanoseek.train.sft import read_conversations, task_conversations, write_conversations

    cfg, cold, more = run.config, run.data_dir / "sft.jsonl", run.data_dir / "sft_control.jsonl"
    skipped = cold.exists() and more.exists()
    if not skipped:
        tasks = tasks_at(cfg.sft_tasks)
        if cfg.sft_data:
            write_conversations(cold, read_conversations(cfg.sft_data))
        else:
            write_conversations(cold, task_conversations(tasks, cfg.sft_problems, cfg.seed))
        # Ten times the cold-start set, drawn with another seed: the control arm never runs out.
        write_conversations(more, task_conversations(tasks, 10 * cfg.sft_problems, cfg.seed + 1))
    return {"cold_start": sum(1 for _ in cold.open()), "control": sum(1 for _ in more.open()),
            "source": cfg.sft_data or "built-in", "skipped": skipped}


def _train_stage(run: Run, stage: str, train: Callable[[], Path], eval_template: str = "chat") -> dict[str, Any]:
    """Train (or resume) a model stage, then evaluate its final/ on the held-out problems. The
    summary, with the training wall time, is kept in the stage's summary.json."""
    summary_path = run.dir / stage / "summary.json"
    if summary_path.exists():
        return {**json.loads(summary_path.read_text()), "skipped": True}
    started = time.perf_counter()
    final = train()
    train_s = time.perf_counter() - started
    summary = {"model_dir": str(final), "train_s": train_s, **_evaluate(run, final, eval_template, stage)}
    atomic_write_text(summary_path, json.dumps(summary, indent=1))
    return summary


def _evaluate(run: Run, model_dir: Path, template: str, stage: str) -> dict[str, Any]:
    import torch

    from nanoseek.eval import eval_suites, evaluate
    from nanoseek.model.checkpoint import load
    from nanoseek.tokenizer import Tokenizer

    model = load(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    counts = model.num_parameters()
    config = copy.deepcopy(run.config.eval)
    config.template, config.seed = template, run.config.seed
    suites = eval_suites(run.config.eval_tasks, run.config.eval_problems, run.config.seed)
    results = evaluate(model, Tokenizer.load(model_dir), suites, config)
    (run.dir / stage / f"eval-{template}.json").write_text(json.dumps(results, indent=1))
    overall = results["overall"]
    k = config.samples
    return {**{key: overall[key] for key in overall}, "pass@8": overall.get(f"pass@{k}"),
            "maj@8": overall.get(f"maj@{k}"), "eval_template": template, "eval_s": results["wall_s"],
            "params_total": counts["total"], "params_active": counts["active"],
            "tasks": {name: t["difficulties"] for name, t in results["tasks"].items()},
            "samples": results["samples"]}


def pretrain_stage(run: Run) -> dict[str, Any]:
    """Pretrain the MoE base model on the base data (plain worked solutions), then evaluate it on the
    problem line alone (what it knows, scored leniently) and with the R1-Zero prompt (grpo_zero's
    starting point); it has never seen the chat format or the tags."""
    from nanoseek.train.metrics import read_metrics
    from nanoseek.train.pretrain import pretrain

    cfg = run.pretrain_config()
    summary = _train_stage(run, "pretrain", lambda: pretrain(cfg, resume=True), eval_template="plain")
    zero_path = run.dir / "pretrain" / "summary-zero.json"
    if not zero_path.exists():
        atomic_write_text(zero_path, json.dumps(_evaluate(run, run.model_dir("pretrain"), "zero", "pretrain"), indent=1))
    summary["zero"] = json.loads(zero_path.read_text())
    records = read_metrics(cfg.stage_dir / "metrics.jsonl")
    if records:
        summary.update(steps=cfg.steps, tokens=records[-1]["tokens"], first_loss=records[0]["loss"],
                       final_loss=sum(r["loss"] for r in records[-10:]) / len(records[-10:]),
                       final_imbalance=records[-1]["imbalance"])
    spec = cfg.stage_dir / "specialisation.json"
    if spec.exists():
        summary["specialisation"] = [
            {"layer": layer["layer"],
             **{kind: {k: layer[kind][k] for k in ("nmi", "nmi_shuffled")} for kind in ("task", "segment")}}
            for layer in json.loads(spec.read_text())["layers"]]
    return summary


def sft_stage(run: Run) -> dict[str, Any]:
    """Cold-start SFT of the base model on the R1-format conversations."""
    from nanoseek.train.sft import sft

    cfg = run.sft_config("sft", run.data_dir / "sft.jsonl", init="pretrain")
    summary = _train_stage(run, "sft", lambda: sft(cfg, resume=True))
    return {**summary, "steps": cfg.steps}


def grpo_stage(run: Run) -> dict[str, Any]:
    """GRPO from the SFT model on train-split prompts with rule rewards."""
    from nanoseek.train.grpo import grpo

    cfg = run.grpo_config("grpo", init="sft")
    return {**_train_stage(run, "grpo", lambda: grpo(cfg, resume=True)), "steps": cfg.steps}


def sft_control_stage(run: Run) -> dict[str, Any]:
    """Control arm: the SFT model trained on with more SFT data for as long as GRPO trained."""
    from nanoseek.train.sft import sft

    budget = run.results["grpo"]["train_s"]
    steps = _steps_for(run.dir / "sft" / "metrics.jsonl", budget)
    cfg = run.sft_config("sft_control", run.data_dir / "sft_control.jsonl", init="sft", steps=steps)
    return {**_train_stage(run, "sft_control", lambda: sft(cfg, resume=True)), "steps": cfg.steps,
            "budget_s": budget}


def _steps_for(metrics: Path, budget_s: float) -> int:
    """How many steps of a run like the one that logged `metrics` fit in budget_s seconds."""
    from nanoseek.train.metrics import read_metrics

    records = read_metrics(metrics)
    seconds_per_step = sum(r["step_s"] for r in records) / max(len(records), 1)
    return max(1, round(budget_s / max(seconds_per_step, 1e-3)))


def grpo_zero_stage(run: Run) -> dict[str, Any]:
    """Control arm, R1-Zero: GRPO straight from the base model with the R1-Zero prompt, no SFT."""
    from nanoseek.train.grpo import grpo

    cfg = run.grpo_config("grpo_zero", init="pretrain")
    return {**_train_stage(run, "grpo_zero", lambda: grpo(cfg, resume=True), eval_template="zero"),
            "steps": cfg.steps}


def sample_stage(run: Run) -> dict[str, Any]:
    """Rejection sampling (R1 stage 3): the GRPO model's verified answers to train-split prompts."""
    import torch

    from nanoseek.model.checkpoint import load
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.sample import rejection_sample, train_suites
    from nanoseek.train.sft import write_conversations

    stats_path, data = run.dir / "sample" / "stats.json", run.data_dir / "sample.jsonl"
    if stats_path.exists():
        return {**json.loads(stats_path.read_text()), "skipped": True}
    cfg = copy.deepcopy(run.config.sample)
    cfg.seed = run.config.seed + 2  # other train problems than the cold-start set's
    model_dir = run.model_dir("grpo")
    model = load(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    conversations, stats = rejection_sample(model, Tokenizer.load(model_dir), train_suites(cfg.tasks, cfg.problems,
                                                                                          cfg.seed), cfg)
    write_conversations(data, conversations)
    stats_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stats_path, json.dumps(stats, indent=1))  # last: its presence means the stage finished
    return stats


def sft2_stage(run: Run) -> dict[str, Any]:
    """Second-round SFT of the base model (not the RL model) on the accepted samples plus the cold-start set."""
    from nanoseek.train.sft import read_conversations, sft, write_conversations

    data = run.data_dir / "sft2.jsonl"
    if not data.exists():
        write_conversations(data, _accepted(run.data_dir / "sample.jsonl") + read_conversations(run.data_dir / "sft.jsonl"))
    cfg = run.sft_config("sft2", data, init="pretrain", steps=run.config.sft2_steps)
    return {**_train_stage(run, "sft2", lambda: sft(cfg, resume=True)), "steps": cfg.steps,
            "conversations": sum(1 for _ in data.open())}


def _accepted(samples: Path) -> list:
    """The conversations rejection sampling kept (a weak model may have none: an empty file)."""
    from nanoseek.train.sft import read_conversations

    return read_conversations(samples) if samples.stat().st_size else []


def grpo2_stage(run: Run) -> dict[str, Any]:
    """Second-round GRPO from the sft2 model: the final teacher."""
    from nanoseek.train.grpo import grpo

    cfg = run.grpo_config("grpo2", init="sft2")
    return {**_train_stage(run, "grpo2", lambda: grpo(cfg, resume=True)), "steps": cfg.steps}


def student_pretrain_stage(run: Run) -> dict[str, Any]:
    """Pretrain the student architecture on the same base data (both student arms start here)."""
    from nanoseek.model.checkpoint import load
    from nanoseek.train.pretrain import pretrain

    summary_path = run.dir / "student_pretrain" / "summary.json"
    if summary_path.exists():
        return {**json.loads(summary_path.read_text()), "skipped": True}
    cfg = run.student_pretrain_config()
    started = time.perf_counter()
    final = pretrain(cfg, resume=True)
    counts = load(final, device="cpu").num_parameters()
    summary = {"model_dir": str(final), "train_s": time.perf_counter() - started, "steps": cfg.steps,
               "params_total": counts["total"], "params_active": counts["active"]}
    atomic_write_text(summary_path, json.dumps(summary, indent=1))
    return summary


def student_rl_stage(run: Run) -> dict[str, Any]:
    """Student arm 1: the pretrained student's own cold-start SFT and GRPO, as the teacher had them."""
    from nanoseek.train.grpo import grpo
    from nanoseek.train.sft import sft

    sft_cfg = run.sft_config("student_sft", run.data_dir / "sft.jsonl", init="student_pretrain")
    grpo_cfg = run.grpo_config("student_rl", init="student_sft")
    grpo_cfg.steps = run.config.student_grpo_steps

    def train() -> Path:
        sft(sft_cfg, resume=True)
        return grpo(grpo_cfg, resume=True)

    return {**_train_stage(run, "student_rl", train), "steps": {"sft": sft_cfg.steps, "grpo": grpo_cfg.steps}}


def student_distill_stage(run: Run) -> dict[str, Any]:
    """Student arm 2: sequence-level distillation (R1 §2.4) from the final teacher, for the student
    arm 1's post-training wall time; the teacher's sampling is the teacher's compute, reported apart."""
    from nanoseek.train.distill import distill, teacher_samples
    from nanoseek.train.sft import read_conversations, write_conversations

    budget = run.results["student_rl"]["train_s"]
    cfg = copy.deepcopy(run.config.distill)
    cfg.name, cfg.out_dir, cfg.stage, cfg.seed = run.config.name, run.config.out_dir, "student_distill", run.config.seed
    cfg.teacher, cfg.init, cfg.tokenizer = str(run.model_dir("grpo2")), str(run.model_dir("student_pretrain")), ""
    cfg.analysis_tasks = dict(run.config.eval_tasks)
    cfg.sampling = copy.deepcopy(run.config.sample)
    cfg.sampling.seed = run.config.seed + 3
    cfg.steps = _steps_for(run.dir / "student_sft" / "metrics.jsonl", budget)
    samples_path = teacher_samples(cfg)  # drawn once: a resumed run reuses them
    samples = _accepted(samples_path)
    teacher_s = json.loads((samples_path.parent / "stats.json").read_text())["wall_s"]
    # As R1 distils on its stage-3 SFT set: the teacher's verified samples plus the cold-start set
    # (which student_rl's own SFT has too, so the arms differ only in teacher samples against RL).
    data = run.data_dir / "student_distill.jsonl"
    write_conversations(data, samples + read_conversations(run.data_dir / "sft.jsonl"))
    cfg.data.path = str(data)
    return {**_train_stage(run, "student_distill", lambda: distill(cfg, resume=True)), "steps": cfg.steps,
            "budget_s": budget, "teacher_samples": len(samples), "teacher_sampling_s": teacher_s}


@dataclass(frozen=True)
class Stage:
    """A step of the recipe: `run` does (or resumes) it; `keys` are the PipelineConfig fields it reads
    beyond what the stages before it read (checked against the ones it was run with); `outputs` are
    the paths, relative to the run folder, that hold its results (removed by --force)."""

    name: str
    run: Callable[[Run], dict[str, Any]]
    keys: tuple[str, ...]
    outputs: tuple[str, ...]


STAGES: list[Stage] = [
    Stage("tokenizer", tokenizer_stage, ("seed", "tasks", "tokenizer_vocab_size", "tokenizer_problems"),
          ("tokenizer",)),
    Stage("corpus", corpus_stage, ("corpus_problems", "eval_tasks", "eval_problems"), ("data",)),
    Stage("pretrain", pretrain_stage, ("pretrain", "eval"), ("pretrain",)),
    Stage("sft_data", sft_data_stage, ("sft_data", "sft_tasks", "sft_problems"),
          ("data/sft.jsonl", "data/sft_control.jsonl")),
    Stage("sft", sft_stage, ("sft",), ("sft",)),
    Stage("grpo", grpo_stage, ("grpo",), ("grpo",)),
    Stage("sft_control", sft_control_stage, (), ("sft_control",)),
    Stage("grpo_zero", grpo_zero_stage, ("grpo_zero",), ("grpo_zero",)),
    Stage("sample", sample_stage, ("sample",), ("sample", "data/sample.jsonl")),
    Stage("sft2", sft2_stage, ("sft2_steps",), ("sft2", "data/sft2.jsonl")),
    Stage("grpo2", grpo2_stage, ("grpo2",), ("grpo2",)),
    Stage("student_pretrain", student_pretrain_stage, ("student", "student_pretrain_steps"), ("student_pretrain",)),
    Stage("student_rl", student_rl_stage, ("student_grpo_steps",), ("student_sft", "student_rl")),
    Stage("student_distill", student_distill_stage, ("distill",), ("student_distill", "data/student_distill.jsonl")),
]
STAGE_RECORD = "stages.json"  # in the run folder: stage -> the config values it was run with


class StaleStageError(RuntimeError):
    pass


def stage_values(config: PipelineConfig, stage: Stage) -> dict[str, Any]:
    values = to_dict(config)
    return json.loads(json.dumps({key: values[key] for key in stage.keys}))  # as stages.json holds them


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}.{key}" if prefix else key).items()}


def check_stage(run: Run, stage: Stage, recorded: dict[str, Any]) -> None:
    """Refuse to reuse a stage's outputs made with other settings than today's: its summary would
    report settings it was not trained with."""
    if stage.name not in recorded or not any((run.dir / out).exists() for out in stage.outputs):
        return
    before, now = _flatten(recorded[stage.name]), _flatten(stage_values(run.config, stage))
    differing = sorted(key for key in before.keys() | now.keys() if before.get(key, "<unset>") != now.get(key, "<unset>"))
    if differing:
        changes = "; ".join(f"{key}: {_fmt(before.get(key, '<unset>'))} -> {_fmt(now.get(key, '<unset>'))}"
                            for key in differing)
        raise StaleStageError(
            f"stage {stage.name!r} of {run.dir} was run with other settings ({changes}). Either start a new "
            f"run with name=NEW_NAME, or redo this stage and every stage after it with --force {stage.name}")


def force_from(run: Run, name: str, recorded: dict[str, Any]) -> None:
    """--force NAME: remove the outputs and records of stage NAME and every stage after it."""
    names = [stage.name for stage in STAGES]
    if name not in names:
        raise TrainConfigError(f"--force {name!r}: no such stage; stages: {', '.join(names)}")
    for stage in STAGES[names.index(name):]:
        recorded.pop(stage.name, None)
        for out in stage.outputs:
            path = run.dir / out
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


# ---- the report -----------------------------------------------------------------------------------
def environment(config: PipelineConfig) -> dict[str, Any]:
    """What a reader needs to reproduce the run: seed, commit, versions, threads, hardware."""
    import numpy
    import tokenizers
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        commit = "unknown"
    return {"seed": config.seed, "commit": commit, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "tokenizers": tokenizers.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def write_report(run: Run) -> Path:
    """report.json (every stage's summary) and report.md: the accuracy table first, then the curves,
    the data, the arms and samples."""
    from nanoseek.train.metrics import read_metrics
    from nanoseek.train.plots import plot_rl_runs

    r = run.results
    env = environment(run.config)
    (run.dir / "report.json").write_text(json.dumps({"config": to_dict(run.config), "environment": env,
                                                     "stages": r}, indent=1))
    cfg = run.config
    k = cfg.eval.samples
    n = r["pretrain"].get("n", 0)
    lines = [f"# nanoseek pipeline: {cfg.name}", "",
             f"Held-out accuracy on {n} distinct eval-split problems ({', '.join(f'{t} {d}' for t, d in cfg.eval_tasks.items())}; "
             f"difficulty = digits per operand), k = {k} samples at T = {cfg.eval.temperature}, "
             f"top-p {cfg.eval.top_p} (pass@1 is their mean correctness, ± its standard error over problems), "
             "strict scoring: the whole completion is `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>` "
             "with the right answer. Lenient: a right answer anywhere. The base model never saw the tags: its "
             "plain-prompt row shows what it knows (lenient), its R1-Zero row is grpo_zero's starting point.", "",
             f"| stage | pass@1 (%) | pass@{k} | maj@{k} | greedy | lenient pass@1 | format | mean tokens | "
             "params (active) | train time |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows = [(name, r[name]) for name in MODEL_STAGES if r.get(name)]
    if r.get("pretrain", {}).get("zero"):
        rows.insert(1, ("pretrain", r["pretrain"]["zero"]))
    for name, s in rows:
        label = {"zero": f"{name} (R1-Zero prompt)", "plain": f"{name} (plain problem line)"}.get(
            s.get("eval_template"), name)
        lines.append(f"| {label} | **{_pct(s['pass@1'])}** ± {_pct(s['pass@1_stderr'])} | {_pct(s['pass@8'])} | "
                     f"{_pct(s['maj@8'])} | {_pct(s.get('greedy'))} | {_pct(s['pass@1_lenient'])} | "
                     f"{_pct(s['format'])} | {s['mean_tokens']:.0f} | {s['params_total'] / 1e6:.2f}M "
                     f"({s['params_active'] / 1e6:.2f}M) | {_seconds(s.get('train_s'))} |")
    lines += ["", "## Per difficulty (pass@1 %, strict)", "",
              "| stage | " + " | ".join(f"{t} {d}" for t, ds in cfg.eval_tasks.items() for d in ds) + " |",
              "|---|" + "---|" * sum(len(ds) for ds in cfg.eval_tasks.values())]
    for name in MODEL_STAGES:
        if r.get(name):
            cells = [_pct(r[name]["tasks"][t][str(d)]["pass@1"]) for t, ds in cfg.eval_tasks.items() for d in ds]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rl_runs = {name: read_metrics(run.dir / name / "metrics.jsonl") for name in ("grpo", "grpo_zero", "grpo2", "student_rl")
               if (run.dir / name / "metrics.jsonl").exists()}
    if rl_runs:
        plot_rl_runs(rl_runs, run.dir / "rl_curves.png")
        lines += ["", "## RL curves", "", "Rollout reward, accuracy, strict format rate and completion length over "
                  "GRPO steps (grpo: from the SFT model; grpo_zero: R1-Zero, from the base model; grpo2: from "
                  "sft2; student_rl: the student's own GRPO).", "", "![RL curves](rl_curves.png)", ""]
    if r.get("sample"):
        from nanoseek.train.sample import format_table

        lines += ["## Rejection sampling", "",
                  f"The GRPO model, {cfg.sample.samples} samples at T = {cfg.sample.temperature} on each of "
                  f"{r['sample']['prompts']} train-split prompts; kept: correct, strictly formatted, not truncated, "
                  f"not repetitive, not a duplicate, at most {cfg.sample.keep_per_prompt} per prompt (the shortest). "
                  f"sft2 trains the base model on the {r['sample']['accepted']} kept plus the cold-start set.", "",
                  "```", format_table(r["sample"]), "```", ""]
    if r.get("student_distill") and r.get("student_rl") and r.get("grpo2"):
        teacher, dist, own = r["grpo2"], r["student_distill"], r["student_rl"]
        combined = (dist["pass@1_stderr"] ** 2 + own["pass@1_stderr"] ** 2) ** 0.5
        lines += ["## Teacher and students", "",
                  f"Both students are the same architecture ({dist['params_active'] / 1e6:.2f}M active parameters "
                  f"against the teacher's {teacher['params_active'] / 1e6:.2f}M), pretrained on the same base data; "
                  f"then distilled from the final teacher (grpo2: SFT on its {dist['teacher_samples']} verified samples plus "
                  f"the cold-start set) for {_seconds(dist.get('train_s'))}, or given their "
                  f"own cold-start SFT and GRPO for {_seconds(own.get('train_s'))}.", "",
                  "| model | pass@1 (%) | greedy | format |", "|---|---|---|---|"]
        for name, s in (("teacher (grpo2)", teacher), ("student_distill", dist), ("student_rl", own)):
            lines.append(f"| {name} | {_pct(s['pass@1'])} ± {_pct(s['pass@1_stderr'])} | {_pct(s.get('greedy'))} | "
                         f"{_pct(s['format'])} |")
        lines += ["", f"student_distill reaches {dist['pass@1'] / max(teacher['pass@1'], 1e-9):.0%} of the teacher's "
                  f"pass@1; it is {100 * (dist['pass@1'] - own['pass@1']):+.1f} points from student_rl (combined "
                  f"standard error {100 * combined:.1f}).", ""]
    pre = r["pretrain"]
    lines += ["## Stages", "", "| stage | wall time | summary |", "|---|---|---|"]
    for name in (stage.name for stage in STAGES):
        s = r[name]
        brief = {key: v for key, v in s.items() if isinstance(v, (int, float, str, bool)) and key != "wall_s"
                 and not key.startswith(("pass", "maj", "greedy", "format", "mean_", "trunc", "params", "n"))}
        wall = "skipped (done earlier)" if s.get("skipped") else f"{s['wall_s']:.1f} s"
        lines.append(f"| {name} | {wall} | {', '.join(f'{key}={_fmt(v)}' for key, v in brief.items())} |")
    lines += ["", "## Data", "",
              f"- Base corpus: {r['corpus']['tokens']:,} tokens of plain-text worked solutions "
              f"({', '.join(f'{t} {d}' for t, d in cfg.tasks.items())}); none of the {r['corpus']['eval_prompts_checked']} "
              "held-out prompts occurs in it (exact token search).",
              f"- Cold-start SFT: {r['sft_data']['cold_start']} conversations ({r['sft_data']['source']}); "
              f"the control arm draws from {r['sft_data']['control']} more.",
              f"- GRPO prompts: train-split problems of {cfg.grpo.tasks}; evaluation: eval-split problems only.", "",
              "## Pretraining", "",
              f"{pre.get('steps')} steps, {pre.get('tokens', 0):,} tokens; loss {_fmt(pre.get('first_loss'))} -> "
              f"{_fmt(pre.get('final_loss'))}, expert imbalance (max/mean load) {_fmt(pre.get('final_imbalance'))}.", "",
              "![loss](pretrain/loss.png)", "", "![expert load](pretrain/expert_load.png)", ""]
    if pre.get("specialisation"):
        lines += ["### Do experts specialise?", "",
                  "| layer | NMI(prompt/reasoning/answer) | shuffled |", "|---|---|---|"]
        for layer in pre["specialisation"]:
            lines.append(f"| {layer['layer']} | {layer['segment']['nmi']:.4f} | {layer['segment']['nmi_shuffled']:.4f} |")
        lines += ["", "![expert specialisation](pretrain/expert_specialisation.png)", ""]
    lines += ["## Samples", ""]
    for name in MODEL_STAGES:
        for s in r.get(name, {}).get("samples", [])[:2]:
            verdict = ("correct" if s["correct"] else "right answer, not in the R1 format"
                       if s.get("correct_lenient") else "wrong")
            lines += [f"**{name}**, {s['task']} {s['difficulty']}: {s['prompt']} (expected `{s['expected']}`, "
                      f"{verdict})", "", "```", s["completion"], "```", ""]
    lines += ["## Environment", "", ", ".join(f"{key}: {v}" for key, v in env.items()), "",
              "## Next", "", "Chat with the final model:", "", "```", f"nanoseek chat {run.model_dir('grpo2')}", "```", ""]
    path = run.dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} s"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def run_pipeline(config: PipelineConfig, force: str = "") -> Path:
    """Run (or resume) every stage, then write the report; returns report.md. A stage done earlier
    with other settings stops the run (StaleStageError) unless `force` names it or a stage before it."""
    run = Run(config, Path(config.out_dir) / config.name)
    run.dir.mkdir(parents=True, exist_ok=True)
    record_path = run.dir / STAGE_RECORD
    recorded = json.loads(record_path.read_text()) if record_path.exists() else {}
    if force:
        force_from(run, force, recorded)
    for stage in STAGES:
        check_stage(run, stage, recorded)
        recorded[stage.name] = stage_values(config, stage)
        atomic_write_text(record_path, json.dumps(recorded, indent=1))
        print(f"== {stage.name}: {(stage.run.__doc__ or '').splitlines()[0]}", flush=True)
        start = time.perf_counter()
        result = stage.run(run)
        result["wall_s"] = time.perf_counter() - start
        run.results[stage.name] = result
        status = "skipped, already done" if result.get("skipped") else f"done in {result['wall_s']:.1f} s"
        print(f"== {stage.name}: {status}", flush=True)
    report = write_report(run)
    for name in MODEL_STAGES:
        s = run.results[name]
        print(f"{name:12s} pass@1 {_pct(s['pass@1'])}% ± {_pct(s['pass@1_stderr'])}, greedy {_pct(s.get('greedy'))}%, "
              f"format {_pct(s['format'])}% on {s['n']} held-out problems")
    print(f"report: {report}")
    print(f"chat with the model: nanoseek chat {run.model_dir('grpo2')}")
    return report


def load_pipeline_config(path: str | None = None, overrides: list[str] | None = None,
                         preset: str = "default") -> PipelineConfig:
    """The defaults, then a preset's overrides, then the file's, then the command line's."""
    if preset not in PRESETS:
        raise TrainConfigError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    base = from_dict(PipelineConfig, apply_overrides({}, PRESETS[preset]))
    try:
        return from_dict(PipelineConfig, apply_overrides(read_yaml(path) if path else {}, overrides or []), base=base)
    except TrainConfigError as error:
        raise TrainConfigError(f"{path}: {error}" if path else str(error)) from None

