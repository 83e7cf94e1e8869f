"""Rotary position embedding for the decoupled MLA rope dimensions, with YaRN or linear scaling.

DeepSeek checkpoints store the rope rows of q and k as adjacent pairs (2i, 2i+1), each pair one
complex number rotated by pos * theta_i (official `apply_rotary_emb`). We rotate those pairs in
place, so hub weights load and save without any permutation. A Llama-style rotate_half on these
weights is silently wrong (docs/facts.md §3); `interleaved=False` is only for checkpoints whose config
says `rope_interleave: false`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nanoseek.model.config import ModelConfig


def yarn_inverse_frequencies(dim: int, base: float, factor: float, original_max_positions: int,
                             beta_fast: float, beta_slow: float, truncate: bool = True) -> torch.Tensor:
    """NTK-by-parts interpolation (YaRN arXiv 2309.00071 §3.2): keep high frequencies, divide the
    low ones by `factor`, blend linearly between the correction dimensions of beta_fast and beta_slow."""

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original_max_positions / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    theta = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return theta * (1 - ramp) + (theta / factor) * ramp


def ntk_rope_theta(base: float, factor: float, dim: int) -> float:
    """NTK-aware scaling (YaRN arXiv 2309.00071 §3.1): the base b * s^(dim/(dim-2)) that stretches
    the lowest frequency by exactly `factor` while leaving the highest nearly untouched. It is a
    plain RoPE base, so a model scaled this way needs no rope_scaling entry at all."""
    return base * factor ** (dim / (dim - 2))


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    dim = config.qk_rope_head_dim
    yarn = config.yarn
    if yarn is None:
        theta = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        if config.rope_type == "linear":
            # Position interpolation (Chen et al. 2023, arXiv 2306.15595): position p is rotated as p / factor.
            theta = theta / config.rope_scaling["factor"]
        return theta
    return yarn_inverse_frequencies(dim, config.rope_theta, yarn["factor"], yarn["original_max_position_embeddings"],
                                    yarn["beta_fast"], yarn["beta_slow"], yarn["truncate"])


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for given positions and rotates the rope part of q and k."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.interleaved = config.rope_interleave
        self.amplitude = config.rope_amplitude
        self.register_buffer("inv_freq", inverse_frequencies(config), persistent=False)

    def _apply(self, fn, recurse=True):
        # Frequencies stay fp32 whatever dtype the model is cast to: bf16 angles are wrong beyond ~256 positions.
        super()._apply(fn, recurse)
        self.inv_freq = self.inv_freq.float()
        return self

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, dim/2] (one angle per rotated pair)."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)
        return (angles.cos() * self.amplitude).to(dtype), (angles.sin() * self.amplitude).to(dtype)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, ..., dim] rotated by cos/sin [B, T, dim/2]; the layout of x is kept."""
        while cos.dim() < x.dim():
            cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        if self.interleaved:
            pairs = x.unflatten(-1, (-1, 2))
            real, imag = pairs[..., 0], pairs[..., 1]
            return torch.stack((real * cos - imag * sin, imag * cos + real * sin), dim=-1).flatten(-2)
        half = x.shape[-1] // 2
        first, second = x[..., :half], x[..., half:]
        return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
