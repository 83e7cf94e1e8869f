"""Choosing the next token: greedy, or sampled with temperature, top-k and top-p.

Every sampled sequence owns a `torch.Generator` and draws exactly one uniform number per token from
it, then inverts the (truncated) distribution's CDF. A seeded sequence therefore repeats exactly
whatever else shares its batch, and however many sequences come and go around it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How one request generates. temperature 0 is greedy; top_k 0 and top_p 1 switch truncation off."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # stop strings; need the engine's `decode`
    ignore_eos: bool = False
    logprobs: bool = False  # per token log_softmax(logits / T), untruncated (T = 1 when greedy)

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_generator(seed: int | None, sample_index: int, device: torch.device) -> torch.Generator | None:
    """The generator of sample `sample_index` of a request: derived from its seed, so N samples of one
    seeded request differ from each other and repeat across runs; from the global RNG otherwise."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + sample_index) % 2**63)


def select(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           want_logprobs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next tokens [N] for logits [N, vocab] (row i follows params[i], generators[i]), and if asked the
    log-probability of each under log_softmax(logits / T) without truncation (what RL needs)."""
    logits = logits.float()
    if all(p.greedy for p in params) and not want_logprobs:
        return logits.argmax(dim=-1), None  # the common decode step: one op
    temperature = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params],
                               device=logits.device)[:, None]
    scaled = logits / temperature
    tokens = logits.argmax(dim=-1) if all(p.greedy for p in params) else _sample(scaled, params, generators)
    logprobs = None
    if want_logprobs:
        logprobs = scaled.log_softmax(dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs


def _sample(scaled: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    rows, vocab = scaled.shape
    uniform = torch.stack([torch.rand((), generator=g, device=scaled.device) if not p.greedy
                           else torch.zeros((), device=scaled.device) for p, g in zip(params, generators)])
    truncate = any(p.top_k or p.top_p < 1 for p in params)
    if truncate:
        top_k, top_p = truncation(params, vocab, scaled.device)
        probs, order = _sorted_truncated(scaled, top_k, top_p)
    else:
        order, probs = None, scaled.softmax(dim=-1)
    choice = inverse_cdf(probs, uniform)
    tokens = order.gather(1, choice[:, None]).squeeze(1) if order is not None else choice
    greedy_rows = torch.tensor([p.greedy for p in params], device=scaled.device)
    return torch.where(greedy_rows, scaled.argmax(dim=-1), tokens)


def truncation(params: list[SamplingParams], vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row top_k (0 -> the whole vocabulary) and top_p as [N, 1] tensors."""
    top_k = torch.tensor([p.top_k or vocab for p in params], device=device)[:, None]
    top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
    return top_k, top_p


def _sorted_truncated(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k / top-p truncated distribution of scaled logits [N, vocab], in descending order of
    probability (not renormalised), and that order."""
    vocab = scaled.shape[-1]
    values, order = scaled.sort(dim=-1, descending=True)
    values = values.masked_fill(torch.arange(vocab, device=scaled.device) >= top_k, float("-inf"))
    probs = values.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does.
    return probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0), order


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The index drawn from each row of unnormalised probabilities [N, vocab] by uniforms [N] in [0, 1)."""
    cdf = probs.cumsum(dim=-1)
    # right=True lands on the first token whose CDF exceeds u, which always has non-zero mass.
    return torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).clamp_max(probs.shape[-1] - 1).squeeze(1)


def target_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The distribution `select` samples from, as normalised probabilities over the vocabulary for
    logits [N, vocab]: temperature [N, 1] (0: greedy, a one-hot on the argmax), top_k [N, 1] (the
    vocabulary size when off) and top_p [N, 1]. Speculative sampling compares these for the target
    and the drafter, so both pass through the same temperature and truncation."""
    logits = logits.float()
    greedy = temperature == 0
    probs, order = _sorted_truncated(logits / torch.where(greedy, 1.0, temperature), top_k, top_p)
    probs = torch.zeros_like(probs).scatter(-1, order, probs)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    one_hot = torch.zeros_like(probs).scatter(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(greedy, one_hot, probs)
