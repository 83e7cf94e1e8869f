"""Fast paths against their slow references: absorbed vs naive MLA, cached decoding vs full
forward, grouped vs looped experts, and routing that transformers does not implement against
routing computed by hand."""

import ast
import itertools
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F

from conftest import YARN_V3, random_model, tiny_config
import nanoseek.model.moe as moe_module
from nanoseek.model.checkpoint import transformers_gaps
from nanoseek.model.config import ConfigError
from nanoseek.model.moe import MoE


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None, "rope_scaling": YARN_V3}])
def test_absorbed_equals_naive(overrides):
    model = random_model(tiny_config(**overrides))
    ids = torch.randint(0, 128, (2, 33))
    with torch.no_grad():
        naive = model(ids, model.new_cache(2, 40), absorb=False)
        absorbed = model(ids, model.new_cache(2, 40), absorb=True)
    assert (naive - absorbed).abs().max().item() < 1e-5


def test_incremental_decoding_equals_full_forward():
    model = random_model(tiny_config(rope_scaling=YARN_V3))
    ids = torch.randint(0, 128, (3, 48))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(3, 64)
        pieces = [model(ids[:, :20], cache)]  # prefill (naive), then a chunk and single tokens (absorbed)
        pieces.append(model(ids[:, 20:31], cache))
        pieces += [model(ids[:, t:t + 1], cache) for t in range(31, 48)]
    assert cache.lengths.tolist() == [48, 48, 48]
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() < 1e-5


def test_logn_attention_scales_logits_beyond_its_length_in_every_form():
    """Log-n attention is the plain model on the first `length` tokens, then the logits of token n
    times log(n)/log(length): checked against scaling the softmax by hand, and cached (chunked
    prefill, expanded and absorbed forms, single-token decode) against the full forward."""
    length = 16
    model = random_model(tiny_config(rope_scaling=YARN_V3, logn_attention_length=length))
    plain = random_model(tiny_config(rope_scaling=YARN_V3))
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        full = model(ids)
        assert (full[:, :length] - plain(ids)[:, :length]).abs().max() < 1e-6
        assert (full[:, length:] - plain(ids)[:, length:]).abs().max() > 1e-3
        # By hand, in one layer (where only the last query shapes the last output): the last token's
        # logits are the plain layer's with its softmax scale times log(40)/log(16).
        one, one_plain = (random_model(tiny_config(rope_scaling=YARN_V3, num_hidden_layers=1, logn_attention_length=n))
                          for n in (length, None))
        one_plain.layers[0].self_attn.softmax_scale *= math.log(40) / math.log(length)
        assert (one_plain(ids)[:, -1] - one(ids)[:, -1]).abs().max() < 1e-5
        assert (one_plain(ids)[:, -2] - one(ids)[:, -2]).abs().max() > 1e-3
        cache = model.new_cache(2, 48)
        pieces = [model(ids[:, :10], cache), model(ids[:, 10:21], cache), model(ids[:, 21:30], cache, absorb=True)]
        pieces += [model(ids[:, t:t + 1], cache) for t in range(30, 40)]
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-5
    assert any("logn_attention_length" in gap for gap in transformers_gaps(model.config))
    with pytest.raises(ConfigError, match="logn_attention_length"):
        tiny_config(logn_attention_length=1)


def test_position_ids_move_rope_positions_only():
    """Training-time position ids (PoSE): the default ones change nothing, a constant shift changes
    nothing (RoPE sees distances), a skip changes the output after it and only there."""
    model = random_model(tiny_config(rope_scaling=YARN_V3))
    ids = torch.randint(0, 128, (2, 24))
    positions = torch.arange(24).expand(2, 24)
    skipped = positions + (positions >= 10) * 50
    with torch.no_grad():
        default = model(ids)
        assert torch.equal(model.hidden_states(ids, position_ids=positions), model.hidden_states(ids))
        assert (model.lm_head(model.hidden_states(ids, position_ids=positions + 7)) - default).abs().max() < 1e-5
        moved = model.lm_head(model.hidden_states(ids, position_ids=skipped))
        assert (moved[:, :10] - default[:, :10]).abs().max() < 1e-5
        assert (moved[:, 10:] - default[:, 10:]).abs().max() > 1e-3
        labels = torch.randint(0, 128, (2, 24))
        assert model.compute_loss(ids, labels, position_ids=skipped)["loss"] != model.compute_loss(ids, labels)["loss"]
    with pytest.raises(ValueError, match="position_ids"):
        model.hidden_states(ids, model.new_cache(2, 32), position_ids=positions)


def test_ragged_rows_in_one_cache():
    """Rows at different lengths decode together; each matches its own full forward."""
    model = random_model(tiny_config())
    a, b = torch.randint(0, 128, (1, 12)), torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        cache = model.new_cache(2, 32)
        padded = torch.cat((a, F.pad(b, (0, 5))), dim=0)
        model(padded, cache)
        cache.lengths = torch.tensor([12, 7])
        step = model(torch.tensor([[5], [9]]), cache)[:, -1]
        expect_a = model(torch.cat((a, torch.tensor([[5]])), 1))[0, -1]
        expect_b = model(torch.cat((b, torch.tensor([[9]])), 1))[0, -1]
    assert (step[0] - expect_a).abs().max() < 1e-5 and (step[1] - expect_b).abs().max() < 1e-5


