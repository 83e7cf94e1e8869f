"""Self-speculative decoding with the multi-token-prediction module (V3 report §2.2, §5.4.3), greedy or
sampled.

MTP depth 1 pairs the main model's hidden state at position i with token i+1 and predicts token i+2.
After each step the module drafts k tokens beyond the one just chosen: the first from the main
model's hidden state, the next ones by feeding its own output hidden state back in place of the main
model's (the module was trained for one step ahead only, so later drafts are accepted less often).
The main model verifies [chosen, draft_1..k] in one (k+1)-token forward, and the same call runs the
MTP module over the verified positions and drafts the next step's tokens, so a step is one model call
(one compiled graph in a compiled engine) and one host sync.

Verification is speculative sampling (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023): draft x
drawn from the drafter's q is kept with probability min(1, p(x)/q(x)), where p is the main model's
distribution; the first rejected position takes a token from norm(max(0, p - q)), and when every
draft is kept a bonus token comes from p at the position after the last. Each emitted token then has
exactly the distribution p, which is the distribution plain sampling draws from: temperature, top-k
and top-p shape p and q alike (`target_probs`). Greedy rows are the special case of one-hot p and q:
a draft is kept exactly when it is the main model's argmax, and every emitted token is that argmax,
so greedy output equals plain greedy decoding.

Cache invariant, per row with main length L (tokens 0..L-1 cached, token L chosen but not yet fed):
MTP layer rows 0..L-1 hold the pairs (h[i], x[i+1]). A step writes positions L..L+k of the main and
MTP layers and L+a+1.. of the MTP layer for the draft chain (a drafts accepted); only L..L+a are kept
(the length becomes L+a+1), and every later step rewrites a position before any query can see it.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch
from torch import nn
from torch._dynamo.utils import counters

from nanoseek.infer.engine import VISIBLE_BLOCK, DecodeBatch, Engine, PrefillRun, Sequence, row_bucket
from nanoseek.infer.sampling import inverse_cdf, select, target_probs, truncation
from nanoseek.model.cache import LatentCache
from nanoseek.model.transformer import Transformer

# Per-row sampling settings of a step: temperature, top_k, top_p as [n, 1] tensors (see target_probs);
# None when every row is greedy, which skips the probability arithmetic altogether.
Sampling = tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


def accept_drafts(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, accept_u: torch.Tensor,
                  sample_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling's verification (Leviathan et al. 2023, Algorithm 1) for n rows of k drafts.

    p [n, k+1, V]: the target's distribution at each verified position (the last one follows the
    last draft); q [n, k, V]: the distribution each draft was drawn from; drafts [n, k]; accept_u
    [n, k] and sample_u [n]: uniforms in [0, 1). Returns how many leading drafts are kept [n] and the
    token that follows them [n]: from norm(max(0, p - q)) at the first rejection, from p after k kept."""
    n, k = drafts.shape
    p_draft = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    q_draft = q.gather(-1, drafts[..., None]).squeeze(-1)
    # u < p/q without dividing by q; a ratio >= 1 always keeps the draft (u < 1).
    kept = (accept_u * q_draft < p_draft).long().cumprod(dim=-1).sum(dim=-1)
    residual = (p - torch.cat((q, torch.zeros_like(q[:, :1])), dim=1)).clamp_min(0)  # q = 0 after the drafts
    rows = torch.arange(n, device=p.device)
    residual = residual[rows, kept]
    # A rejection means p(x) < q(x), so some other token has p > q and the residual has mass; only
    # rounding (p equal to q to the last bit) can empty it, and p is then the right distribution.
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p[rows, kept])
    return kept, inverse_cdf(residual, sample_u)


def draft_logits(model: Transformer, mtp_hidden: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.mtp[0].norm(mtp_hidden))


