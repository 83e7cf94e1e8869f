"""Multi-head Latent Attention (DeepSeek-V2 report §2.1, V3 report §2.1.1).

Keys and values of all heads come from one low-rank latent c_KV = RMSNorm(W_DKV h); position
information rides on a separate rope key k_pe shared by every head (decoupled RoPE). Two forms:

* naive: expand c_KV through kv_b_proj into per-head keys and values, then ordinary attention.
  Cheapest in FLOPs, used for training and for prefill of a fresh sequence.
* absorbed: fold W_UK into the query and W_UV into the output, and attend directly over the cached
  [c_KV ‖ k_pe] rows as multi-query attention with a (kv_lora_rank + rope) key whose first
  kv_lora_rank dims are the value (V2 report App. C). kv_b_proj never touches cached tokens, which
  is what makes decode cheap. Used whenever a sequence already has cached tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.cache import LatentCache
from nanoseek.model.config import ModelConfig
from nanoseek.model.linear import Linear
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import RotaryEmbedding


# From this many queries on, `absorbed` expands the cached latents instead: the latent form spends
# S*H*T*(2c - n - v) extra multiply-adds against T*c*H*(n + v) for the expansion, which breaks even
# near S = 128 (bench config) to 170 (V3 dims), and its S*H*T score matrix would grow with the chunk.
EXPAND_MIN_QUERIES = 128


def batched_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.bmm, but one 2-D product for a batch of one. Compiled, a batch of one gets stride 0 on
    its batch dim, which sends ATen's CPU bmm off its BLAS path (5x slower over a 4096-token cache)."""
    return torch.mm(a[0], b[0])[None] if a.shape[0] == 1 else torch.bmm(a, b)


