"""MoE load balancing from outside the model (V3 report §2.1.2, docs/facts.md §5).

Aux-loss-free balancing: after each optimizer step, with c_i the tokens routed to expert i over the
whole step (all micro-batches), b_i += gamma * sign(mean(c) - c_i). The bias only picks experts, so
it needs no gradient; it stays an fp32 buffer, and it is re-centred to zero mean after each update
(a common shift changes no top-k choice, so re-centring only stops it drifting).
The sequence-wise auxiliary loss (eqs. 17-20) is computed by the model when `aux_loss_alpha` > 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.model.moe import MoE
from nanoseek.model.transformer import Transformer


@dataclass
class BalanceConfig:
    bias_update_rate: float = 1e-3  # gamma; V3 used 0.001 for most of pretraining, 0 for the last 500B tokens
    bias_update_until: float = 1.0  # fraction of the steps after which gamma is 0 (V3: ~0.97)
    aux_loss_alpha: float = 1e-4  # sequence-wise balance loss weight (V3: 1e-4); 0 turns it off

    def __post_init__(self) -> None:
        if self.bias_update_rate < 0 or self.aux_loss_alpha < 0 or not 0 <= self.bias_update_until <= 1:
            raise ValueError("balance.bias_update_rate and balance.aux_loss_alpha must be >= 0, "
                             "balance.bias_update_until in [0, 1]")


class ExpertLoad:
    """Tokens per expert of every MoE layer, summed over the micro-batches of one optimizer step."""

    def __init__(self, model: Transformer, with_mtp: bool = True):
        """with_mtp=False leaves out the MTP modules' MoEs, which do not run without the MTP loss."""
        chosen = [(f"layer {i}", layer.mlp) for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoE)]
        if with_mtp:
            chosen += [(f"MTP {k}", m.block.mlp) for k, m in enumerate(model.mtp) if isinstance(m.block.mlp, MoE)]
        self.names = [name for name, _ in chosen]
        self.moes = [moe for _, moe in chosen]
        self.counts = [torch.zeros(m.num_experts, device=m.tokens_per_expert.device) for m in self.moes]

    def accumulate(self) -> None:
        """Add the last forward's counts; call after each micro-batch forward."""
        for total, moe in zip(self.counts, self.moes):
            total += moe.tokens_per_expert

    def reset(self) -> None:
        for total in self.counts:
            total.zero_()

    def imbalance(self) -> list[float]:
        """max/mean load per layer: 1.0 is perfect balance, num_experts/top_k the worst."""
        return [float(c.max() / c.mean().clamp_min(1e-9)) for c in self.counts]

    def fractions(self) -> list[list[float]]:
        return [(c / c.sum().clamp_min(1e-9)).tolist() for c in self.counts]


@torch.no_grad()
def update_expert_bias(load: ExpertLoad, rate: float) -> None:
    """b += rate * sign(mean load - load), then re-centred to zero mean (noaux_tc routers only)."""
    if rate <= 0:
        return
    for moe, counts in zip(load.moes, load.counts):
        bias = getattr(moe.gate, "e_score_correction_bias", None)
        if bias is None:
            continue
        counts = counts.float()
        bias += rate * torch.sign(counts.mean() - counts)
        bias -= bias.mean()


def set_aux_loss(model: Transformer, alpha: float) -> None:
    for moe in model.moe_layers():
        moe.aux_loss_alpha = alpha
