"""Prefix reuse: the latent cache rows of recently seen token prefixes, kept so that a later prompt
with the same beginning (the next turn of a conversation, a resent system prompt, an RL prompt
sampled again) prefills only what follows it.

Rows are kept in blocks of `block_size` tokens. A block is keyed by a hash chain, as vLLM's automatic
prefix caching does: block i's key digests block i-1's key and block i's token ids, so one key names
the whole prefix up to the block's end, and a lookup walks the chain until a key is missing. The keys
are SHA-256 digests, not Python hashes: Python's hash of a tuple of ints is unkeyed and cheap to
collide on purpose, and a collision would hand one client's cached prefix to another's prompt.

Blocks are copied in and out of the engine's caches (a `LatentCache` row is contiguous, not paged), so
a block in use is never pinned and eviction is plain LRU under a byte bound. A lookup or store
refreshes a chain from its last block to its first, so a prefix's first blocks are always more recent
than its later ones and eviction takes a chain from its end: an evicted first block would leave its
descendants unreachable.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Hashable, Iterator, Sequence

import torch

from nanoseek.model.cache import LatentCache

BLOCK_SIZE = 16  # tokens per block: small enough that a turn's tail wastes little, large enough to hash rarely


class PrefixCache:
    """LRU blocks of cached latent rows, at most `max_bytes` of them, keyed by their token prefix."""

    def __init__(self, max_bytes: int, block_size: int = BLOCK_SIZE):
        if max_bytes < 0 or block_size < 1:
            raise ValueError("max_bytes must be >= 0 and block_size >= 1")
        self.max_bytes, self.block_size = max_bytes, block_size
        self.blocks: collections.OrderedDict[bytes, torch.Tensor] = collections.OrderedDict()  # oldest first
        self.stored_bytes = 0
        self.lookups = self.hits = self.hit_tokens = self.evictions = 0
        self._owner: Hashable = None

    def check_owner(self, owner: Hashable) -> None:
        """Empty the cache if `owner` differs from the last one given: the engine passes its weights'
        identity, so rows computed by weights since changed (an RL optimizer step, a load) are never reused."""
        if owner != self._owner:
            self.blocks.clear()
            self.stored_bytes = 0
            self._owner = owner

    def _keys(self, tokens: Sequence[int], num_blocks: int) -> Iterator[bytes]:
        key = b""
        for i in range(num_blocks):
            block = tokens[i * self.block_size:(i + 1) * self.block_size]
            key = hashlib.sha256(key + b"".join(t.to_bytes(4, "little") for t in block)).digest()
            yield key

    def _touch(self, keys: list[bytes]) -> None:
        for key in reversed(keys):  # the first block ends up the most recent (see the module docstring)
            self.blocks.move_to_end(key)

    def match(self, tokens: Sequence[int]) -> list[torch.Tensor]:
        """The cached rows [layers, n, cache_dim] of the longest cached prefix of `tokens`, a block
        at a time, in order. The last token is never covered (the last block may be cut short for
        it): its logits are what the prefill must produce."""
        self.lookups += 1
        found = []
        for key in self._keys(tokens, len(tokens) // self.block_size):
            if key not in self.blocks:
                break
            found.append(key)
        self._touch(found)
        blocks = [self.blocks[key] for key in found]
        if len(found) * self.block_size == len(tokens):
            blocks[-1] = blocks[-1][:, :-1]
        reused = sum(block.shape[1] for block in blocks)
        self.hits += reused > 0
        self.hit_tokens += reused
        return blocks

    def store(self, tokens: Sequence[int], cache: LatentCache, row: int) -> None:
        """Keep the whole blocks of `tokens`, whose rows are cache row `row`'s first len(tokens)
        positions, evicting the least recently used blocks of other prefixes to make room."""
        chain: list[bytes] = []
        for i, key in enumerate(self._keys(tokens, len(tokens) // self.block_size)):
            if key in self.blocks:
                self.blocks.move_to_end(key)  # out of eviction's way while the rest of the chain goes in
            else:
                rows = cache.kv[:, row, i * self.block_size:(i + 1) * self.block_size]
                size = rows.numel() * rows.element_size()
                # The chain so far sits at the recent end, so the oldest block is another prefix's
                # while there are more blocks than the chain's.
                while self.stored_bytes + size > self.max_bytes and len(self.blocks) > len(chain):
                    _, evicted = self.blocks.popitem(last=False)
                    self.stored_bytes -= evicted.numel() * evicted.element_size()
                    self.evictions += 1
                if self.stored_bytes + size > self.max_bytes:
                    break  # the rest of the prefix only fits by evicting its own beginning
                self.blocks[key] = rows.clone()
                self.stored_bytes += size
            chain.append(key)
        self._touch(chain)

    def stats(self) -> dict[str, int]:
        return {"lookups": self.lookups, "hits": self.hits, "hit_tokens": self.hit_tokens,
                "stored_bytes": self.stored_bytes, "blocks": len(self.blocks), "evictions": self.evictions}
