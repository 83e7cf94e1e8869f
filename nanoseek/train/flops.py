"""Model FLOPs utilisation: training FLOPs per token over a matmul peak measured on this machine.

FLOPs/token = 6 * N_active + 3 * L * S * H * (d_qk + d_v): 6N for the forward and backward matmuls
of the active weights (the input embedding is a lookup, the output head a matmul), plus the two
attention products, 2 * S * H * (d_qk + d_v) per layer forward, tripled for the backward, halved
for the causal mask.
"""

from __future__ import annotations

import statistics
import time

import torch

from nanoseek.model.moe import MoE
from nanoseek.model.transformer import Transformer


def active_matmul_params(model: Transformer, with_mtp: bool = False) -> int:
    """Parameters one token multiplies through: main model minus the embedding and the experts it
    does not use; with_mtp adds each MTP depth's block, projection and its pass through the head."""
    counts = model.num_parameters()
    active = counts["active"] - (0 if model.config.tie_word_embeddings else counts["embedding"])
    if with_mtp:
        cfg = model.config
        for module in model.mtp:
            active += sum(p.numel() for p in module.parameters()) + model.lm_head.weight.numel()
            if isinstance(module.block.mlp, MoE):
                experts = module.block.mlp.experts
                per_expert = experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()
                active -= per_expert * (cfg.n_routed_experts - cfg.num_experts_per_tok)
    return active


def flops_per_token(model: Transformer, seq_len: int, with_mtp: bool = False) -> float:
    cfg = model.config
    layers = cfg.num_hidden_layers + (len(model.mtp) if with_mtp else 0)
    attention = 3 * layers * seq_len * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return 6 * active_matmul_params(model, with_mtp) + attention


def measure_matmul_flops(size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                         repeats: int = 5) -> float:
    """Median FLOP/s of one square `torch.mm` of the given size (after a warm-up call)."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call pays for allocation and thread start-up
            times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               sizes: tuple[int, ...] = (2048, 4096), repeats: int = 5) -> float:
    """The larger median matmul FLOP/s over `sizes`: the denominator of MFU."""
    return max(measure_matmul_flops(n, device, dtype, repeats) for n in sizes)
