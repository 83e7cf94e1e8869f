"""Distillation: a smaller student (MoE or dense) learns from a teacher model folder.

Two modes, both on the shared training loop (`pretrain.train`), so the student's run folder,
checkpoints, exact resume, metrics and plots are every other stage's:

* sequence: SFT of the student on the teacher's verified samples, loss on assistant tokens only.
  This is how DeepSeek-R1 distils its small models (arXiv 2501.12948 §2.4: SFT on ~800k R1
  samples, no RL). Text is the only interface, so teacher and student may tokenize differently.
* logit: the student matches the teacher's whole next-token distribution at every completion token,
  under a generalised Jensen-Shannon divergence (`jsd_loss`). With probability `lmbda` a batch's
  completions are first resampled by the student itself, so that it also learns on the prefixes it
  actually produces (GKD: Agarwal et al. 2024, "On-Policy Distillation of Language Models:
  Learning from Self-Generated Mistakes", arXiv 2306.13649, Algorithm 1; lmbda is its student data
  fraction). Logits are compared token by token, so both models need one vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer as HFTokenizer

from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model.checkpoint import load
from nanoseek.model.config import ModelConfig
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.config import TrainConfigError, load_config, read_yaml
from nanoseek.train.pretrain import TrainConfig, resolve_device, train
from nanoseek.train.sample import SampleConfig, sample
from nanoseek.train.sft import ConversationLoader, SFTConfig, conversation_loader, sft_evaluator


def jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, beta: float = 0.5,
             temperature: float = 1.0) -> torch.Tensor:
    """Mean over the masked tokens of the generalised JSD between S = softmax(student / temperature)
    and T = softmax(teacher / temperature), logits [..., vocab] and mask [...]:

        beta = 0          KL(T || S)  (forward KL: the student covers every teacher mode)
        beta = 1          KL(S || T)  (reverse KL: the student seeks the teacher's main mode)
        0 < beta < 1      beta * KL(T || M) + (1 - beta) * KL(S || M),  M = beta * T + (1 - beta) * S

    The mixture form tends to 0, not to a KL, at either end (M becomes S or T), so the ends are the
    plain KLs. Computed in at least fp32 (float64 stays float64, for gradcheck) and in log
    space (log M by logsumexp); the teacher is detached. Only masked positions are computed at all,
    so whatever the logits hold elsewhere (padding) reaches neither the loss nor its gradient.
    """
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: one vocabulary ({student_logits.shape[-1]} vs "
                         f"{teacher_logits.shape[-1]} entries) is needed to compare them")
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match logits {tuple(student_logits.shape)}")
    active = mask.bool()
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student = (student_logits[active].to(dtype) / temperature).log_softmax(dim=-1)
    teacher = (teacher_logits.detach()[active].to(dtype) / temperature).log_softmax(dim=-1)
    if beta == 0:
        per_token = _kl(teacher, student)
    elif beta == 1:
        per_token = _kl(student, teacher)
    else:
        mixture = torch.logsumexp(torch.stack((teacher + math.log(beta), student + math.log(1 - beta))), dim=0)
        per_token = beta * _kl(teacher, mixture) + (1 - beta) * _kl(student, mixture)
    return per_token.sum() / max(per_token.numel(), 1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row of log-probabilities [N, vocab]."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


@dataclass
class DistillConfig(SFTConfig):
    """Distil `teacher` (any model folder nanoseek loads, a Hugging Face DeepSeek checkpoint
    included) into a student given, as for the other stages, by `init` (a model folder to start
    from) or `model` (a model config: a fresh, smaller MoE or dense model). `data.path` is a JSONL
    file of {"messages": [...]} conversations: the teacher's verified samples, or in mode logit any
    prompts-and-replies set (the off-policy batches, and the prompts of the on-policy ones). Left
    empty, the teacher's samples are drawn first by rejection sampling with the `sampling` settings
    (their model is the teacher). The tokenizer defaults to the student's folder, else the teacher's."""

    stage: str = "distill"
    teacher: str = ""
    mode: Literal["sequence", "logit"] = "sequence"
    beta: float = 0.5  # jsd_loss: 0 = forward KL(teacher || student), 1 = reverse KL(student || teacher)
    temperature: float = 1.0  # softens both distributions in the loss; also the on-policy sampling temperature
    lmbda: float = 0.0  # logit mode: the probability that a batch's completions are sampled by the student
    max_new_tokens: int = 128  # on-policy completions
    # Rejection sampling of the teacher when data.path is empty; out_dir defaults to STAGE/teacher_samples.
    sampling: SampleConfig = field(default_factory=SampleConfig)
    # The logit loss is the main head's divergence alone (no MTP term); sequence mode may set it as SFT does.
    mtp_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.beta <= 1 or not 0 <= self.lmbda <= 1:
            raise TrainConfigError(f"'beta' = {self.beta} and 'lmbda' = {self.lmbda} must be in [0, 1]")
        if not self.temperature > 0:
            raise TrainConfigError(f"'temperature' = {self.temperature}: must be > 0")
        if self.max_new_tokens < 1:
            raise TrainConfigError(f"'max_new_tokens' = {self.max_new_tokens}: must be >= 1")
        if self.mode == "logit" and self.mtp_weight > 0:
            raise TrainConfigError(f"'mtp_weight' = {self.mtp_weight}: logit-level distillation trains the main "
                                   "head on the divergence only; set it to 0")


class LogitDistillation:
    """The training loop's loss for mode logit (GKD, Algorithm 1): with probability `lmbda` the
    batch's completions are replaced by the student's own samples, then the teacher scores the same
    tokens and the loss is `jsd_loss` over the completion tokens (plus the MoE balance loss)."""

    def __init__(self, config: DistillConfig, teacher: Transformer, tokenizer: Tokenizer):
        self.config, self.teacher, self.tokenizer = config, teacher, tokenizer

    def __call__(self, model: Transformer, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        # The global RNG, which checkpoints restore: a resumed run makes the same draws.
        on_policy = float(torch.rand(())) < cfg.lmbda
        if on_policy:
            inputs, labels = self.student_samples(model, inputs, labels)
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        divergence = jsd_loss(model(inputs), teacher_logits, labels != -100, cfg.beta, cfg.temperature)
        out = {"loss": divergence, "divergence": divergence, "on_policy": torch.tensor(float(on_policy))}
        aux = [m.aux_loss for m in model.moe_layers() if m.aux_loss is not None]
        if aux:
            out["aux"] = torch.stack(aux).sum()
            out["loss"] = out["loss"] + out["aux"]
        return out

    def student_samples(self, model: Transformer, inputs: torch.Tensor,
                        labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch with each row's completion sampled anew by the student through the engine: the
        prompt is the row up to its first completion token (a multi-turn conversation keeps only its
        first reply), the labels cover the sampled tokens, EOS included when it stopped. Sample seeds
        come from the global RNG."""
        first = (labels != -100).int().argmax(dim=1).tolist()
        prompts = [row[:start + 1] for row, start in zip(inputs.tolist(), first)]
        params = SamplingParams(max_new_tokens=self.config.max_new_tokens, temperature=self.config.temperature)
        model.eval()
        try:
            groups = Engine(model, eos_token_ids=[self.tokenizer.eos_id]).generate(prompts, params)
        finally:
            model.train()
        rows = [prompt + completion.tokens for prompt, (completion,) in zip(prompts, groups)]
        sampled_inputs = torch.full((len(rows), max(map(len, rows)) - 1), self.tokenizer.pad_id, dtype=torch.long)
        sampled_labels = torch.full_like(sampled_inputs, -100)
        for r, (prompt, row) in enumerate(zip(prompts, rows)):
            sampled_inputs[r, :len(row) - 1] = torch.tensor(row[:-1])
            sampled_labels[r, len(prompt) - 1:len(row) - 1] = torch.tensor(row[len(prompt):])
        return sampled_inputs.to(inputs.device), sampled_labels.to(inputs.device)


def check_vocabularies(teacher_dir: str, teacher_vocab_size: int, tokenizer_dir: str, student_vocab_size: int) -> None:
    """Logit-level distillation compares distributions entry by entry: refuse, naming both sides,
    unless the models' vocab sizes agree and (where the teacher folder has one) the tokenizers map
    the same tokens to the same ids."""
    teacher_tokens, student_tokens = _vocabulary(teacher_dir), _vocabulary(tokenizer_dir)
    if teacher_vocab_size == student_vocab_size and teacher_tokens in (None, student_tokens):
        return
    differ = ("" if teacher_vocab_size != student_vocab_size
              else "; their tokenizers map tokens to different ids")
    raise TrainConfigError(
        f"logit-level distillation needs one vocabulary: the teacher {teacher_dir} has vocab_size "
        f"{teacher_vocab_size} (tokenizer: {_describe(teacher_tokens)}), the student has vocab_size "
        f"{student_vocab_size} (tokenizer {tokenizer_dir}: {_describe(student_tokens)}){differ}. "
        "mode=sequence distils across tokenizers")


def _vocabulary(directory: str) -> dict[str, int] | None:
    path = Path(directory) / "tokenizer.json"
    return HFTokenizer.from_file(str(path)).get_vocab(with_added_tokens=True) if path.is_file() else None


def _describe(tokens: dict[str, int] | None) -> str:
    return "none in the folder" if tokens is None else f"{len(tokens)} tokens"


def distill(config: DistillConfig, resume: bool = False) -> Path:
    """Distil per `config`; returns the student's final/ model folder (weights, config, tokenizer).
    With resume, continue exactly from the newest step checkpoint."""
    if not config.teacher:
        raise TrainConfigError("'teacher' is empty: give the teacher's model folder")
    config.data.path = config.data.path or str(teacher_samples(config))
    config.tokenizer = config.tokenizer or config.init or config.teacher
    evaluate = sft_evaluator(config)
    if config.mode == "sequence":
        return train(config, conversation_loader, resume=resume, evaluate=evaluate)

    teacher = load(config.teacher, device=resolve_device(config.device)).requires_grad_(False)

    # Checked here because the loop is what resolves the student's config (an init folder, or model
    # fields whose vocab_size defaults to the tokenizer's).
    def loader(cfg: TrainConfig, student: ModelConfig) -> ConversationLoader:
        check_vocabularies(config.teacher, teacher.config.vocab_size, cfg.tokenizer, student.vocab_size)
        return conversation_loader(cfg, student)

    loss = LogitDistillation(config, teacher, Tokenizer.load(config.tokenizer))
    return train(config, loader, resume=resume, evaluate=evaluate, loss=loss)


def teacher_samples(config: DistillConfig) -> Path:
    """The teacher's verified samples (`nanoseek.train.sample`) as a conversation file, drawn once:
    a resumed run finds them complete (sample() writes stats.json last) and reuses them."""
    out_dir = Path(config.sampling.out_dir or config.stage_dir / "teacher_samples")
    if (out_dir / "stats.json").exists():
        return out_dir / "samples.jsonl"
    return sample(dataclasses.replace(config.sampling, model=config.teacher, out_dir=str(out_dir)))


def student_overrides(student: str) -> list[str]:
    """A STUDENT argument as config overrides: a model folder is the `init` to start from, a JSON or
    YAML model config file (YAML reads both) the inline `model` fields of a fresh student, so that a
    missing vocab_size is the tokenizer's. Values are written as JSON, which YAML (what overrides are
    parsed as) reads unchanged, so no path is mistaken for another scalar."""
    path = Path(student)
    if path.is_dir():
        return [f"init={json.dumps(student)}"]
    if path.is_file():
        return [f"model={json.dumps(read_yaml(path))}"]
    raise FileNotFoundError(f"student {student}: neither a model folder nor a JSON/YAML model config file")


def load_distill_config(path: str | None, overrides: list[str] | None = None, teacher: str = "",
                        student: str = "") -> DistillConfig:
    """The config file, then `teacher` and `student` (the CLI's two arguments), then overrides."""
    given = ([f"teacher={json.dumps(teacher)}"] if teacher else []) + (student_overrides(student) if student else [])
    return load_config(DistillConfig, path, [*given, *(overrides or [])])