def test_cache_overflow_is_an_error():
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match="capacity"):
        model(torch.zeros(1, 9, dtype=torch.long), model.new_cache(1, 8))


@pytest.mark.parametrize("config", [dict(), dict(n_routed_experts=16, num_experts_per_tok=6, n_group=4, topk_group=2)])
def test_grouped_experts_equal_loop(config):
    model = random_model(tiny_config(**config))
    moe = model.moe_layers()[0]
    x = torch.randn(3, 21, 64)
    fast = moe(x)
    moe.use_reference_experts = True
    slow = moe(x)
    assert (fast - slow).abs().max().item() < 1e-5
    # Gradients too: the grouped path is what training differentiates.
    moe.use_reference_experts = False
    fast.sum().backward()
    grad_fast = moe.experts.gate_up_proj.grad.clone()
    moe.experts.gate_up_proj.grad = None
    moe.use_reference_experts = True
    moe(x).sum().backward()
    assert (grad_fast - moe.experts.gate_up_proj.grad).abs().max().item() < 1e-5


def loop_grouped_matmul(rows, weight, ends):
    """Stand-in for moe.grouped_matmul (torch._grouped_mm, a CUDA bf16 kernel): the groups that
    `ends` defines, one F.linear each; an empty group gives no rows."""
    starts = [0] + ends.tolist()[:-1]
    return torch.cat([F.linear(rows[s:e], weight[g]) for g, (s, e) in enumerate(zip(starts, ends.tolist()))])


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_grouped_kernel_equals_loop(monkeypatch, tokens):
    """The CUDA path's sort, offsets and un-sort, run on CPU around a looping stand-in for the grouped
    GEMM: output and every gradient equal the loop over experts. One token leaves most experts empty."""
    monkeypatch.setattr(moe_module, "grouped_matmul", loop_grouped_matmul)
    model = random_model(tiny_config(n_routed_experts=16, num_experts_per_tok=6, n_group=4, topk_group=2))
    experts = model.moe_layers()[0].experts
    x = torch.randn(tokens, 64, requires_grad=True)
    weights = torch.rand(tokens, 6, requires_grad=True)
    indices = torch.stack([torch.randperm(16)[:6] for _ in range(tokens)])
    results = []
    for path in (experts.grouped_kernel, experts.forward_reference):
        out = path(x, weights, indices)
        params = (x, weights, experts.gate_up_proj, experts.down_proj)
        results.append((out, *torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), params)))
    for fast, slow in zip(*results):
        assert (fast - slow).abs().max().item() < 1e-5


def test_grouped_matmul_stand_in_matches_torch():
    """The stand-in means what torch._grouped_mm means (where this torch runs it on CPU)."""
    rows, weight = torch.randn(10, 16), torch.randn(4, 8, 16)
    ends = torch.tensor([3, 3, 9, 10], dtype=torch.int32)
    try:
        real = moe_module.grouped_matmul(rows, weight, ends)
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"torch._grouped_mm does not run on CPU here: {error}")
    assert (real - loop_grouped_matmul(rows, weight, ends)).abs().max().item() < 1e-5


def hand_routing(scores, bias, method, n_group, topk_group, top_k, norm, scale):
    """Routing of one token written out with Python lists (docs/facts.md §5)."""
    scores, bias = scores.tolist(), bias.tolist() if bias is not None else [0.0] * len(scores)
    choice = [s + b for s, b in zip(scores, bias)]
    size = len(scores) // n_group
    allowed = set(range(len(scores)))
    if method != "greedy" and n_group > 1:
        groups = [choice[g * size:(g + 1) * size] for g in range(n_group)]
        rank = [sum(sorted(g, reverse=True)[:2]) if method == "noaux_tc" else max(g) for g in groups]
        kept = sorted(range(n_group), key=lambda g: -rank[g])[:topk_group]
        allowed = {g * size + i for g in kept for i in range(size)}
    chosen = sorted(allowed, key=lambda e: -choice[e])[:top_k]
    weights = [scores[e] for e in chosen]
    if norm:
        weights = [w / sum(weights) for w in weights]
    return {e: w * scale for e, w in zip(chosen, weights)}


# Combinations transformers lacks (its V3 hard-codes sigmoid + noaux_tc; its V2 softmax, no renorm).
UNSUPPORTED_BY_HF = list(itertools.product(["softmax", "sigmoid"], ["greedy", "group_limited_greedy", "noaux_tc"],
                                           [True, False]))


