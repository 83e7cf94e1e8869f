"""Simple batched generation over the latent cache (the inference engine replaces its internals)."""

from __future__ import annotations

import torch

from nanoseek.model.transformer import Transformer


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             eos_token_id: int | None = None, seed: int | None = None) -> list[list[int]]:
    """New token ids for each prompt: greedy at temperature 0, else sampled from softmax(logits / T)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    lengths = torch.tensor([len(p) for p in prompts], device=model.device)
    batch, longest = len(prompts), int(lengths.max())
    cache = model.new_cache(batch, longest + max_new_tokens)
    ids = torch.zeros(batch, longest, dtype=torch.long, device=model.device)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = torch.tensor(prompt)
    # Right padding is exact for the real tokens (they never attend forward); each row's length is
    # then reset so decoding overwrites the padding.
    logits = model(ids, cache)[torch.arange(batch), lengths - 1]
    cache.lengths = lengths.clone()
    out: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(batch, dtype=torch.bool, device=model.device)
    for _ in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            token = logits.argmax(dim=-1)
        for row in range(batch):
            if not done[row]:
                out[row].append(int(token[row]))
        if eos_token_id is not None:
            done |= token == eos_token_id
        if bool(done.all()):
            break
        logits = model(token[:, None], cache)[:, -1]
    return out