def logn_scale(slots: torch.Tensor, length: int) -> torch.Tensor:
    """max(1, log(n) / log(length)) for the n-th token, n = slot + 1: the log-n factor on its logits."""
    return ((slots + 1).float().log() / math.log(length)).clamp_min(1.0)


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig, rope: RotaryEmbedding):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.latent_dim = config.v_head_dim, config.kv_lora_rank
        self.softmax_scale = config.softmax_scale
        self.logn_length = config.logn_attention_length
        self.rope = rope  # shared by all layers; not a parameter owner
        qk_dim, bias = config.qk_head_dim, config.attention_bias
        if config.q_lora_rank is None:
            self.q_proj = Linear(config.hidden_size, self.num_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = Linear(config.hidden_size, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = Linear(config.q_lora_rank, self.num_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(config.hidden_size, self.latent_dim + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.latent_dim, config.rms_norm_eps)
        self.kv_b_proj = Linear(self.latent_dim, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(self.num_heads * self.v_dim, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCache | None = None, layer: int = 0, positions: torch.Tensor | None = None,
                absorb: bool = False, visible: int | None = None) -> torch.Tensor:
        """x [B, S, d]. Without a cache: causal attention over x. With a cache: the new rows are
        written at `positions` [B, S] and attended together with what the cache holds. `visible`
        (default positions.max() + 1, a host sync) is how many cache positions any query may see."""
        batch, seq, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        if self.logn_length:
            # The count of keys a query sees is its cache slot + 1, not its rope position (which PoSE
            # training spreads out): without a cache the slots are 0..seq-1.
            slots = positions if cache is not None else torch.arange(seq, device=x.device)
            q = q * logn_scale(slots, self.logn_length)[..., None].to(q.dtype)
        q_nope, q_pe = q.view(batch, seq, self.num_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = self.rope.rotate(q_pe, cos, sin)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.latent_dim, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_pe = self.rope.rotate(k_pe, cos, sin)

        if cache is not None:
            cache.write(layer, positions, torch.cat((latent, k_pe), dim=-1))
        if absorb:
            assert cache is not None, "the absorbed form reads the latent cache"
            visible = int(positions.max()) + 1 if visible is None else visible
            out = self.absorbed(q_nope, q_pe, cache.kv[layer], positions, visible)
        else:
            out = self.naive(q_nope, q_pe, latent, k_pe)
        return self.o_proj(out.reshape(batch, seq, self.num_heads * self.v_dim))

    def naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
              k_pe: torch.Tensor) -> torch.Tensor:
        """Causal attention among the given tokens with expanded per-head keys and values -> [B, S, H, v]."""
        batch, seq, heads, _ = q_nope.shape
        k_nope, value = self.kv_b_proj(latent).view(batch, seq, heads, -1).split([self.nope_dim, self.v_dim], -1)
        query = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)
        key = torch.cat((k_nope, k_pe[:, :, None].expand(-1, -1, heads, -1)), dim=-1).transpose(1, 2)
        value = value.transpose(1, 2)
        # The CPU flash kernel needs equal q/k/v head sizes, else SDPA silently materialises the full
        # score matrix (docs/facts.md §13): zero-pad the smaller side, slice the output back.
        # Pad only the side that is short (F.pad by zero still copies, forward and backward).
        width = max(query.shape[-1], value.shape[-1])
        if query.shape[-1] < width:
            query, key = F.pad(query, (0, width - query.shape[-1])), F.pad(key, (0, width - key.shape[-1]))
        if value.shape[-1] < width:
            value = F.pad(value, (0, width - value.shape[-1]))
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=self.softmax_scale)
        return out[..., :self.v_dim].transpose(1, 2)

    def absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cached: torch.Tensor,
                 positions: torch.Tensor, visible: int) -> torch.Tensor:
        """Attention over the first `visible` cached [c_KV ‖ k_pe] rows of [B, capacity, latent+rope];
        query token i of row b sees cached positions <= positions[b, i]. Returns [B, S, H, v].

        A few queries (decode, speculative verification) attend in the latent space and never run
        kv_b_proj over cached tokens; a long chunk of queries (chunked prefill) goes to `expanded`."""
        batch, seq, heads, _ = q_nope.shape
        if seq >= EXPAND_MIN_QUERIES:
            return self.expanded(q_nope, q_pe, cached, positions, visible)
        w_kv = self.kv_b_proj.weight.view(heads, self.nope_dim + self.v_dim, self.latent_dim)
        # Head-major bmm against views of the weight: W_UK and W_UV are never copied per step.
        q_latent = torch.bmm(q_nope.reshape(batch * seq, heads, -1).transpose(0, 1), w_kv[:, :self.nope_dim])
        q_latent = q_latent.transpose(0, 1).reshape(batch, seq * heads, self.latent_dim)
        # Scaling the query, not the scores, touches S*H*(c+r) numbers instead of S*H*T.
        query = torch.cat((q_latent, q_pe.reshape(batch, seq * heads, -1)), dim=-1) * self.softmax_scale
        keys = cached[:, :visible]
        scores = batched_product(query, keys.transpose(1, 2)).float()
        seen = torch.arange(keys.shape[1], device=keys.device) <= positions[..., None]  # [B, S, T]
        scores = scores.view(batch, seq, heads, -1).masked_fill(~seen[:, :, None], float("-inf"))
        probs = scores.softmax(dim=-1).to(keys.dtype).view(batch, seq * heads, -1)
        out_latent = batched_product(probs, keys[..., :self.latent_dim])  # [B, S*H, c]: the value is the latent
        out = torch.bmm(out_latent.view(batch * seq, heads, -1).transpose(0, 1),
                        w_kv[:, self.nope_dim:].transpose(1, 2))  # [H, B*S, v]
        return out.transpose(0, 1).reshape(batch, seq, heads, self.v_dim)

    def expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cached: torch.Tensor,
                 positions: torch.Tensor, visible: int) -> torch.Tensor:
        """The naive form over a cached prefix, for chunked prefill: expand the visible latents through
        kv_b_proj and run SDPA. The mask is explicit because is_causal aligns top-left when there are
        fewer queries than keys (docs/facts.md §13). Same contract as `absorbed`."""
        batch, seq, heads, _ = q_nope.shape
        keys = cached[:, :visible]
        k_nope, value = self.kv_b_proj(keys[..., :self.latent_dim]).view(batch, keys.shape[1], heads, -1).split(
            [self.nope_dim, self.v_dim], -1)
        k_pe = keys[..., self.latent_dim:][:, :, None].expand(-1, -1, heads, -1)
        query = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)
        key = torch.cat((k_nope, k_pe), dim=-1).transpose(1, 2)
        value = value.transpose(1, 2)
        visible = (torch.arange(keys.shape[1], device=keys.device) <= positions[..., None])[:, None]  # [B, 1, S, T]
        width = max(query.shape[-1], value.shape[-1])  # equal head sizes keep the flash kernel (see naive)
        query, key = F.pad(query, (0, width - query.shape[-1])), F.pad(key, (0, width - key.shape[-1]))
        out = F.scaled_dot_product_attention(query, key, F.pad(value, (0, width - value.shape[-1])),
                                             attn_mask=visible, scale=self.softmax_scale)
        return out[..., :self.v_dim].transpose(1, 2)
