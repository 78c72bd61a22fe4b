"""Fixed-size KV blocks: a free list with reference counts, and a prefix cache. Plain Python (no torch).

Reference counts let sequences share blocks (prefix caching; later n > 1 samples and beam
search); a block is free again when its last owner releases it.

Prefix caching: a full block of computed K/V is registered under a key chained over the whole
prefix it ends (`chain_key`: its parent block's key and its own tokens), so equal blocks under
different prefixes never match. A new request finds the longest run of its prompt's leading
blocks in the cache and shares them instead of computing them. A registered block whose last
owner releases it is not wiped: it waits, still findable, among the free blocks, and is reused
for new K/V only when no never-registered block is free (least recently released first); only
then does its key leave the cache.
"""

from __future__ import annotations

import collections
import math
from typing import Sequence as Seq

# A key of a block's contents: a hash over (parent key, the block's token ids). Python's hash of a
# tuple of ints is 64-bit and the same in every process (no hash randomisation for ints).
BlockKey = int


def chain_key(parent: BlockKey | None, tokens: Seq[int]) -> BlockKey:
    """The key of a full block holding `tokens`, after the prefix whose last block has key `parent`
    (None for the first block)."""
    return hash((parent, tuple(tokens)))


def chain_keys(token_ids: Seq[int], block_size: int, known: list[BlockKey] | None = None,
               num_tokens: int | None = None) -> list[BlockKey]:
    """Keys of the full blocks of token_ids[:num_tokens] (default: all), extending `known` (the
    keys of the first blocks, already computed) in place; returns it."""
    keys = known if known is not None else []
    limit = len(token_ids) if num_tokens is None else num_tokens
    for index in range(len(keys), limit // block_size):
        keys.append(chain_key(keys[-1] if keys else None, token_ids[index * block_size:(index + 1) * block_size]))
    return keys


class BlockManager:
    """Hands out KV-cache block ids to sequences' block tables; with `caching`, keeps full blocks
    findable by their prefix key until their memory is needed."""

    def __init__(self, num_blocks: int, block_size: int, caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self._free: collections.deque[int] = collections.deque(range(num_blocks))  # unowned, never registered
        # Unowned registered blocks, least recently released first: free, but their K/V may be reused.
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._refs = [0] * num_blocks
        self._key_of: list[BlockKey | None] = [None] * num_blocks  # a registered block's key
        self._cached: dict[BlockKey, int] = {}  # key -> the block holding those K/V

    @property
    def num_free(self) -> int:
        """Blocks not owned by any sequence (cached ones included: they are reused when needed)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache, owned or not."""
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` positions."""
        return math.ceil(num_tokens / self.block_size)

    def extra_blocks(self, block_table: list[int], num_tokens: int) -> int:
        """Blocks a table must add to cover `num_tokens` positions."""
        return max(0, self.blocks_for(num_tokens) - len(block_table))

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        """True when enough blocks are free to cover `num_tokens` positions."""
        return self.extra_blocks(block_table, num_tokens) <= self.num_free

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Append free blocks to `block_table` until it covers `num_tokens` positions."""
        needed = self.extra_blocks(block_table, num_tokens)
        if needed > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {needed}, {self.num_free} free")
        for _ in range(needed):
            block_table.append(self._take_free())

    def _take_free(self) -> int:
        """A free block for new K/V: a never-registered one first, else the least recently released
        cached one (its key leaves the cache)."""
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._key_of[block]]
            self._key_of[block] = None
        self._refs[block] = 1
        return block

    def share(self, block_table: list[int]) -> list[int]:
        """A copy of `block_table` whose blocks are now owned by one more sequence."""
        for block in block_table:
            self._own(block)
        return list(block_table)

    def _own(self, block: int) -> None:
        """One more owner for `block` (an unowned cached block leaves the free pool)."""
        if self._refs[block] == 0:
            del self._evictable[block]  # only registered blocks are found while unowned
        self._refs[block] += 1

    def release(self, block_table: list[int]) -> None:
        """Drop one owner from every block of the table and empty it. Last block first: a prefix's
        tail is then evicted before its head, which more prompts share."""
        for block in reversed(block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self._key_of[block] is None:
                    self._free.append(block)
                else:
                    self._evictable[block] = None  # the most recently released: evicted last
            elif self._refs[block] < 0:
                raise RuntimeError(f"block {block} released more often than allocated")
        block_table.clear()

    # ------------------------------------------------------------------ prefix cache

    def cached_prefix(self, keys: Seq[BlockKey]) -> list[int]:
        """The blocks holding the longest run of `keys` (a prefix's chained block keys) that the
        cache has, in order; changes nothing."""
        blocks = []
        if self.caching:
            for key in keys:
                block = self._cached.get(key)
                if block is None:
                    break
                blocks.append(block)
        return blocks

    def unowned(self, blocks: Seq[int]) -> int:
        """How many of `blocks` no sequence owns (sharing them takes that many from num_free)."""
        return sum(self._refs[b] == 0 for b in blocks)

    def register(self, key: BlockKey, block: int) -> None:
        """Record that owned, full `block` holds the K/V under `key` (a block already cached for that
        key keeps it; this one stays unregistered)."""
        if self.caching and key not in self._cached and self._key_of[block] is None:
            self._cached[key] = block
            self._key_of[block] = key
