"""Inference: one engine over the latent cache, used by chat, the server, evaluation and RL."""

from nanoseek.infer.engine import Completion, DecodeBatch, Engine, Sequence
from nanoseek.infer.sampling import SamplingParams

__all__ = ["Completion", "DecodeBatch", "Engine", "SamplingParams", "Sequence"]
