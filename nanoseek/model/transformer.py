"""The DeepSeek-V3 / V2 decoder: embedding, pre-norm blocks of MLA + (dense MLP | DeepSeekMoE),
final norm, output head, and optional multi-token-prediction modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nanoseek.model.attention import MultiHeadLatentAttention
from nanoseek.model.cache import LatentCache
from nanoseek.model.config import ModelConfig
from nanoseek.model.linear import Linear
from nanoseek.model.moe import MLP, MoE
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rope: RotaryEmbedding, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(config, rope)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None,
                layer: int = 0, positions: torch.Tensor | None = None, absorb: bool = False,
                visible: int | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, positions, absorb, visible)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPModule(nn.Module):
    """One multi-token-prediction depth (V3 report §2.2). Combines the previous depth's hidden state
    at position i with the embedding of token i+k (embedding first, as the released weights need),
    runs one decoder block, and predicts token i+k+1 through the shared output head."""

    def __init__(self, config: ModelConfig, rope: RotaryEmbedding):
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = DecoderLayer(config, rope, moe=config.has_moe)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)  # hub: shared_head.norm

    def forward(self, hidden: torch.Tensor, next_embeddings: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCache | None = None, layer: int = 0, positions: torch.Tensor | None = None,
                absorb: bool = False, visible: int | None = None) -> torch.Tensor:
        """Returns this depth's hidden state (pre-norm; apply self.norm before the head)."""
        x = self.eh_proj(torch.cat((self.enorm(next_embeddings), self.hnorm(hidden)), dim=-1))
        return self.block(x, cos, sin, cache, layer, positions, absorb, visible)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rope = RotaryEmbedding(config)
        self.layers = nn.ModuleList(DecoderLayer(config, self.rope, config.is_moe_layer(i))
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPModule(config, self.rope) for _ in range(config.num_nextn_predict_layers))
        self.gradient_checkpointing = False
        self.init_weights()

    # ---- construction ----------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)
        for moe in self.moe_layers():
            if hasattr(moe.gate, "e_score_correction_bias"):
                moe.gate.e_score_correction_bias.zero_()

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self, batch_size: int, capacity: int, with_mtp: bool = False) -> LatentCache:
        layers = self.config.num_hidden_layers + (len(self.mtp) if with_mtp else 0)
        return LatentCache(self.config, batch_size, capacity, layers, self.device, self.dtype)

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, cache: LatentCache | None = None, *,
                absorb: bool | None = None, return_hidden: bool = False, visible: int | None = None):
        """input_ids [B, S] -> logits [B, S, vocab] (and the final normed hidden state if asked).

        With a cache, the tokens are appended to each row at its current length, and the cache
        lengths advance by S. `absorb=None` picks the naive form for a fresh prefill and the
        absorbed form once a row holds cached tokens; True/False force one (tests compare them).
        A caller that knows the longest row can pass `visible` = longest + S with `absorb=True`: the
        host-side checks (overflow, cached prefix) are then skipped, so the whole call has no host
        sync and torch.compile captures it as one graph (the engine's compiled decode step).
        """
        hidden = self.hidden_states(input_ids, cache, absorb=absorb, visible=visible)
        logits = self.lm_head(hidden)
        return (logits, hidden) if return_hidden else logits

    def hidden_states(self, input_ids: torch.Tensor, cache: LatentCache | None = None, *,
                      absorb: bool | None = None, visible: int | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`position_ids` [B, S] (no cache only): the rope positions of the tokens, 0..S-1 by default.
        Training with skipped positions (PoSE, arXiv 2309.10400) shows a short window long distances."""
        batch, seq = input_ids.shape
        if cache is None:
            positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
            absorb = False
        elif position_ids is not None:
            raise ValueError("position_ids are for the cache-less forward; a cache places tokens at its own positions")
        else:
            positions = cache.positions(seq)
            if visible is None:
                longest = cache.check_room(seq)
                visible = longest + seq
                if absorb is None:
                    absorb = longest > 0
                elif not absorb and longest > 0:
                    raise ValueError("the naive form attends only among the new tokens; use absorb for a cached prefix")
            elif not absorb:
                raise ValueError("`visible` is for the absorbed form over a cached prefix")
        cos, sin = self.rope.cos_sin(positions if position_ids is None else position_ids, self.dtype)
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, cache, i, positions, absorb, visible, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, i, positions, absorb, visible)
        if cache is not None:
            cache.advance(seq)
        return self.norm(x)

    def mtp_hidden(self, depth: int, hidden: torch.Tensor, next_ids: torch.Tensor,
                   cache: LatentCache | None = None, positions: torch.Tensor | None = None,
                   absorb: bool = False, visible: int | None = None) -> torch.Tensor:
        """Run MTP depth `depth` (0-based) over aligned (hidden[i], next_ids[i]) pairs. With a cache, the
        block's latent rows go to cache layer num_hidden_layers + depth at the given positions; the
        caller owns the cache lengths. `visible` as in `forward` (no host sync when given)."""
        batch, seq = next_ids.shape
        if positions is None:
            positions = torch.arange(seq, device=next_ids.device).expand(batch, seq)
        cos, sin = self.rope.cos_sin(positions, self.dtype)
        layer = self.config.num_hidden_layers + depth
        return self.mtp[depth](hidden, self.embed_tokens(next_ids), cos, sin, cache, layer, positions, absorb,
                               visible)

    # ---- training objective -------------------------------------------------------------------
    def compute_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, mtp_weight: float = 0.0,
                     ignore_index: int = -100, position_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Next-token cross-entropy on labels [B, S] (labels[t] is the target after input t), plus
        the MTP loss (lambda/D) * sum_k CE_k (V3 eq. 24-25) and the MoE balance losses when enabled.
        Returns a dict with 'loss' (what to backpropagate) and its parts. `position_ids` as in
        `hidden_states`."""
        hidden = self.hidden_states(input_ids, position_ids=position_ids)
        logits = self.lm_head(hidden)
        ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index)
        out = {"ce": ce, "loss": ce}
        if mtp_weight > 0 and len(self.mtp):
            mtp_losses = []
            h = hidden
            for depth in range(len(self.mtp)):
                k = depth + 1
                # depth k pairs h^{k-1}[i] with token i+k and predicts labels[i+k]. Token i+k is read
                # from the inputs: labels are -100 wherever no loss is taken (SFT prompts, padding).
                n = h.shape[1] - 1
                if n <= 0:
                    break
                next_ids = input_ids[:, k:k + n]
                h = self.mtp_hidden(depth, h[:, :n], next_ids,
                                    positions=None if position_ids is None else position_ids[:, :n])
                mtp_logits = self.lm_head(self.mtp[depth].norm(h))
                mtp_labels = labels[:, k:k + n]
                mtp_losses.append(F.cross_entropy(mtp_logits.float().flatten(0, 1), mtp_labels.flatten(),
                                                  ignore_index=ignore_index))
            out["mtp"] = torch.stack(mtp_losses).mean()
            out["loss"] = out["loss"] + mtp_weight * out["mtp"]
        aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        if aux:
            out["aux"] = torch.stack(aux).sum()
            out["loss"] = out["loss"] + out["aux"]
        return out

    def save_pretrained(self, path, max_shard_bytes: int | None = None) -> None:
        """Write the Hugging Face layout (config.json + safetensors); see model/checkpoint.py."""
        from nanoseek.model.checkpoint import DEFAULT_SHARD_BYTES, save_pretrained  # checkpoint imports this module
        save_pretrained(self, path, max_shard_bytes or DEFAULT_SHARD_BYTES)

    # ---- bookkeeping ---------------------------------------------------------------------------
    def num_parameters(self) -> dict[str, int]:
        """Total and per-token active parameters (main model; MTP counted separately)."""
        cfg = self.config
        mtp = sum(p.numel() for p in self.mtp.parameters())
        total = sum(p.numel() for p in self.parameters()) - mtp
        inactive = 0
        for layer in self.layers:
            if isinstance(layer.mlp, MoE):
                per_expert = layer.mlp.experts.gate_up_proj[0].numel() + layer.mlp.experts.down_proj[0].numel()
                inactive += per_expert * (cfg.n_routed_experts - cfg.num_experts_per_tok)
        return {"total": total, "active": total - inactive, "mtp": mtp,
                "embedding": self.embed_tokens.weight.numel()}
