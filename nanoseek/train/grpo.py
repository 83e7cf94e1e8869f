"""Group Relative Policy Optimization (DeepSeekMath arXiv 2402.03300 eq. 3; DeepSeek-R1 §2.2.1; docs/facts.md §8).

For each prompt q the old policy samples a group of G completions o_1..o_G, and rule rewards score
them (`nanoseek.train.rewards`). GRPO needs no value model: the baseline is the group's mean reward,
so every token of o_i gets the same advantage A_i = (r_i - mean(r)) / std(r) (outcome supervision).
The policy maximises the PPO clipped surrogate with that advantage, minus a KL penalty to a frozen
reference model, averaged over tokens and completions:

    J = E_q (1/G) Σ_i (1/|o_i|) Σ_t [ min(ρ_it·A_i, clip(ρ_it, 1-ε_low, 1+ε_high)·A_i) - β·D_KL ],
    ρ_it = π_θ(o_it | q, o_i<t) / π_old(o_it | q, o_i<t).

The (1/G)(1/|o_i|) averaging is the "grpo" aggregation; `policy_loss` also offers the token-level
ones that later work prefers (bnpo, Dr. GRPO, DAPO). The functions here are pure tensor math, each
checkable against its equation.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from nanoseek.data.task import Problem, Task, Template, format_reward, is_eval_problem, prompt_ids
from nanoseek.model.checkpoint import load
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import state as ckpt
from nanoseek.train.config import TrainConfigError, load_config, to_dict
from nanoseek.train.metrics import JsonlSink, read_metrics
from nanoseek.train.optim import OptimizerConfig, build_optimizer, lr_at
from nanoseek.train.pretrain import _check_same_config, resolve_device
from nanoseek.train.rewards import REWARD_FUNCTIONS, Rollout, score

SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
# Added to the std before dividing, as trl does, so a near-constant group does not blow up.
STD_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """A_i = (r_i - mean of its group) / scale for rewards [P*G] in prompt-major order (docs/facts.md §8).

    scale: "group" divides by the group's std + 1e-4 (DeepSeekMath §4.1.2), "batch" by
    the whole batch's std + 1e-4 (Lite-PPO), "none" not at all (Dr. GRPO). Stds are Bessel-corrected
    like trl's. NaN rewards (a reward function returned None) are left out of every mean and std and
    get advantage 0, as does an all-NaN group.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, not {scale_rewards!r}")
    if group_size < 1 or rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a length divisible by group_size={group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    grouped = rewards.detach().float().view(-1, group_size)
    valid = ~grouped.isnan()
    group_means, group_stds = _nan_mean_std(grouped)
    centred = torch.where(valid, grouped - group_means, 0.0)
    # A group whose valid rewards are all equal carries no signal. Force exact zeros: the rounded mean
    # of equal values can differ from them by an ulp, and dividing that by (0 + 1e-4) makes it noise.
    highest = torch.where(valid, grouped, -torch.inf).amax(dim=1, keepdim=True)
    lowest = torch.where(valid, grouped, torch.inf).amin(dim=1, keepdim=True)
    centred = torch.where(highest == lowest, 0.0, centred)
    if scale_rewards == "group":
        centred = centred / (group_stds + STD_EPS)
    elif scale_rewards == "batch":
        centred = centred / (_nan_mean_std(grouped.view(1, -1))[1] + STD_EPS)
    return centred.view(-1)


def _nan_mean_std(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and Bessel-corrected std over the non-NaN entries, as [R, 1]; 0 for an all-NaN row."""
    valid = ~rows.isnan()
    counts = valid.sum(dim=1, keepdim=True)
    means = torch.where(valid, rows, 0.0).sum(dim=1, keepdim=True) / counts.clamp(min=1)
    # n - 1 clamped to 1: a row with a single valid entry gets std 0 rather than 0/0.
    squares = torch.where(valid, rows - means, 0.0).square().sum(dim=1, keepdim=True)
    variances = squares / (counts - 1).clamp(min=1)
    return means, variances.sqrt()


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ‖π_ref) (DeepSeekMath eq. 4): exp(ref - logp) - (ref - logp) - 1 >= 0.

    expm1(d) - d instead of exp(d) - d - 1: the latter rounds to small negatives for |d| << 1.
    """
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


POLICY_STATS = ("clip_low", "clip_high", "clip", "kl", "ratio_mean")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The negated GRPO objective (DeepSeekMath eq. 3) and clip/KL statistics.

    logprobs (differentiable), old_logprobs, ref_logprobs and mask are [B, T] over completion tokens,
    advantages [B]; only logprobs receives gradient. Per token l = -min(ρ·A, clip(ρ)·A) + β·k3, then
    (docs/facts.md §8, m = mask):
      grpo     mean over non-empty rows of Σ_t l·m / Σ_t m (length-biased, eq. 3 as written);
      bnpo     Σ l·m / Σ m over this micro-batch;
      dr_grpo  Σ l·m / (B · max_completion_length), a constant denominator (Dr. GRPO);
      dapo     Σ l·m / num_items_in_batch, the active tokens of the whole grad-accumulated batch
               (default: Σ m); under data parallelism pass the global count / world size, since the
               gradients are then averaged over ranks.
    Stats, over active tokens: "clip_low"/"clip_high" are the fractions where the clip binds (ρ < 1-ε_low
    with A < 0, ρ > 1+ε_high with A > 0), "clip" either, "kl" the mean k3 (0 without ref), "ratio_mean".
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs")
    shapes = {tuple(t.shape) for t in (logprobs, old_logprobs, mask, ref_logprobs) if t is not None}
    if len(shapes) != 1 or logprobs.ndim != 2 or tuple(advantages.shape) != logprobs.shape[:1]:
        raise ValueError(f"expected [B, T] log-probs and mask and [B] advantages, got log-prob/mask shapes "
                         f"{sorted(shapes)} and advantages {tuple(advantages.shape)}")
    active = mask.bool()
    # Padding may hold garbage (±inf after EOS); replacing it before any arithmetic keeps inf and NaN
    # out of both the loss and its gradient, which a multiplication by the mask would not.
    logprobs = torch.where(active, logprobs, 0.0)
    old_logprobs = torch.where(active, old_logprobs.detach(), 0.0)
    per_sample_advantage = advantages.detach().to(logprobs.dtype).unsqueeze(1)
    ratio = torch.exp(logprobs - old_logprobs)
    clipped_ratio = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.minimum(ratio * per_sample_advantage, clipped_ratio * per_sample_advantage)
    kl = None
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, torch.where(active, ref_logprobs.detach(), 0.0))
        if beta > 0:
            per_token = per_token + beta * kl
    per_token = torch.where(active, per_token, 0.0)

    tokens = active.sum()
    if loss_type == "grpo":
        tokens_per_row = active.sum(dim=1)
        row_means = per_token.sum(dim=1) / tokens_per_row.clamp(min=1)
        loss = row_means.sum() / (tokens_per_row > 0).sum().clamp(min=1)
    elif loss_type == "bnpo":
        loss = per_token.sum() / tokens.clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (logprobs.shape[0] * max_completion_length)
    else:
        denominator = tokens.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = per_token.sum() / denominator

    with torch.no_grad():
        clip_low = active & (ratio < 1 - epsilon_low) & (per_sample_advantage < 0)
        clip_high = active & (ratio > 1 + epsilon_high) & (per_sample_advantage > 0)
        kl_sum = torch.zeros((), device=ratio.device) if kl is None else torch.where(active, kl, 0.0).sum()
        sums = [clip_low.sum(), clip_high.sum(), (clip_low | clip_high).sum(), kl_sum,
                torch.where(active, ratio, 0.0).sum(), tokens.clamp(min=1)]
        # One .tolist() is one host-device sync instead of one per statistic.
        *numerators, count = torch.stack([value.double() for value in sums]).tolist()
        stats = {name: value / count for name, value in zip(POLICY_STATS, numerators)}
    return loss, stats

# ---- the trainer ----------------------------------------------------------------------------------
@dataclass
class GRPOConfig:
    """GRPO from a model folder on train-split prompts of `tasks`, with rule rewards.

    Each step draws `prompts` problems, samples `group_size` completions of each through the engine
    (one shared prefill per prompt, every sample seeded from (seed, step, prompt, sample)), scores
    them, and takes `iterations` optimizer steps (mu) on the clipped objective over that batch.
    """

    name: str = "run"
    out_dir: str = "runs"
    stage: str = "grpo"
    init: str = ""  # the model folder to start from (an SFT model; the base model with zero=True)
    zero: bool = False  # R1-Zero: the R1-Zero text template instead of the chat format
    tasks: dict[str, list[int]] = field(default_factory=lambda: {"arithmetic": [2, 3]})
    steps: int = 40
    prompts: int = 16  # P per step
    group_size: int = 8  # G samples per prompt
    max_new_tokens: int = 160
    temperature: float = 1.0  # rollout temperature; log-probs are taken under the same one
    top_p: float = 1.0
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.5, "tag_count": 0.25})
    scale_rewards: Literal["group", "batch", "none"] = "group"
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28  # DAPO's clip-higher
    beta: float = 0.0  # KL-to-reference weight (k3); 0 loads no reference model
    iterations: int = 1  # mu: optimizer steps per rollout batch
    micro_batch: int = 64  # sequences per forward/backward
    mask_truncated: bool = False  # drop truncated completions from the loss (they stay in the group stats)
    dynamic_sampling: bool = False  # DAPO: replace zero-variance groups by fresh prompts until the batch is full
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(
        lr=1e-4, min_lr_ratio=1.0, weight_decay=0.0, warmup_steps=0, betas=(0.9, 0.99)))
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    save_every: int = 10
    keep_last: int = 2
    log_every: int = 1
    progress: bool = True
    samples_logged: int = 2  # completions written to samples.jsonl per step
    eval_every: int = 0
    eval_tasks: dict[str, list[int]] = field(default_factory=dict)
    eval_problems: int = 32
    eval_samples: int = 2

    def __post_init__(self) -> None:
        for name in ("steps", "prompts", "group_size", "max_new_tokens", "iterations", "micro_batch", "keep_last",
                     "log_every"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"'{name}' = {getattr(self, name)}: must be >= 1")
        if self.group_size < 2:
            raise TrainConfigError("'group_size' must be >= 2: advantages are relative to the group")
        if self.temperature <= 0:
            raise TrainConfigError("'temperature' must be > 0: GRPO samples its rollouts")
        unknown = sorted(set(self.rewards) - set(REWARD_FUNCTIONS))
        if unknown:
            raise TrainConfigError(f"'rewards' has unknown functions {unknown}; valid: {sorted(REWARD_FUNCTIONS)}")

    @property
    def stage_dir(self) -> Path:
        return Path(self.out_dir) / self.name / self.stage

    @property
    def template(self) -> Template:
        return "zero" if self.zero else "chat"


