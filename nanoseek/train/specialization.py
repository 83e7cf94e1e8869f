"""Do experts specialise? Route held-out problems of each task through the model and count, per MoE
layer, which experts the tokens of each task type, and of each part of the text (prompt, reasoning,
answer), are sent to; then measure the normalised mutual information between label and expert
against the same statistic with the labels shuffled across tokens (what NMI shows by chance on
this many samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.data import get_task, sample
from nanoseek.data.task import Task
from nanoseek.model.moe import MoE
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import ANSWER_END, ANSWER_START, THINK_END, THINK_START, Tokenizer

SEGMENTS = ("prompt", "reasoning", "answer")


@dataclass
class Routed:
    """The routed tokens of a set of conversations: labels per token and expert choices per layer."""
    tasks: list[str]
    task_of: torch.Tensor  # [T] index into tasks
    segment_of: torch.Tensor  # [T] index into SEGMENTS
    experts: list[torch.Tensor]  # per MoE layer, [T, k]
    num_experts: int
    layer_ids: list[int]  # decoder layer index of each MoE layer


def labelled_conversation(tokenizer: Tokenizer, task: Task, problem) -> tuple[list[int], list[int]]:
    """Token ids of the problem's chat-format conversation and the segment of each token."""
    solution = task.render_solution(problem)
    answer_at = solution.index(ANSWER_START)
    prompt = [tokenizer.bos_id, tokenizer.user_id] + tokenizer.encode(problem.prompt) + [tokenizer.assistant_id]
    reasoning = tokenizer.encode(solution[:answer_at])
    answer = tokenizer.encode(solution[answer_at:]) + [tokenizer.eos_id]
    ids = prompt + reasoning + answer
    # Special tokens cut the text into independently encoded pieces, so the pieces must add up to
    # the rendering the model trained on; if a tokenizer change breaks that, say so.
    expected = tokenizer.render_conversation(task.conversation(problem))[0]
    if ids != expected:
        raise ValueError("segment-wise encoding differs from render_conversation: the tokenizer merges across "
                         f"{THINK_START}/{THINK_END}/{ANSWER_START}/{ANSWER_END} boundaries")
    return ids, [0] * len(prompt) + [1] * len(reasoning) + [2] * len(answer)


@torch.no_grad()
def route(model: Transformer, tokenizer: Tokenizer, tasks: list[str], problems_per_task: int,
          difficulties: dict[str, list[int]] | None = None, seed: int = 0, batch_size: int = 16) -> Routed:
    """Routing decisions for eval-split problems of `tasks` (teacher-forced full conversations)."""
    rows: list[tuple[list[int], list[int], int]] = []
    for t, name in enumerate(tasks):
        task = get_task(name)
        levels = (difficulties or {}).get(name) or list(task.difficulties)
        for k, difficulty in enumerate(levels):
            share = problems_per_task // len(levels) + (k < problems_per_task % len(levels))
            for problem in sample(task, "eval", share, seed, difficulty):
                ids, segments = labelled_conversation(tokenizer, task, problem)
                rows.append((ids, segments, t))
    was_training = model.training
    model.eval()
    # The main layers' MoEs only: MTP modules are not run here (and drop out at inference).
    layer_ids = [i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoE)]
    moes = [model.layers[i].mlp for i in layer_ids]
    task_of, segment_of, experts = [], [], [[] for _ in moes]
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        longest = max(len(ids) for ids, _, _ in batch)
        ids = torch.full((len(batch), longest), tokenizer.pad_id, dtype=torch.long)
        valid = torch.zeros(len(batch), longest, dtype=torch.bool)
        for r, (row_ids, segments, t) in enumerate(batch):
            ids[r, :len(row_ids)] = torch.tensor(row_ids)
            valid[r, :len(row_ids)] = True
            task_of.append(torch.full((len(row_ids),), t))
            segment_of.append(torch.tensor(segments))
        # Right padding: causal attention keeps the real tokens' routing independent of the padding.
        model.hidden_states(ids.to(model.device))
        for layer, moe in enumerate(moes):
            experts[layer].append(moe.last_indices.cpu()[valid])
    model.train(was_training)
    return Routed(tasks, torch.cat(task_of), torch.cat(segment_of), [torch.cat(e) for e in experts],
                  moes[0].num_experts if moes else 0, layer_ids)


def counts(labels: torch.Tensor, experts: torch.Tensor, n_labels: int, n_experts: int) -> torch.Tensor:
    """[n_labels, n_experts] joint counts of (token label, chosen expert) over all top-k slots."""
    pairs = labels[:, None].expand_as(experts) * n_experts + experts
    return torch.bincount(pairs.flatten(), minlength=n_labels * n_experts).view(n_labels, n_experts).double()


def normalized_mutual_information(joint: torch.Tensor) -> float:
    """I(L; E) / ((H(L) + H(E)) / 2) from a joint count table: 0 = independent, 1 = one determines
    the other."""
    p = joint / joint.sum()
    pl, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pl @ pe)[nz]).log()).sum())
    def entropy(q: torch.Tensor) -> float:
        q = q[q > 0]
        return float(-(q * q.log()).sum())
    denominator = (entropy(pl) + entropy(pe)) / 2
    return mi / denominator if denominator > 0 else 0.0


def specialisation(routed: Routed, seed: int = 0) -> dict:
    """Per MoE layer: routing fractions per label and NMI (task, segment) with shuffled baselines."""
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for layer_id, experts in zip(routed.layer_ids, routed.experts):
        entry: dict = {"layer": layer_id}
        for kind, labels, names in (("task", routed.task_of, routed.tasks),
                                    ("segment", routed.segment_of, list(SEGMENTS))):
            joint = counts(labels, experts, len(names), routed.num_experts)
            shuffled = labels[torch.randperm(len(labels), generator=generator)]
            entry[kind] = {
                "labels": names,
                "fractions": (joint / joint.sum(1, keepdim=True).clamp_min(1)).tolist(),
                "nmi": normalized_mutual_information(joint),
                "nmi_shuffled": normalized_mutual_information(
                    counts(shuffled, experts, len(names), routed.num_experts)),
                "tokens": [int(x) for x in torch.bincount(labels, minlength=len(names))],
            }
        layers.append(entry)
    return {"layers": layers, "num_experts": routed.num_experts, "tokens": int(len(routed.task_of))}
