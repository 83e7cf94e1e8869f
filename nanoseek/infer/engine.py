"""The inference engine: every consumer (chat, the server, evaluation, RL rollouts, rejection sampling,
distillation) generates through it.

* Prefill: ragged prompts right-padded into one batch and run through the model in chunks (the first
  in the naive form, later ones against the cached prefix), so memory stays bounded for long prompts.
  N samples of a prompt share one prefill: its cache row is copied into N decode rows. With a prefix
  cache (prefix_cache.py), a prompt starts from the cached rows of its longest cached beginning.
* Decode: the live sequences occupy rows 0..n-1 of one preallocated `LatentCache`; each step samples
  one token per sequence, retires the finished ones (the last live row moves into the hole) and runs
  one forward over `cache.head(n)` in the absorbed form, which reads only the cached latents. A
  compiled engine pads that forward to one of a few shapes (`row_bucket`, `VISIBLE_BLOCK`).
* `DecodeBatch` is that running batch. Offline calls build one, add every prompt, and step until it
  empties; the server keeps one alive and adds requests as they arrive (continuous batching).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence as Seq
from dataclasses import dataclass

import torch
from torch._dynamo.utils import counters

from nanoseek.infer.detokenize import Detokenizer
from nanoseek.infer.prefix_cache import PrefixCache
from nanoseek.infer.sampling import SamplingParams, sample_generator, select
from nanoseek.model.cache import LatentCache
from nanoseek.model.linear import packed_weights
from nanoseek.model.transformer import Transformer

# The compiled decode step runs a bounded set of shapes, so that sequences joining and leaving a
# running batch reuse the graphs the warm-up compiled (and on CUDA the CUDA graph recorded per shape)
# rather than meeting a new (row count, context length) at every step: the live rows are padded up
# to a `row_bucket`, and the cache is read in whole blocks of this many positions (the attention
# masks each row at its own length, so positions past it change nothing).
VISIBLE_BLOCK = 256


def row_bucket(rows: int, max_rows: int) -> int:
    """The padded row count of a step over `rows` live rows of a batch of max_rows: the next power of
    two, at most max_rows."""
    return min(1 << (rows - 1).bit_length(), max_rows)


@dataclass
class Completion:
    """One finished sample. `tokens` includes a terminating EOS / stop token; `text` (when the engine
    has a decoder) leaves it out and ends before a matched stop string."""

    tokens: list[int]
    finish_reason: str  # "stop": EOS, a stop token or stop string; "length": max_new_tokens or context full
    logprobs: list[float] | None
    text: str | None
    prompt_index: int
    sample_index: int


class Sequence:
    """One sample being generated: its tokens so far and why it stopped, if it has.

    The engine's thread appends tokens while another (the server's event loop) may read the text, so
    both hold `_lock`: a reader never sees a token without the finish_reason it caused, which would
    decode a stop token into the text for good."""

    def __init__(self, prompt: list[int], params: SamplingParams, generator: torch.Generator | None,
                 stop_ids: set[int], decode: Callable[[list[int]], str] | None, prompt_index: int = 0,
                 sample_index: int = 0):
        if params.stop and decode is None:
            raise ValueError("stop strings need an engine built with a `decode` function")
        self.prompt, self.params, self.generator = prompt, params, generator
        self.prompt_index, self.sample_index = prompt_index, sample_index
        self.tokens: list[int] = []
        self.logprobs: list[float] | None = [] if params.logprobs else None
        self.finish_reason: str | None = None
        self.cancelled = False  # set from outside (a client went away); the engine drops it next step
        self._stop_ids = stop_ids
        self._detokenizer = Detokenizer(decode, params.stop) if decode is not None else None
        self._cut: int | None = None  # where a matched stop string starts in the text
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, logprob: float | None = None) -> None:
        with self._lock:
            self.tokens.append(token)
            if self.logprobs is not None:
                self.logprobs.append(logprob)
            if token in self._stop_ids:
                self.finish_reason = "stop"
            elif self.params.stop:
                self._cut = self._detokenizer.update(self.tokens)
                if self._cut is not None:
                    self.finish_reason = "stop"
            if not self.done and len(self.tokens) >= self.params.max_new_tokens:
                self.finish_reason = "length"

    def text(self) -> str | None:
        """The generated text so far, without a terminating stop token, cut before a stop string."""
        if self._detokenizer is None:
            return None
        with self._lock:
            stopped_by_token = self.finish_reason == "stop" and self.tokens and self.tokens[-1] in self._stop_ids
            self._detokenizer.update(self.tokens[:-1] if stopped_by_token else self.tokens)
            return self._detokenizer.text[:self._cut]

    def stream_text(self) -> str:
        """The prefix of text() that can be shown now and never changes: while running, a tail that
        might begin a stop string or is a partial UTF-8 character (U+FFFD) is held back."""
        done = self.done  # before the text: text read after seeing done is the final text
        text = self.text() or ""
        if done:
            return text
        hold = 0
        for stop in self.params.stop:
            hold = max(hold, next((k for k in range(min(len(stop) - 1, len(text)), 0, -1)
                                   if text.endswith(stop[:k])), 0))
        text = text[:len(text) - hold]
        return text.rstrip("\ufffd")

    def completion(self) -> Completion:
        return Completion(list(self.tokens), self.finish_reason or "length", self.logprobs, self.text(),
                          self.prompt_index, self.sample_index)


class Engine:
    """Generation over a `Transformer` and its latent cache.

    eos_token_ids: tokens that end a sample (default: the model config's); `decode` turns token ids
    into text, needed for stop strings and `Completion.text`; prompts are prefilled `prefill_chunk`
    tokens at a time. With `speculative=True` and a model that has MTP modules, every decode step
    drafts `draft_tokens` tokens ahead with MTP depth 1 and verifies them in one forward, greedy or
    sampled, with the output distribution of plain decoding (see speculative.py);
    `last_speculative_stats` holds the last `generate` or `stream` call's acceptance statistics.

    `compile=True` runs every decode step through torch.compile, padded to a bounded set of shapes
    (`row_bucket`, `VISIBLE_BLOCK`). On CPU a step is bound by how fast weights stream from memory:
    the compiled graph streams them ~2x faster for a single row (see model/linear.py) and drops most
    of the ~1,000 small ops a step costs in eager mode. Shapes are dynamic, so three graphs serve
    every step whatever the prompts and cache sizes (one row; some of the batch's rows; all of them,
    a contiguous view of the cache), except that the first step past 4096 positions of context
    compiles again (inductor sums softmax rows longer than 4096 in chunks, for precision, and guards
    on the length). Compiling takes about half a minute per graph on 2 cores; `warm_up` does it ahead
    of time, and any compile after it is counted in `decode_recompiles`. With `cuda_graphs` (default:
    on CUDA) the step is compiled as by mode="reduce-overhead": each padded shape is recorded once as
    a CUDA graph and then replayed as one launch instead of a few hundred kernel launches.

    Eager decode steps on CPU multiply by oneDNN-packed weights (model/linear.py), which keeps a
    second copy of the weights in memory; `packed_weights=False` turns that off.

    `prefix_cache_bytes` > 0 keeps up to that many bytes of recently used prompts' (and finished
    sequences') cache rows in a `PrefixCache`, so that a prompt beginning with one of them prefills
    only the rest (`generate`, `stream` and `DecodeBatch`; not the speculative path, whose MTP drafter
    needs the prompt's hidden states). Off by default: an RL loop changes the weights between calls,
    which empties the cache each time (rows of other weights are never reused).
    """

    def __init__(self, model: Transformer, eos_token_ids: Seq[int] | None = None,
                 decode: Callable[[list[int]], str] | None = None, prefill_chunk: int = 512,
                 speculative: bool = False, compile: bool = False, packed_weights: bool = True,
                 cuda_graphs: bool | None = None, prefix_cache_bytes: int = 0,
                 draft_tokens: int = 1):
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be positive")
        self.model = model
        self.eos_token_ids = set(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.decode = decode
        self.prefill_chunk = prefill_chunk
        if draft_tokens < 1:
            raise ValueError("draft_tokens must be positive")
        self.speculative = speculative and len(model.mtp) > 0
        self.draft_tokens = draft_tokens
        self.last_speculative_stats: dict | None = None
        self.packed_weights = packed_weights
        self.cuda_graphs = compile and (model.device.type == "cuda" if cuda_graphs is None else cuda_graphs)
        # "triton.cudagraphs" is what mode="reduce-overhead" sets. Shape padding is off: in bf16 on CUDA
        # it decides whether to pad a product by the context length it first sees, and guards on it.
        options = {"triton.cudagraphs": self.cuda_graphs, "shape_padding": False}
        self._compiled_model = torch.compile(model, dynamic=True, options=options) if compile else None
        self.compiled_verify = None  # a speculative engine's whole step (verify + draft), compiled
        if compile and self.speculative:
            from nanoseek.infer.speculative import SpeculativeStep  # speculative.py builds on this module

            self.compiled_verify = torch.compile(SpeculativeStep(model), dynamic=True, options=options)
        self.decode_compiles = 0  # graphs torch.compile built for the decode step
        self.decode_recompiles = 0  # of those, the ones built after `warm_up`: a shape it did not cover
        self._warmed_up = False
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None

    @property
    def compiled(self) -> bool:
        return self._compiled_model is not None

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    # ---- building sequences -------------------------------------------------------------------
    def sequences(self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None,
                  n: int = 1) -> list[list[Sequence]]:
        """n fresh sequences per prompt (params: one for all prompts, or one per prompt)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        params = params or SamplingParams()
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} sampling params for {len(prompts)} prompts")
        groups = []
        for i, (prompt, p) in enumerate(zip(prompts, per_prompt)):
            stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
            groups.append([Sequence(list(prompt), p, None if p.greedy else sample_generator(p.seed, j, self.model.device),
                                    stop_ids, self.decode, i, j) for j in range(n)])
        return groups

    # ---- the two model calls ------------------------------------------------------------------
    def prefill(self, prompts: Seq[Seq[int]], capacity: int | None = None,
                with_mtp: bool = False) -> tuple[LatentCache, torch.Tensor, torch.Tensor | None]:
        """Run ragged prompts through the model in chunks. Returns a cache holding exactly each
        prompt (lengths = prompt lengths), the logits [B, vocab] after each prompt's last token, and
        with_mtp the final hidden states [B, longest, d] (the MTP drafter's input)."""
        run = PrefillRun(self, prompts, capacity, keep_hidden=with_mtp)
        while not run.done:
            run.step()
        return run.cache, run.logits, torch.cat(run.hidden, dim=1) if with_mtp else None

    def warm_up(self, rows: int = 1) -> float:
        """Run one decode step at every row bucket of a batch of `rows` rows, so that a compiled engine
        compiles now rather than at a request. Give the row count the caller's batches will have (the
        server's max_concurrent). Returns the seconds it took."""
        started = time.perf_counter()
        # A speculative step is one graph for greedy batches and another for sampled ones.
        kinds = [SamplingParams(max_new_tokens=2, ignore_eos=True)]
        if self.speculative:
            kinds.append(SamplingParams(max_new_tokens=2 + self.draft_tokens, ignore_eos=True, temperature=1.0))
        for live in sorted({row_bucket(n, rows) for n in range(1, rows + 1)}):
            for params in kinds:
                # One whole block of context, as real steps read (a shorter read could guard on its length).
                batch = self.new_batch(rows, capacity=VISIBLE_BLOCK)
                batch.add(self.sequences([[0]] * live, params))
                while batch.sequences:
                    batch.step()
        self._warmed_up = True
        return time.perf_counter() - started

    def decode_forward(self, tokens: torch.Tensor, cache: LatentCache) -> torch.Tensor:
        """One decode forward of tokens [n, 1] over the first n rows of `cache`, which hold a cached
        prefix -> logits [n, 1, vocab]. A compiled step pads into the rows past the n, and never reads
        the cache's last position, which must stay spare: a read of every position of several rows
        is contiguous and one of fewer is not, and the graph would guard on which (a compile for each)."""
        live = tokens.shape[0]
        if self._compiled_model is None:
            with self.decoding():
                return self.model(tokens, cache.head(live))
        longest = cache.head(live).check_room(2)  # the step's token, and the spare position
        rows = row_bucket(live, cache.batch_size)
        visible = min(-(-(longest + 1) // VISIBLE_BLOCK) * VISIBLE_BLOCK, cache.capacity - 1)
        # The padding rows decode token 0 from an empty row: a retired row keeps its length, at which
        # the step would write, possibly past the capacity.
        cache.lengths[live:rows] = 0
        padded = torch.cat((tokens, tokens.new_zeros(rows - live, 1)))
        head = cache.head(rows)
        if self.cuda_graphs:
            # A CUDA graph may update in place only inputs at fixed addresses (a new batch's cache
            # re-records the graph, it does not recompile), and it reuses its outputs' memory at the
            # next replay, so the step begins a new generation and the logits are copied out.
            torch._dynamo.mark_static_address(head.kv)
            torch._dynamo.mark_static_address(head.lengths)
            torch.compiler.cudagraph_mark_step_begin()
        graphs = counters["stats"]["unique_graphs"]
        # No duck sizing: a cache capacity that happens to equal the layer count would otherwise
        # become a guard, and the next capacity a recompile.
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            logits = self._compiled_model(padded, head, absorb=True, visible=visible)[:live]
        compiled = counters["stats"]["unique_graphs"] - graphs
        self.decode_compiles += compiled
        self.decode_recompiles += compiled if self._warmed_up else 0
        return logits.clone() if self.cuda_graphs else logits

    def live_prefix_cache(self) -> PrefixCache | None:
        """The prefix cache (None when off), emptied first if the weights changed since it was filled
        (in place, as an optimizer step does, or replaced, as a load does)."""
        if self.prefix_cache is not None:
            self.prefix_cache.check_owner(tuple((p.data_ptr(), p._version) for p in self.model.parameters()))
        return self.prefix_cache

    def decoding(self) -> contextlib.AbstractContextManager:
        """The block for eager decode forwards: oneDNN-packed weights unless turned off."""
        return packed_weights() if self.packed_weights else contextlib.nullcontext()

    # ---- offline use --------------------------------------------------------------------------
    def generate(self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None,
                 n: int = 1) -> list[list[Completion]]:
        """Completions [prompt][sample] for a batch of ragged prompts, n samples each."""
        groups = self.sequences(prompts, params, n)
        for _ in self._run(groups):
            pass
        return [[s.completion() for s in g] for g in groups]

    def stream(self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None,
               n: int = 1) -> Iterator[list[Sequence]]:
        """Yields, after every decode step, the sequences that got a token (seq.tokens[-1]); a sequence
        that finished has seq.done set. Stop the iteration early to abandon the batch."""
        yield from self._run(self.sequences(prompts, params, n))

    def _run(self, groups: list[list[Sequence]]) -> Iterator[list[Sequence]]:
        flat = [s for g in groups for s in g]
        capacity = max(len(s.prompt) + s.params.max_new_tokens for s in flat)
        batch = self.new_batch(len(flat), capacity)
        batch.add(groups)
        try:
            while batch.sequences:
                yield batch.step()
        finally:
            if self.speculative:
                self.last_speculative_stats = batch.stats()

    def new_batch(self, max_rows: int, capacity: int) -> "DecodeBatch":
        """An empty running batch: speculative steps in a speculative engine, plain ones otherwise."""
        if self.speculative:
            from nanoseek.infer.speculative import SpeculativeBatch

            return SpeculativeBatch(self, max_rows, capacity)
        return DecodeBatch(self, max_rows, capacity)


class PrefillRun:
    """Ragged prompts going through the model one chunk at a time: `Engine.prefill` runs every chunk at
    once; a running `DecodeBatch` runs one chunk per decode step, so a long prompt never stalls the
    sequences already decoding for its whole prefill.

    With the engine's prefix cache, each row starts from the cached rows of its prompt's longest
    cached prefix and runs only the rest, in the absorbed form over that prefix as a later chunk
    does; the prompts go into the prefix cache once done."""

    def __init__(self, engine: Engine, prompts: Seq[Seq[int]], capacity: int | None = None, keep_hidden: bool = False):
        model, device = engine.model, engine.model.device
        self.model, self.chunk = model, engine.prefill_chunk
        # The MTP drafter reads the hidden states of every prompt position, which reuse would skip.
        self.prefix = None if keep_hidden else engine.live_prefix_cache()
        self.prompts = prompts
        cached = [self.prefix.match(p) for p in prompts] if self.prefix else [[] for _ in prompts]
        reused = [sum(block.shape[1] for block in blocks) for blocks in cached]
        self.lengths = torch.tensor([len(p) for p in prompts], device=device)
        started = torch.tensor(reused, device=device)
        self.new_lengths = self.lengths - started
        self.longest = int(self.new_lengths.max())
        # Every chunk writes all rows, so a row that starts later also ends later than its prompt.
        self.cache = model.new_cache(len(prompts), max(capacity or 0, max(reused) + self.longest),
                                     with_mtp=keep_hidden)
        self.ids = torch.zeros(len(prompts), self.longest, dtype=torch.long, device=device)
        for row, (prompt, blocks, start) in enumerate(zip(prompts, cached, reused)):
            self.ids[row, :len(prompt) - start] = torch.as_tensor(prompt[start:], device=device)
            if blocks:
                self.cache.kv[:, row, :start] = torch.cat(blocks, dim=1)
        self.cache.lengths.copy_(started)
        self.logits = torch.empty(len(prompts), model.config.vocab_size, device=device, dtype=model.dtype)
        self.hidden: list[torch.Tensor] | None = [] if keep_hidden else None
        self.start = 0

    @property
    def done(self) -> bool:
        return self.start >= self.longest

    @torch.inference_mode()
    def step(self) -> None:
        """The next chunk. Right padding is exact for real tokens (they never attend forward); padded
        positions are overwritten once the lengths are set to the prompts' after the last chunk."""
        start, last = self.start, self.new_lengths - 1
        hidden = self.model.hidden_states(self.ids[:, start:start + self.chunk], self.cache)
        ends_here = ((last >= start) & (last < start + hidden.shape[1])).nonzero().flatten()
        if len(ends_here):
            self.logits[ends_here] = self.model.lm_head(hidden[ends_here, last[ends_here] - start])
        if self.hidden is not None:
            self.hidden.append(hidden)
        self.start += self.chunk
        if self.done:
            self.cache.lengths.copy_(self.lengths)
            if self.prefix is not None:
                for row, prompt in enumerate(self.prompts):
                    self.prefix.store(prompt, self.cache, row)


class DecodeBatch:
    """The running batch: up to max_rows live sequences in rows 0..n-1 of one preallocated cache, and
    the logits each will sample its next token from."""

    def __init__(self, engine: Engine, max_rows: int, capacity: int):
        self.engine, self.capacity = engine, capacity
        self.cache = self._allocate(max_rows, capacity)
        self.sequences: list[Sequence] = []
        self.logits: torch.Tensor | None = None
        self.prefilling: list[tuple[PrefillRun, list[list[Sequence]]]] = []  # admitted, not yet decoding
        self.prefill_seconds = 0.0
        self.steps = 0

    def _allocate(self, max_rows: int, capacity: int) -> LatentCache:
        # A compiled engine's step needs a spare position past the context (see `Engine.decode_forward`).
        return self.engine.model.new_cache(max_rows, capacity + self.engine.compiled)

    def _prefill_run(self, prompts: Seq[Seq[int]]) -> PrefillRun:
        return PrefillRun(self.engine, prompts)

    @property
    def free_rows(self) -> int:
        reserved = sum(len(g) for _, groups in self.prefilling for g in groups)
        return self.cache.batch_size - len(self.sequences) - reserved

    def add(self, groups: list[list[Sequence]]) -> None:
        """Prefill each group's prompt once, now, and give every sequence of the group its own row."""
        groups = self._checked(groups)
        run = self._prefill_run([g[0].prompt for g in groups])
        while not run.done:
            run.step()
        self._join(run, groups)

    def admit(self, groups: list[list[Sequence]]) -> None:
        """Like `add`, but the prefill runs one chunk per `step`, between the decode steps of the
        sequences already running (chunked prefill); the rows are reserved from now."""
        groups = self._checked(groups)
        self.prefilling.append((self._prefill_run([g[0].prompt for g in groups]), groups))

    def _checked(self, groups: list[list[Sequence]]) -> list[list[Sequence]]:
        groups = [g for g in groups if g]
        needed = sum(map(len, groups))
        if needed > self.free_rows:
            raise ValueError(f"{needed} sequences do not fit in {self.free_rows} free rows")
        for g in groups:
            if len(g[0].prompt) >= self.capacity:
                raise ValueError(f"a prompt of {len(g[0].prompt)} tokens leaves no room in a context of {self.capacity}")
        return groups

    def _join(self, run: PrefillRun, groups: list[list[Sequence]]) -> None:
        """Copy each prefilled prompt into the rows of its group's sequences."""
        rows = []
        for i, g in enumerate(groups):
            for seq in g:
                self.cache.copy_row(len(self.sequences), run.cache, i)
                self.sequences.append(seq)
                rows.append(i)
        new = run.logits[torch.tensor(rows, device=run.logits.device)]
        self.logits = new if self.logits is None else torch.cat((self.logits, new))

    def _prefill_chunk(self) -> None:
        started = time.perf_counter()
        run, groups = self.prefilling[0]
        run.step()
        if run.done:
            self.prefilling.pop(0)
            self._join(run, groups)
        self.prefill_seconds += time.perf_counter() - started

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Sample one token for every live sequence, retire the finished ones, and run the model on
        the tokens of those that continue. Returns the sequences that got a token. One chunk of an
        admitted prompt's prefill runs first; its sequences join once the prompt is done."""
        if self.prefilling:
            self._prefill_chunk()
        if any(s.cancelled for s in self.sequences):
            for s in self.sequences:
                if s.cancelled:
                    s.finish_reason = "cancelled"
            self.logits = self.logits[self._retire()]
        seqs = self.sequences
        if not seqs:
            return []
        want_logprobs = any(s.logprobs is not None for s in seqs)
        tokens, logprobs = select(self.logits, [s.params for s in seqs], [s.generator for s in seqs], want_logprobs)
        token_list = tokens.tolist()
        logprob_list = logprobs.tolist() if want_logprobs else [None] * len(seqs)
        for seq, token, logprob in zip(seqs, token_list, logprob_list):
            seq.append(token, logprob)
            # Feeding this token back writes cache position len(prompt) + len(tokens) - 1.
            if not seq.done and len(seq.prompt) + len(seq.tokens) > self.capacity:
                seq.finish_reason = "length"
        stepped = list(seqs)
        order = self._retire()
        if self.sequences:
            feed = tokens[torch.tensor(order, device=tokens.device)][:, None]
            self.logits = self.engine.decode_forward(feed, self.cache)[:, -1]
        else:
            self.logits = None
        self.steps += 1
        return stepped

    def _retire(self) -> list[int]:
        """Drop finished sequences; the last live rows move into the holes. Returns, for each row now
        in use, the row it came from."""
        seqs = self.sequences
        finished = [i for i, s in enumerate(seqs) if s.done]
        if finished and (prefix := self.engine.live_prefix_cache()) is not None:
            # A finished row holds its prompt and all but its last token (never fed back): the next
            # turn of a conversation begins with them.
            for i in finished:
                prefix.store((seqs[i].prompt + seqs[i].tokens)[:int(self.cache.lengths[i])], self.cache, i)
        alive = [i for i, s in enumerate(seqs) if not s.done]
        holes = [i for i in range(len(alive)) if seqs[i].done]
        movers = [i for i in alive if i >= len(alive)]
        order = list(range(len(alive)))
        for dst, src in zip(holes, movers):
            self.cache.copy_row(dst, self.cache, src)
            seqs[dst] = seqs[src]
            order[dst] = src
        del seqs[len(alive):]
        return order
