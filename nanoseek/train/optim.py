"""AdamW and the learning-rate schedule: linear warmup, then cosine or warmup-stable-decay (WSD).

V3 pretraining (docs/facts.md §12): AdamW betas (0.9, 0.95), weight decay 0.1, gradient clip 1.0, and
a constant phase before the decay, which is what WSD gives. Decay is not applied to norms, the
router bias (a buffer, never here) or other 1-D weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class OptimizerConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr (V3: 2.2e-5 / 2.2e-4)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    schedule: Literal["cosine", "wsd"] = "cosine"
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # WSD: share of the steps spent decaying at the end

    def __post_init__(self) -> None:
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optimizer.lr must be > 0 and optimizer.min_lr_ratio in [0, 1] "
                             f"(got {self.lr}, {self.min_lr_ratio})")
        if self.warmup_steps < 0 or not 0 < self.decay_fraction <= 1:
            raise ValueError("optimizer.warmup_steps must be >= 0 and optimizer.decay_fraction in (0, 1]")


def lr_at(step: int, total_steps: int, config: OptimizerConfig) -> float:
    """Learning rate of optimizer step `step` (0-based)."""
    peak, floor = config.lr, config.lr * config.min_lr_ratio
    warmup = min(config.warmup_steps, total_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if config.schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = max(warmup, total_steps - round(config.decay_fraction * total_steps))
    if step < decay_start:
        return peak
    progress = (step - decay_start) / max(1, total_steps - decay_start)
    return peak - (peak - floor) * min(progress, 1.0)


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 and "embed_tokens" not in name else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    device = next(model.parameters()).device
    # fused AdamW is one kernel per step on CUDA and a vectorised loop on CPU; both beat foreach.
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps,
                                  fused=device.type in ("cuda", "cpu"))
    optimizer.register_step_post_hook(_mark_parameters_changed)
    return optimizer


def _mark_parameters_changed(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Fused AdamW writes the parameters without bumping their version counters (torch 2.13), and
    caches keyed on the version (the engine's packed decode weights, model/linear.py) would then
    keep serving the weights of before the step: GRPO's rollouts would sample a stale policy."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            torch.autograd.graph.increment_version(param)