def draft(model: Transformer, hidden: torch.Tensor, cache: LatentCache, start: torch.Tensor, k: int,
          sampling: Sampling, uniforms: torch.Tensor, visible: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """k drafts [n, k] (and, when sampling, the distributions q [n, k, V] they were drawn from) from
    the MTP hidden state [n, d] of the pair that predicts the first of them; the chain writes MTP
    cache positions start.. (start [n]: the position of the last verified token)."""
    tokens, dists = [], []
    for j in range(k):
        logits = draft_logits(model, hidden)
        if sampling is None:
            token = logits.argmax(dim=-1)
        else:
            q = target_probs(logits, *sampling)
            token = inverse_cdf(q, uniforms[:, j])
            dists.append(q)
        tokens.append(token)
        if j + 1 < k:
            hidden = model.mtp_hidden(0, hidden[:, None], token[:, None], cache, (start + j)[:, None], absorb=True,
                                      visible=visible)[:, 0]
    return torch.stack(tokens, dim=1), torch.stack(dists, dim=1) if dists else None


def verify(model: Transformer, tokens: torch.Tensor, cache: LatentCache, q: torch.Tensor | None, sampling: Sampling,
           uniforms: torch.Tensor, visible: int, want_logprobs: bool) -> tuple[torch.Tensor, ...]:
    """One speculative step over the rows of `cache`: tokens [n, k+1] are each row's chosen token and
    its k drafts; q [n, k, V] the drafts' distributions (unused when greedy); uniforms [n, 2k+1] (k
    acceptances, the token after them, k drafts). Runs the main model over the tokens, verifies, runs
    the MTP module over the verified positions, drafts the next k tokens and sets the cache lengths.
    Returns the drafts kept [n], the emitted tokens [n, k+1] (the first kept+1 count), the next
    drafts [n, k] and their q, and the emitted tokens' log-probabilities (as `select` reports them)."""
    k = tokens.shape[1] - 1
    n = tokens.shape[0]
    rows = torch.arange(n, device=tokens.device)
    start = cache.lengths.clone()
    logits, hidden = model(tokens, cache, absorb=True, visible=visible, return_hidden=True)
    if sampling is None:
        chosen = logits.argmax(dim=-1)
        kept = (chosen[:, :k] == tokens[:, 1:]).long().cumprod(dim=-1).sum(dim=-1)
        emitted = chosen  # kept drafts equal the argmax before them
    else:
        p = target_probs(logits.flatten(0, 1), *(s.repeat_interleave(k + 1, dim=0) for s in sampling)).view(n, k + 1, -1)
        kept, final = accept_drafts(p, q, tokens[:, 1:], uniforms[:, :k], uniforms[:, k])
        emitted = torch.where(torch.arange(k + 1, device=tokens.device) < kept[:, None],
                              torch.cat((tokens[:, 1:], final[:, None]), dim=1), final[:, None])
    logprobs = None
    if want_logprobs:
        temperature = torch.ones(n, 1, device=tokens.device) if sampling is None else sampling[0]
        scaled = logits.float() / torch.where(temperature == 0, 1.0, temperature)[:, None]
        logprobs = scaled.log_softmax(dim=-1).gather(-1, emitted[..., None]).squeeze(-1)
    # The MTP pairs of the verified positions: (h[L+i], x[L+i+1]), x[L+i+1] being emitted token i.
    mtp = model.mtp_hidden(0, hidden, emitted, cache, start[:, None] + torch.arange(k + 1, device=tokens.device),
                           absorb=True, visible=visible)
    next_start = start + kept + 1
    drafts, next_q = draft(model, mtp[rows, kept], cache, next_start, k, sampling, uniforms[:, k + 1:], visible)
    cache.lengths.copy_(next_start)
    return kept, emitted, drafts, next_q, logprobs


class SpeculativeStep(nn.Module):
    """`verify` over one model, as the module a compiled engine compiles: dynamo guards a module's
    parameters as its attributes, cheaply, but every parameter reached through a function's argument
    as an input of its own (measured on the 4-layer model: about 1 ms of guards per call against 0.1 ms,
    a third of the compiled step)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, *args) -> tuple[torch.Tensor, ...]:
        return verify(self.model, *args)


class SpeculativeBatch(DecodeBatch):
    """A `DecodeBatch` whose steps are speculative: each live row holds its chosen, not yet fed token
    and k drafts, and a step emits 1 to k+1 tokens per row. Same interface (add, admit, step), so
    `Engine.stream`, `generate` and the server run on it unchanged; a step returns each sequence that
    got tokens once, however many it got (sequences that joined since the last step included: their
    first token, chosen from the prefill, is appended when they join)."""

    def __init__(self, engine: Engine, max_rows: int, capacity: int):
        self.k = engine.draft_tokens
        super().__init__(engine, max_rows, capacity)
        model = engine.model
        self.last = torch.zeros(0, dtype=torch.long, device=model.device)
        self.drafts = torch.zeros(0, self.k, dtype=torch.long, device=model.device)
        self.q: torch.Tensor | None = None  # [n, k, V] once a sampled row has joined
        self.joined: list[Sequence] = []  # reported by the next step
        self.drafted = self.accepted = self.verified = self.emitted = 0

    def _allocate(self, max_rows: int, capacity: int) -> LatentCache:
        # A step writes k+1 positions past a row's length and the draft chain k-1 more; a compiled
        # step also keeps one spare position (see `Engine.decode_forward`).
        return self.engine.model.new_cache(max_rows, capacity + 2 * self.k + 1, with_mtp=True)

    def _prefill_run(self, prompts: Seq[Seq[int]]) -> PrefillRun:
        return PrefillRun(self.engine, prompts, keep_hidden=True)  # the MTP prefill reads the hidden states

    @torch.inference_mode()
    def _join(self, run: PrefillRun, groups: list[list[Sequence]]) -> None:
        """Run the MTP module over the prompts, copy each into its sequences' rows, choose their first
        tokens from the prefill's logits, and draft k tokens after each."""
        model, device, engine = self.engine.model, self.engine.model.device, self.engine
        hidden = torch.cat(run.hidden, dim=1)
        # The prompt's pairs (h[i], prompt[i+1]), shared by the samples of a prompt; the last
        # position pairs with each sample's own first token, below.
        next_ids = torch.cat((run.ids[:, 1:], run.ids[:, :1]), dim=1)
        positions = torch.arange(run.longest, device=device).expand(len(groups), -1)
        for start in range(0, run.longest, engine.prefill_chunk):
            end = start + engine.prefill_chunk
            model.mtp_hidden(0, hidden[:, start:end], next_ids[:, start:end], run.cache, positions[:, start:end],
                             absorb=start > 0)
        base = len(self.sequences)
        seqs = [s for g in groups for s in g]
        rows = torch.tensor([i for i, g in enumerate(groups) for _ in g], device=device)
        for seq, row in zip(seqs, rows.tolist()):
            self.cache.copy_row(len(self.sequences), run.cache, row)
            self.sequences.append(seq)
        want_logprobs = any(s.logprobs is not None for s in seqs)
        first, logprobs = select(run.logits[rows], [s.params for s in seqs], [s.generator for s in seqs], want_logprobs)
        for seq, token, logprob in zip(seqs, first.tolist(), logprobs.tolist() if want_logprobs else [None] * len(seqs)):
            seq.append(token, logprob)
            self._check_room(seq)
        last = run.lengths[rows] - 1
        view = self.cache.rows(base, base + len(seqs))
        with engine.decoding():
            mtp = model.mtp_hidden(0, hidden[rows, last][:, None], first[:, None], view, last[:, None], absorb=True)
            sampling, uniforms = self._sampling(seqs)
            drafts, q = draft(model, mtp[:, 0], view, last + 1, self.k, sampling, uniforms[:, self.k + 1:], None)
        self.last = torch.cat((self.last, first))
        self.drafts = torch.cat((self.drafts, drafts))
        self.q = self._merged_q(base, q, drafts)
        self.joined.extend(seqs)

    def _merged_q(self, base: int, q: torch.Tensor | None, drafts: torch.Tensor) -> torch.Tensor | None:
        """The q of rows 0..base-1 followed by the new rows'; a greedy row's q is a one-hot on its
        draft, made only once a sampled row needs the tensor."""
        if q is None and self.q is None:
            return None
        vocab = self.engine.model.config.vocab_size
        one_hot = lambda d: torch.nn.functional.one_hot(d, vocab).float()  # noqa: E731
        old = self.q if self.q is not None else one_hot(self.drafts[:base])
        return torch.cat((old, q if q is not None else one_hot(drafts)))

    def _check_room(self, seq: Sequence) -> None:
        # Feeding the last token writes position len(prompt) + len(tokens) - 1, as in DecodeBatch.step.
        if not seq.done and len(seq.prompt) + len(seq.tokens) > self.capacity:
            seq.finish_reason = "length"

    def _sampling(self, seqs: list[Sequence]) -> tuple[Sampling, torch.Tensor]:
        """The rows' sampling settings and 2k+1 uniforms per row from its own generator, so a seeded
        sequence draws the same numbers whatever shares its batch (zeros for greedy rows)."""
        device, width = self.engine.model.device, 2 * self.k + 1
        uniforms = torch.stack([torch.rand(width, generator=s.generator, device=device) if not s.params.greedy
                                else torch.zeros(width, device=device) for s in seqs])
        if all(s.params.greedy for s in seqs):
            return None, uniforms
        params = [s.params for s in seqs]
        temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]
        return (temperature, *truncation(params, self.engine.model.config.vocab_size, device)), uniforms

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """One verification step for every live sequence (after one prefill chunk of an admitted
        prompt, as DecodeBatch.step). Returns the sequences that got tokens."""
        if self.prefilling:
            self._prefill_chunk()
        for s in self.sequences:
            if s.cancelled:
                s.finish_reason = "cancelled"
        stepped, self.joined = self.joined, []
        if any(s.done for s in self.sequences):
            order = torch.tensor(self._retire(), dtype=torch.long, device=self.last.device)
            self.last, self.drafts = self.last[order], self.drafts[order]
            self.q = self.q[order] if self.q is not None else None
        seqs = self.sequences
        if not seqs:
            return stepped
        kept, emitted, logprobs = self._verify(seqs)
        for seq, a, tokens, lps in zip(seqs, kept, emitted, logprobs):
            self.drafted, self.accepted, self.verified = self.drafted + self.k, self.accepted + a, self.verified + 1
            for token, lp in zip(tokens[:a + 1], lps[:a + 1]):
                seq.append(token, lp)
                self.emitted += 1
                self._check_room(seq)
                if seq.done:
                    break
        self.steps += 1
        reported = set(map(id, stepped))
        return stepped + [s for s in seqs if id(s) not in reported]

    def _verify(self, seqs: list[Sequence]) -> tuple[list[int], list[list[int]], list[list]]:
        engine, model, n, k = self.engine, self.engine.model, len(seqs), self.k
        sampling, uniforms = self._sampling(seqs)
        q = self.q if sampling is not None else None
        want_logprobs = any(s.logprobs is not None for s in seqs)
        tokens = torch.cat((self.last[:, None], self.drafts), dim=1)
        longest = max(len(s.prompt) + len(s.tokens) - 1 for s in seqs)  # = the longest cache row, no sync
        if engine.compiled_verify is None:
            with engine.decoding():
                out = verify(model, tokens, self.cache.head(n), q, sampling, uniforms, longest + 2 * k, want_logprobs)
        else:
            out = self._compiled(seqs, tokens, q, sampling, uniforms, longest, want_logprobs)
        kept, emitted, self.drafts, self.q, logprobs = out
        self.last = emitted[torch.arange(n, device=emitted.device), kept]
        return (kept.tolist(), emitted.tolist(),
                logprobs.tolist() if logprobs is not None else [[None] * (k + 1)] * n)

    def _compiled(self, seqs, tokens, q, sampling, uniforms, longest, want_logprobs):
        """The step through the compiled graph, padded to a bounded set of shapes as
        `Engine.decode_forward` pads the plain step (row buckets, whole blocks of context)."""
        engine, n, k = self.engine, len(seqs), self.k
        rows = row_bucket(n, self.cache.batch_size)
        visible = min(-(-(longest + 2 * k) // VISIBLE_BLOCK) * VISIBLE_BLOCK, self.cache.capacity - 1)
        pad = lambda t: torch.cat((t, t.new_zeros(rows - n, *t.shape[1:]))) if t is not None else None  # noqa: E731
        self.cache.lengths[n:rows] = 0  # padding rows write from position 0 of an empty row
        head = self.cache.head(rows)
        if sampling is not None:
            # Padding rows sample at temperature 1 from their (ignored) outputs.
            sampling = tuple(torch.cat((s, s.new_ones(rows - n, 1))) for s in sampling)
        if engine.cuda_graphs:  # as in Engine.decode_forward: fixed input addresses, outputs copied out
            torch._dynamo.mark_static_address(head.kv)
            torch._dynamo.mark_static_address(head.lengths)
            torch.compiler.cudagraph_mark_step_begin()
        graphs = counters["stats"]["unique_graphs"]
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            out = engine.compiled_verify(pad(tokens), head, pad(q), sampling, pad(uniforms), visible, want_logprobs)
        compiled = counters["stats"]["unique_graphs"] - graphs
        engine.decode_compiles += compiled
        engine.decode_recompiles += compiled if engine._warmed_up else 0
        return tuple(t[:n].clone() if t is not None else None for t in out)

    def stats(self) -> dict:
        """Drafted and accepted drafts, the acceptance rate, verification forwards (batch steps), and
        tokens emitted per row-step (1 + accepted drafts, less where a sequence ended mid-step)."""
        return {"drafted": self.drafted, "accepted": self.accepted, "acceptance_rate": self.accepted / max(self.drafted, 1),
                "forwards": self.steps, "tokens_per_step": self.emitted / max(self.verified, 1)}