@pytest.mark.parametrize("scoring,method,norm", UNSUPPORTED_BY_HF)
def test_router_matches_hand_computed_routing(scoring, method, norm):
    config = tiny_config(scoring_func=scoring, topk_method=method, norm_topk_prob=norm, n_routed_experts=12,
                         num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=1.5)
    model = random_model(config, seed=5)
    gate = model.moe_layers()[0].gate
    x = torch.randn(40, 64)
    scores, weights, indices = gate(x)
    logits = x @ gate.weight.T
    expected_scores = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(-1)
    assert torch.allclose(scores, expected_scores, atol=1e-6)
    bias = gate.e_score_correction_bias if method == "noaux_tc" else None
    for t in range(40):
        want = hand_routing(expected_scores[t], bias, method, 4, 2, 3, norm, 1.5)
        got = dict(zip(indices[t].tolist(), weights[t].tolist()))
        assert set(got) == set(want)
        assert all(abs(got[e] - want[e]) < 1e-6 for e in want)


def test_noaux_bias_selects_but_does_not_weight():
    config = tiny_config(n_group=1, topk_group=1)
    gate = random_model(config).moe_layers()[0].gate
    x = torch.randn(10, 64)
    with torch.no_grad():
        gate.e_score_correction_bias.zero_()
        gate.e_score_correction_bias[5] = 100.0  # forces expert 5 into every token's choice
    scores, weights, indices = gate(x)
    assert (indices == 5).any(dim=1).all()
    slot = (indices == 5).float().argmax(dim=1)
    w5 = weights[torch.arange(10), slot]
    top = scores.gather(1, indices)
    assert torch.allclose(w5, scores[:, 5] / top.sum(1) * 2.5, atol=1e-6)


def test_moe_layer_freq_places_moe_layers():
    config = tiny_config(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    model = random_model(config)
    assert [isinstance(layer.mlp, MoE) for layer in model.layers] == [False, False, True, False, True, False]


def test_routing_statistics_count_every_choice():
    model = random_model(tiny_config())
    with torch.no_grad():
        model(torch.randint(0, 128, (2, 15)))
    for moe in model.moe_layers():
        assert moe.tokens_per_expert.sum().item() == 2 * 15 * 2
        assert moe.last_indices.shape == (2, 15, 2)


def test_sequence_balance_loss_is_alpha_at_perfect_balance():
    model = random_model(tiny_config(n_routed_experts=4, num_experts_per_tok=1, n_group=1, topk_group=1))
    moe = model.moe_layers()[0]
    moe.aux_loss_alpha = 1e-4
    scores = torch.full((1, 4, 4), 0.25)
    indices = torch.arange(4).view(1, 4, 1)
    assert moe.sequence_balance_loss(scores, indices).item() == pytest.approx(1e-4)
    skewed = torch.zeros(1, 4, 1, dtype=torch.long)
    assert moe.sequence_balance_loss(scores, skewed).item() == pytest.approx(1e-4)  # f skewed, P uniform
    peaked = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).expand(1, 4, 4)
    assert moe.sequence_balance_loss(peaked, skewed).item() > 3e-4


def test_mtp_loss_trains_the_mtp_module():
    model = random_model(tiny_config(num_nextn_predict_layers=2)).train()
    ids = torch.randint(0, 128, (2, 16))
    out = model.compute_loss(ids[:, :-1], ids[:, 1:], mtp_weight=0.3)
    assert set(out) >= {"loss", "ce", "mtp"}
    assert out["loss"].item() == pytest.approx(out["ce"].item() + 0.3 * out["mtp"].item(), rel=1e-6)
    out["loss"].backward()
    assert model.mtp[1].eh_proj.weight.grad.abs().sum() > 0
    # MTP depth 1 predicts two tokens ahead from (h_i, token i+1): check against a manual pass.
    with torch.no_grad():
        hidden = model.hidden_states(ids[:, :-1])
        h1 = model.mtp_hidden(0, hidden[:, :-1], ids[:, 1:-1])
        logits = model.lm_head(model.mtp[0].norm(h1))
        ce1 = F.cross_entropy(logits.flatten(0, 1), ids[:, 2:].flatten())
        h2 = model.mtp_hidden(1, h1[:, :-1], ids[:, 2:-1])
        ce2 = F.cross_entropy(model.lm_head(model.mtp[1].norm(h2)).flatten(0, 1), ids[:, 3:].flatten())
    assert out["mtp"].item() == pytest.approx(((ce1 + ce2) / 2).item(), rel=1e-5)


def test_model_code_never_imports_torch_distributed():
    root = pathlib.Path(__file__).parent.parent / "nanoseek" / "model"
    imported = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                imported += [f"{node.module}.{alias.name}" for alias in node.names]
    assert "torch.nn.functional" in imported  # the walk does see imports
    assert not [name for name in imported if name.startswith("torch.distributed")]


def test_moe_trains_under_bf16_autocast():
    """Training on a GPU runs under bf16 autocast: expert outputs are bf16 while the residual stream is
    fp32. The same mix on CPU must run forward and backward and stay close to fp32."""
    model = random_model(tiny_config()).train()
    ids = torch.randint(0, 128, (2, 16))
    reference = model.compute_loss(ids[:, :-1], ids[:, 1:])["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.compute_loss(ids[:, :-1], ids[:, 1:])["loss"]
    loss.backward()
    assert model.moe_layers()[0].experts.gate_up_proj.grad.abs().sum() > 0
    assert abs(loss.item() - reference.item()) < 0.05 * reference.item()
