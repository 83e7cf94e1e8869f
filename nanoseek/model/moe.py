"""DeepSeekMoE: always-on shared experts plus fine-grained routed experts (V2 report §2.2, V3 §2.1.2).

Router: softmax or sigmoid affinities; `greedy` top-k, `group_limited_greedy` (groups ranked by
their best expert, V2) or `noaux_tc` (groups ranked by the sum of their top-2 bias-corrected
scores, V3). The score-correction bias only chooses experts; the weights come from the unbiased
affinities. The bias is a buffer updated outside the model by the training loop (aux-loss-free
balancing), never by gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.config import ModelConfig
from nanoseek.model.linear import Linear, PackedWeight, packed_product, use_packed


def matmul_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the experts multiply in: autocast's where it is on, else the weights'."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def grouped_matmul(rows: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """rows [M, in] sorted by group, weight [G, out, in], ends [G] int32 (group g owns rows
    ends[g-1]:ends[g]) -> [M, out], rows times their group's weight transposed. One CUTLASS grouped
    GEMM on CUDA (bf16, Hopper; an empty group costs nothing); tests replace it with a loop over the
    groups to check the bookkeeping around it on CPU. The weight is passed transposed, as a view:
    the kernel wants its second operand column-major, which [G, out, in] already is."""
    return torch._grouped_mm(rows, weight.transpose(1, 2), offs=ends)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate x) * up x). Dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.scoring_func, self.topk_method = config.scoring_func, config.topk_method
        self.n_group, self.topk_group = config.n_group or 1, config.topk_group or 1
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        if self.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts))

    def _apply(self, fn, recurse=True):
        # Routing decisions are made in fp32 (tiny score gaps flip experts in bf16); the router weight
        # and the bias stay fp32 whatever dtype the rest of the model is cast to.
        super()._apply(fn, recurse)
        self.weight.data = self.weight.data.float()
        if hasattr(self, "e_score_correction_bias"):
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] -> (scores [N, E] fp32, weights [N, k] fp32, expert indices [N, k])."""
        # Under bf16 autocast F.linear would cast both operands back to bf16: opt out explicitly.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias if self.topk_method == "noaux_tc" else scores
        if self.topk_method != "greedy" and self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            kept = group_scores.topk(self.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
            # -inf, not 0: bias-corrected scores can be negative (docs/facts.md §5).
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(-1, self.num_experts)
        indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return scores, weights * self.scaling, indices


class RoutedExperts(nn.Module):
    """All routed experts' weights as two 3-D tensors, as transformers 5 stores them:
    gate_up_proj [E, 2I, d] (rows :I gate, I: up) and down_proj [E, d, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.packed_gate_up, self.packed_down = PackedWeight(), PackedWeight()  # see linear.py

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [N, d] -> [N, d]: `gathered` for one token under torch.compile, and for the several rows of
        a compiled decode step (no autograd) that have no grouped kernel; `grouped_kernel` for bf16 on
        CUDA; else `grouped` (whose data-dependent split would break a compiled graph and recompile
        for every new pattern of counts)."""
        kernel = x.is_cuda and matmul_dtype(x, self.gate_up_proj) == torch.bfloat16
        if torch.compiler.is_compiling() and (x.shape[0] == 1 or not (kernel or torch.is_grad_enabled())):
            return self.gathered(x, weights, indices)
        if kernel:
            return self.grouped_kernel(x, weights, indices)
        return self.grouped(x, weights, indices)

    def gathered(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Each (token, slot) reads its own expert's weights through an index: no sort, no host sync,
        one graph. Compiled, the gather fuses into the multiply-reduce (see linear.py), so a decode
        token reads only its k experts, once. Eager, it would copy them: `grouped` is for that."""
        gate, up = (self.gate_up_proj[indices] * x[:, None, None, :]).sum(dim=-1).chunk(2, dim=-1)  # [N, k, I]
        hidden = F.silu(gate) * up * weights[..., None].to(x.dtype)
        return (self.down_proj[indices] * hidden[:, :, None, :]).sum(dim=-1).sum(dim=1)

    def grouped_kernel(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """`grouped` with each projection as one grouped GEMM over all experts (`grouped_matmul`) and
        no host synchronisation: every shape is N*k rows whatever the routing, so the forward and
        backward queue up without waiting for the GPU, and a compiled graph never sees the counts.
        x [N, d] -> [N, d], in the matmul dtype (`matmul_dtype`)."""
        dtype = matmul_dtype(x, self.gate_up_proj)
        flat_experts = indices.flatten()
        sorted_experts, order = flat_experts.sort(stable=True)
        # End of each expert's rows in the sorted order: a search, not bincount, whose output size
        # (max + 1) is read back from the GPU.
        ends = torch.searchsorted(sorted_experts, torch.arange(self.gate_up_proj.shape[0], device=x.device),
                                  right=True, out_int32=True)
        rows = x[order // indices.shape[1]].to(dtype)
        gate, up = grouped_matmul(rows, self.gate_up_proj.to(dtype), ends).chunk(2, dim=-1)
        # The routing weight scales the I-wide hidden, as in `grouped`.
        hidden = F.silu(gate) * up * weights.flatten()[order, None].to(dtype)
        outputs = grouped_matmul(hidden, self.down_proj.to(dtype), ends)
        unsorted = torch.empty_like(outputs)
        unsorted[order] = outputs
        return unsorted.view(*indices.shape, -1).sum(dim=1)

    def grouped(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Grouped dispatch: sort the (token, slot) pairs by expert so each active expert runs one
        contiguous matmul pair, then put the weighted outputs back. x [N, d] -> [N, d]."""
        flat_experts = indices.flatten()
        order = flat_experts.argsort(stable=True)
        token_of = order // indices.shape[1]
        counts = torch.bincount(flat_experts, minlength=self.gate_up_proj.shape[0]).tolist()
        gathered = x[token_of]
        routing = weights.flatten()[order, None].to(x.dtype)
        if use_packed(x):  # few tokens, no autograd: oneDNN-packed experts (see linear.py)
            gate_up, down = self.packed_gate_up.get(self.gate_up_proj), self.packed_down.get(self.down_proj)
            product = packed_product
        else:
            # unbind, not gate_up_proj[e]: the backward of each indexing would zero-fill a gradient the
            # size of all experts (E of them per step); unbind's backward stacks the E slices once.
            # Likewise split rather than slice the rows: a slice's backward zero-fills all N*k rows.
            gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
            product = F.linear
        chunks = []
        for e, (rows, scale) in enumerate(zip(gathered.split(counts), routing.split(counts))):
            if len(rows):
                gate, up = product(rows, gate_up[e]).chunk(2, dim=-1)
                # The routing weight scales the I-wide hidden rather than the d-wide output: same
                # product (down is linear), fewer multiplies.
                chunks.append(product(F.silu(gate) * up * scale, down[e]))
        # Un-sort with a permutation (no duplicate indices), then sum each token's k slots. index_add_
        # into N rows has k-fold duplicate indices, which CPU scatter_add serialises: 0.3-50 ms per
        # layer at decode (one token, k rows into one), and its summation order is not fixed.
        outputs = torch.cat(chunks)  # the experts' dtype: bf16 under autocast, while x may be fp32
        unsorted = torch.empty_like(outputs)
        unsorted[order] = outputs
        return unsorted.view(*indices.shape, -1).sum(dim=1)

    def forward_reference(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The obvious loop over experts and top-k slots; the grouped path is tested against it."""
        out = torch.zeros_like(x)
        for e in range(self.gate_up_proj.shape[0]):
            for slot in range(indices.shape[1]):
                rows = (indices[:, slot] == e).nonzero().flatten()
                if rows.numel():
                    out[rows] += weights[rows, slot, None].to(x.dtype) * self.expert(e, x[rows])
        return out


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.gate = Router(config)
        self.experts = RoutedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
                               if config.n_shared_experts else None)
        self.use_reference_experts = False
        self.aux_loss_alpha = 0.0  # sequence-wise balance loss weight, set by training
        # Per-forward routing statistics, read by training (bias update, load plots) and analysis.
        self.register_buffer("tokens_per_expert", torch.zeros(self.num_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None
        self.last_indices: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        flat = x.reshape(-1, dim)
        scores, weights, indices = self.gate(flat)
        experts = self.experts.forward_reference if self.use_reference_experts else self.experts
        out = experts(flat, weights, indices).view(batch, seq, dim)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        with torch.no_grad():
            # A fixed-size count (bincount's output size depends on the data, which breaks a compiled graph).
            self.tokens_per_expert = torch.zeros(self.num_experts, device=x.device).index_add_(
                0, indices.flatten(), torch.ones(indices.numel(), device=x.device))
            self.last_indices = indices.view(batch, seq, -1)
        self.aux_loss = (self.sequence_balance_loss(scores.view(batch, seq, -1), indices.view(batch, seq, -1))
                         if self.training and self.aux_loss_alpha > 0 else None)
        return out

    def sequence_balance_loss(self, scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """V3 eqs. 17-20: alpha * sum_i f_i P_i per sequence, averaged over sequences; equals alpha
        at perfect balance. f counts the experts actually selected (bias included)."""
        seq = scores.shape[1]
        counts = torch.zeros_like(scores[:, 0]).scatter_add_(1, indices.flatten(1), torch.ones_like(
            indices.flatten(1), dtype=scores.dtype))
        f = counts * self.num_experts / (self.top_k * seq)
        p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
        return self.aux_loss_alpha * (f * p).sum(dim=-1).mean()