@dataclass
class Batch:
    """One step's rollouts: the samples in prompt-major order and what the update needs of them."""

    rollouts: list[Rollout]
    prompts: list[list[int]]  # per sample
    completions: list[list[int]]  # per sample, EOS included when it stopped
    engine_logprobs: list[list[float]]
    rewards: torch.Tensor  # [N] weighted total
    reward_parts: dict[str, torch.Tensor]
    advantages: torch.Tensor  # [N]
    zero_std_groups: int
    groups: int


def draw_prompts(tasks: list[Task], seed: int, step: int, count: int, offset: int = 0) -> list[tuple[Task, Problem]]:
    """`count` train-split problems for `step`, a function of (seed, step) alone (exact resume).
    `offset` continues the same stream (dynamic sampling's refills)."""
    pairs = [(task, d) for task in tasks for d in task.difficulties]
    rng = random.Random(f"grpo:{seed}:{step}")
    drawn: list[tuple[Task, Problem]] = []
    while len(drawn) < offset + count:
        task, difficulty = pairs[rng.randrange(len(pairs))]
        problem = task.generate(rng.getrandbits(63), difficulty)
        if not is_eval_problem(problem):
            drawn.append((task, problem))
    return drawn[offset:]


class GRPOTrainer:
    """The loop: rollouts through the engine, rewards, advantages, the clipped update. Each phase is
    a method, so a benchmark can time one step and a test can check one piece."""

    def __init__(self, config: GRPOConfig, model: Transformer, tokenizer: Tokenizer, reference: Transformer | None = None):
        from nanoseek.data import tasks_at
        from nanoseek.infer.engine import Engine

        self.config, self.model, self.tokenizer, self.reference = config, model, tokenizer, reference
        self.tasks = tasks_at(config.tasks)
        self.engine = Engine(model, eos_token_ids=[tokenizer.eos_id], decode=tokenizer.decode)
        self.optimizer = build_optimizer(model, config.optimizer)
        self.params = [p for p in model.parameters() if p.requires_grad]

    # ---- rollouts -------------------------------------------------------------------------------
    def rollout(self, step: int) -> Batch:
        """Sample the step's groups. With dynamic sampling, a group whose rewards are all equal (no
        gradient) is dropped and a fresh prompt drawn, up to 4x the prompts in all."""
        cfg = self.config
        kept: list[tuple[Task, Problem, list]] = []
        drawn, dropped = 0, 0
        limit = 4 * cfg.prompts if cfg.dynamic_sampling else cfg.prompts
        while len(kept) < cfg.prompts and drawn < limit:
            problems = draw_prompts(self.tasks, cfg.seed, step, min(cfg.prompts - len(kept), limit - drawn), drawn)
            groups = self._generate(problems, step, drawn)
            drawn += len(problems)
            for (task, problem), completions in zip(problems, groups):
                if cfg.dynamic_sampling and float(self._score(task, problem, completions)[0].std()) == 0:
                    dropped += 1
                else:
                    kept.append((task, problem, completions))
        return self._batch(kept, dropped)

    def _generate(self, problems: list[tuple[Task, Problem]], step: int, first_index: int) -> list[list]:
        from nanoseek.infer.sampling import SamplingParams

        cfg = self.config
        prompts = [prompt_ids(self.tokenizer, task, p, cfg.template) for task, p in problems]
        params = [SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                 seed=_seed(cfg.seed, step, first_index + i), logprobs=True)
                  for i in range(len(prompts))]
        self.model.eval()
        return self.engine.generate(prompts, params, n=cfg.group_size)

    def _rollout(self, task: Task, problem: Problem, completion) -> Rollout:
        return Rollout.of(task, problem, completion, self.config.max_new_tokens)

    def _score(self, task: Task, problem: Problem, completions: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return score([self._rollout(task, problem, c) for c in completions], self.config.rewards)

    def _batch(self, kept: list[tuple[Task, Problem, list]], zero_std_dropped: int) -> Batch:
        cfg = self.config
        rollouts = [self._rollout(task, problem, c) for task, problem, completions in kept for c in completions]
        rewards, parts = score(rollouts, cfg.rewards)
        advantages = group_advantages(rewards, cfg.group_size, cfg.scale_rewards)
        grouped = rewards.view(-1, cfg.group_size)
        zero_std = int((grouped.std(dim=1) == 0).sum()) + zero_std_dropped
        prompts = [prompt_ids(self.tokenizer, task, problem, cfg.template)
                   for task, problem, completions in kept for _ in completions]
        return Batch(rollouts=rollouts, prompts=prompts,
                     completions=[c.tokens for _, _, completions in kept for c in completions],
                     engine_logprobs=[c.logprobs for _, _, completions in kept for c in completions],
                     rewards=rewards, reward_parts=parts, advantages=advantages, zero_std_groups=zero_std,
                     groups=len(kept) + zero_std_dropped)

    # ---- the update -----------------------------------------------------------------------------
    def _tensors(self, batch: Batch, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """input ids [B, S], target ids [B, S], completion mask [B, S] and engine log-probs [B, S] of
        some rows: position p predicts token p + 1; the mask covers completion tokens, EOS included."""
        cfg, device = self.config, self.model.device
        width = max(len(batch.prompts[i]) + len(batch.completions[i]) for i in rows) - 1
        inputs = torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long)
        targets = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width))
        engine = torch.zeros((len(rows), width))
        for r, i in enumerate(rows):
            sequence = batch.prompts[i] + batch.completions[i]
            start, end = len(batch.prompts[i]) - 1, len(sequence) - 1
            inputs[r, :end] = torch.tensor(sequence[:-1])
            targets[r, :end] = torch.tensor(sequence[1:])
            if not (cfg.mask_truncated and batch.rollouts[i].truncated):
                mask[r, start:end] = 1.0
            engine[r, start:end] = torch.tensor(batch.engine_logprobs[i])
        return inputs.to(device), targets.to(device), mask.to(device), engine.to(device)

    def token_logprobs(self, model: Transformer, inputs: torch.Tensor, targets: torch.Tensor,
                       with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log pi(target | prefix) [B, S] under the rollout temperature, in fp32 (and the entropy)."""
        logits = model(inputs).float() / self.config.temperature
        logprobs = logits.log_softmax(dim=-1)
        chosen = logprobs.gather(-1, targets[..., None]).squeeze(-1)
        entropy = -(logprobs.exp() * logprobs).sum(-1).detach() if with_entropy else None
        return chosen, entropy

    def update(self, batch: Batch) -> dict[str, float]:
        """`iterations` optimizer steps on the clipped objective over the batch's micro-batches.
        Old log-probs: with one iteration the policy is the sampler, so they are the current ones
        detached (ratio 1); with more, they are computed once, before the first step."""
        cfg = self.config
        row_tokens = [0 if cfg.mask_truncated and r.truncated else len(c)
                      for r, c in zip(batch.rollouts, batch.completions)]
        # The loss denominators span every row, as the objective defines them ...
        active_tokens = max(sum(row_tokens), 1)
        total_rows = max(sum(t > 0 for t in row_tokens) if cfg.loss_type == "grpo" else len(row_tokens), 1)
        # ... but a row with advantage 0 and no KL term adds exactly nothing to the loss or its
        # gradient (ratio * 0), so only the others are run: in a group whose samples all scored the
        # same (often most groups) the forward and backward passes would be wasted.
        trained = [i for i, t in enumerate(row_tokens)
                   if t > 0 and (cfg.beta > 0 or float(batch.advantages[i]) != 0.0)]
        chunks = [trained[i:i + cfg.micro_batch] for i in range(0, len(trained), cfg.micro_batch)]
        tensors = [self._tensors(batch, rows) for rows in chunks]
        trained_tokens = max(sum(row_tokens[i] for i in trained), 1)
        stats: dict[str, float] = {"reference_s": 0.0}
        with torch.no_grad():
            old, reference = [], []
            for inputs, targets, mask, _ in tensors:
                old.append(self.token_logprobs(self.model, inputs, targets)[0] if cfg.iterations > 1 else None)
                if self.reference is not None and cfg.beta > 0:
                    started = time.perf_counter()
                    reference.append(self.token_logprobs(self.reference, inputs, targets)[0])
                    stats["reference_s"] += time.perf_counter() - started
                else:
                    reference.append(None)
        self.model.train()
        # Every key is logged even when no row had a signal to train on (nothing ran).
        sums = dict.fromkeys(("loss", "entropy", "logprob_gap", "grad_norm", *POLICY_STATS), 0.0)
        for iteration in range(cfg.iterations):
            for k, (rows, (inputs, targets, mask, engine)) in enumerate(zip(chunks, tensors)):
                logprobs, entropy = self.token_logprobs(self.model, inputs, targets, with_entropy=True)
                old_logprobs = old[k] if old[k] is not None else logprobs.detach()
                loss, parts = policy_loss(
                    logprobs, old_logprobs, batch.advantages[rows].to(logprobs.device), mask,
                    ref_logprobs=reference[k], beta=cfg.beta, epsilon_low=cfg.epsilon_low,
                    epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type, max_completion_length=cfg.max_new_tokens,
                    num_items_in_batch=active_tokens)
                # dapo's denominator already spans the whole batch; the other aggregations average over
                # the rows of the micro-batch (grpo: its rows with any active token), so reweight.
                weight = 1.0 if cfg.loss_type == "dapo" else _rows(mask, cfg.loss_type) / total_rows
                (loss * weight).backward()
                tokens = max(float(mask.sum()), 1.0)
                weights = {"loss": weight * float(loss.detach()), "entropy": float((entropy * mask).sum()) / trained_tokens,
                           **{key: value * tokens / trained_tokens for key, value in parts.items()}}
                for key, value in weights.items():
                    sums[key] += value / cfg.iterations
                if iteration == 0:  # later iterations score an updated policy, not the sampler
                    gap = float(((logprobs.detach() - engine).abs() * mask).sum()) / trained_tokens
                    sums["logprob_gap"] += gap
            clip = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip > 0 else math.inf
            sums["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(self.params, clip)) / cfg.iterations
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        return {**sums, **stats}

    def step(self, step: int) -> dict[str, Any]:
        """One GRPO step: rollouts, rewards, update. Returns the step's metrics record."""
        cfg = self.config
        lr = lr_at(step, cfg.steps, cfg.optimizer)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        batch = self.rollout(step)
        rollout_s = time.perf_counter() - started
        started = time.perf_counter()
        update = self.update(batch) if batch.rollouts else {}
        update_s = time.perf_counter() - started - update.get("reference_s", 0.0)
        rollouts = batch.rollouts
        n = max(len(rollouts), 1)
        record: dict[str, Any] = {
            "step": step, "steps": cfg.steps, "lr": lr, **update,
            "reward": float(batch.rewards.mean()) if rollouts else 0.0,
            "reward_std": float(batch.rewards.std()) if len(rollouts) > 1 else 0.0,
            **{f"reward_{name}": float(values.mean()) for name, values in batch.reward_parts.items()},
            "accuracy": sum(r.task.verify(r.problem, r.text, strict=False) for r in rollouts) / n,
            "format": sum(format_reward(r.text) for r in rollouts) / n,
            "zero_std": batch.zero_std_groups / max(batch.groups, 1),
            "completion_tokens": sum(r.num_tokens for r in rollouts) / n,
            "truncation": sum(r.truncated for r in rollouts) / n,
            "rollout_tok_per_s": sum(r.num_tokens for r in rollouts) / rollout_s,
            "rollout_s": rollout_s, "update_s": update_s, "step_s": time.perf_counter() - started + rollout_s,
            "samples": [{"prompt": r.problem.prompt, "answer": r.problem.answer, "completion": r.text,
                         "reward": float(batch.rewards[i])} for i, r in enumerate(rollouts[:cfg.samples_logged])],
        }
        return record


def _rows(mask: torch.Tensor, loss_type: str) -> int:
    """The rows a micro-batch's loss averages over: grpo skips rows with no active token."""
    return int((mask.sum(dim=1) > 0).sum()) if loss_type == "grpo" else mask.shape[0]


def _seed(seed: int, step: int, prompt: int) -> int:
    return (seed * 1_000_003 + step) * 10_007 + prompt


def format_line(r: dict[str, Any]) -> str:
    """step | reward | accuracy | format | length | clip | KL | seconds per phase, fixed width."""
    return (f"step {r['step'] + 1:>5}/{r['steps']} | reward {r['reward']:.3f} | acc {r['accuracy']:.3f} | "
            f"format {r['format']:.2f} | len {r['completion_tokens']:.0f} | trunc {r['truncation']:.2f} | "
            f"zero-std {r['zero_std']:.2f} | clip {r.get('clip', 0):.3f} | kl {r.get('kl', 0):.4f} | "
            f"|dlogp| {r.get('logprob_gap', 0):.1e} | rollout {r['rollout_s']:.1f}s update {r['update_s']:.1f}s")


def grpo(config: GRPOConfig, resume: bool = False) -> Path:
    """Run GRPO per `config`; returns the final/ model folder. Resumes exactly from the newest step
    checkpoint (weights, optimizer, step; rollouts are seeded by step)."""
    threads = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        return _grpo(config, resume)
    finally:
        torch.set_num_threads(threads)


def _grpo(config: GRPOConfig, resume: bool) -> Path:
    if not config.init:
        raise TrainConfigError("'init' is empty: GRPO needs the model folder to start from")
    stage_dir = config.stage_dir
    final = stage_dir / "final"
    if resume and final.exists():
        print(f"{final} exists: this run has finished, nothing to resume")
        return final
    found = ckpt.checkpoints(stage_dir)
    if not resume and (found or (stage_dir / "metrics.jsonl").exists()):
        raise ValueError(f"{stage_dir} already holds a run: pass --resume to continue it, or pick another name")
    stage_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    resolved = json.loads(json.dumps(to_dict(config)))
    tokenizer = Tokenizer.load(config.init)
    latest = found[-1] if resume and found else None
    model = load(latest[1] if latest else config.init, device=device, dtype=torch.float32)
    reference = load(config.init, device=device, dtype=torch.float32).eval() if config.beta > 0 else None
    for p in reference.parameters() if reference is not None else []:
        p.requires_grad_(False)
    trainer = GRPOTrainer(config, model, tokenizer, reference)
    start = 0
    if latest is not None:
        saved = ckpt.load_state(latest[1])
        _check_same_config(saved["train_config"], resolved, latest[1])
        trainer.optimizer.load_state_dict(ckpt.optimizer_state(saved["optimizer"]))
        start = saved["step"]
    ckpt.prune(stage_dir, config.keep_last)
    evaluate = None
    if config.eval_tasks:
        from nanoseek.eval import EvalConfig, periodic_evaluator

        evaluate = periodic_evaluator(config.eval_tasks, config.eval_problems, EvalConfig(
            samples=config.eval_samples, max_new_tokens=config.max_new_tokens, greedy=False, seed=config.seed,
            template=config.template))
    metrics = JsonlSink(stage_dir / "metrics.jsonl", keep_until_step=start)
    bar = tqdm(total=config.steps, initial=start, unit="step", dynamic_ncols=True, disable=not (config.progress and sys.stderr.isatty()))  # bars only on a terminal
    try:
        for step in range(start, config.steps):
            record = trainer.step(step)
            done = step + 1
            if evaluate is not None and config.eval_every and (done % config.eval_every == 0 or done == config.steps):
                record.update(evaluate(model, tokenizer))
            metrics.log(record)
            if done % config.log_every == 0 or done == config.steps:
                tqdm.write(format_line(record))
            bar.update(1)
            if config.save_every and done % config.save_every == 0 and done < config.steps:
                state = {"step": done, "optimizer": trainer.optimizer.state_dict(), "train_config": resolved}
                ckpt.save_checkpoint(stage_dir / f"step-{done}", model, resolved, config.init, state)
                ckpt.prune(stage_dir, config.keep_last)
    finally:
        metrics.close()
        bar.close()
    ckpt.save_checkpoint(final, model, resolved, config.init)
    from nanoseek.train.plots import plot_rl

    plot_rl(read_metrics(stage_dir / "metrics.jsonl"), stage_dir / "rl_curves.png")
    return final


def load_grpo_config(path: str | None, overrides: list[str] | None = None) -> GRPOConfig:
    return load_config(GRPOConfig, path, overrides)
