"""Self-speculative greedy decoding with the multi-token-prediction module (V3 report §2.2, §5.4.3).

MTP depth 1 pairs the main model's hidden state at position i with token i+1 and predicts token i+2,
so after each step it drafts one token beyond the one just chosen. The main model verifies
[chosen, draft] in one two-token forward: its greedy token at the first position either equals the
draft (both are kept, plus the main model's next token: 2 tokens per forward) or replaces it
(1 token). Every emitted token is the main model's own argmax, so the output is plain greedy decoding.

Cache invariant, per row with main length L (tokens 0..L-1 cached, token L chosen but not yet fed):
MTP layer rows 0..L-1 hold the pairs (h[i], x[i+1]). A rejected draft leaves one stale row in each
cache; the length is set so that the next step overwrites it.
"""

from __future__ import annotations

import torch

from nanoseek.infer.engine import Engine, Sequence


@torch.inference_mode()
def speculative_decode(engine: Engine, seqs: list[Sequence]) -> dict:
    """Generate greedily for `seqs` (filled in place). Returns draft statistics: drafted and accepted
    drafts, the acceptance rate, main-model forwards, and tokens per sequence-step (1 + rate, less
    when the max_new_tokens cut a step short)."""
    model, device = engine.model, engine.model.device
    assert len(model.mtp) and all(s.params.greedy for s in seqs), "MTP drafting verifies greedy decoding only"
    batch = len(seqs)
    rows = torch.arange(batch, device=device)
    lengths = torch.tensor([len(s.prompt) for s in seqs], device=device)
    longest = int(lengths.max())
    capacity = max(len(s.prompt) + s.params.max_new_tokens for s in seqs) + 2
    cache, logits, hidden = engine.prefill([s.prompt for s in seqs], capacity, with_mtp=True)
    first = logits.argmax(dim=-1)

    # MTP prefill over the prompt: pair h[i] with token i+1, the last real position with the first
    # generated token; chunked like the main prefill.
    next_ids = torch.zeros(batch, longest, dtype=torch.long, device=device)
    for b, s in enumerate(seqs):
        next_ids[b, :len(s.prompt) - 1] = torch.as_tensor(s.prompt[1:], device=device)
    next_ids[rows, lengths - 1] = first
    positions = torch.arange(longest, device=device).expand(batch, -1)
    mtp_out = []
    for start in range(0, longest, engine.prefill_chunk):
        end = start + engine.prefill_chunk
        mtp_out.append(model.mtp_hidden(0, hidden[:, start:end], next_ids[:, start:end], cache,
                                        positions[:, start:end], absorb=start > 0))
    for seq, token in zip(seqs, first.tolist()):
        seq.append(token)
    draft = _predict(model, torch.cat(mtp_out, dim=1)[rows, lengths - 1])
    last = first
    drafted = accepted = forwards = 0
    while not all(s.done for s in seqs):
        live = torch.tensor([not s.done for s in seqs], device=device)
        with engine.decoding():
            step_logits, step_hidden = model(torch.stack((last, draft), dim=1), cache, return_hidden=True)
        forwards += 1
        chosen = step_logits.argmax(dim=-1)  # [B, 2]: the token after `last`, and after `draft`
        accept = chosen[:, 0] == draft
        for seq, (g1, g2), ok in zip(seqs, chosen.tolist(), accept.tolist()):
            if seq.done:
                continue
            drafted += 1
            accepted += ok
            seq.append(g1)
            if ok and not seq.done:
                seq.append(g2)
        # Finished rows keep their length, so they never run past the capacity.
        cache.lengths.copy_(lengths + torch.where(live, 1 + accept.long(), 0))
        with engine.decoding():
            mtp_h = model.mtp_hidden(0, step_hidden, chosen, cache, lengths[:, None] + torch.arange(2, device=device),
                                     absorb=True)
        draft = _predict(model, mtp_h[rows, accept.long()])
        last = torch.where(accept, chosen[:, 1], chosen[:, 0])
        lengths = cache.lengths.clone()
    emitted = sum(len(s.tokens) for s in seqs) - batch  # the first token of each came from the prefill
    return {"drafted": drafted, "accepted": accepted, "acceptance_rate": accepted / max(drafted, 1),
            "forwards": forwards, "tokens_per_step": emitted / max(drafted, 1)}


def _predict(model, mtp_hidden: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.mtp[0].norm(mtp_hidden)).argmax(dim=-1)
