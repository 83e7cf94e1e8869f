"""Plain batched generation: a thin call into the inference engine (nanoseek.infer)."""

from __future__ import annotations

import warnings

from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model.transformer import Transformer


def room_for_reply(prompt_tokens: int, max_new_tokens: int, context_length: int) -> int:
    """How many new tokens a prompt may get: max_new_tokens, fewer where prompt and reply would pass
    the model's context (max_position_embeddings, the positions it was built for). A prompt that
    fills the context alone is refused."""
    if prompt_tokens >= context_length:
        raise ValueError(f"the prompt has {prompt_tokens} tokens, which leaves no room in the model's context "
                         f"of {context_length} tokens (max_position_embeddings)")
    return min(max_new_tokens, context_length - prompt_tokens)


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             eos_token_id: int | list[int] | None = None, ignore_eos: bool = False, seed: int | None = None,
             top_k: int = 0, top_p: float = 1.0) -> list[list[int]]:
    """New token ids for each prompt: greedy at temperature 0, else sampled from softmax(logits / T)
    (after top-k / top-p).

    As in transformers, a row stops at an end-of-sequence token (kept in its output): the model
    config's eos_token_id unless `eos_token_id` names others; `ignore_eos=True` runs every row to
    max_new_tokens. A row also stops where the context (max_position_embeddings) is full, with a
    warning; a prompt that fills it alone raises ValueError."""
    context = model.config.max_position_embeddings
    budgets = []
    for i, prompt in enumerate(prompts):
        try:
            budgets.append(room_for_reply(len(prompt), max_new_tokens, context))
        except ValueError as error:
            raise ValueError(f"prompt {i}: {error}") from None
    eos = None if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    engine = Engine(model, eos_token_ids=eos)
    params = [SamplingParams(max_new_tokens=budget, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                             ignore_eos=ignore_eos) for budget in budgets]
    completions = [samples[0] for samples in engine.generate(prompts, params)]
    for i, (completion, budget) in enumerate(zip(completions, budgets)):
        if budget < max_new_tokens and completion.finish_reason == "length":
            warnings.warn(f"prompt {i}: stopped after {budget} new tokens, where the model's context of {context} "
                          "tokens (max_position_embeddings) is full", stacklevel=2)
    return [completion.tokens for completion in completions]
