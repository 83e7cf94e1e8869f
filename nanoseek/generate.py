"""Plain batched generation: a thin call into the inference engine (nanoseek.infer)."""

from __future__ import annotations

from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model.transformer import Transformer


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             eos_token_id: int | None = None, seed: int | None = None, top_k: int = 0,
             top_p: float = 1.0) -> list[list[int]]:
    """New token ids for each prompt: greedy at temperature 0, else sampled from softmax(logits / T)
    (after top-k / top-p). Stops a row at eos_token_id (kept in its output) when one is given."""
    engine = Engine(model, eos_token_ids=[] if eos_token_id is None else [eos_token_id])
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed)
    return [samples[0].tokens for samples in engine.generate(prompts, params)]
