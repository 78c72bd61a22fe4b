"""Fixed-size KV blocks: a free list with reference counts, and a prefix cache. Plain Python (no torch).

Reference counts let sequences share blocks (prefix caching, and n samples forked from one
prompt: they share its full blocks and copy its last partial one, `copy_of`); a block is free
again when its last owner releases it.

Prefix caching: a full block of computed K/V is registered under a key chained over the whole
prefix it ends (`chain_key`: its parent block's key and its own tokens), so equal blocks under
different prefixes never match. A new request finds the longest run of its prompt's leading
blocks in the cache and shares them instead of computing them. A registered block whose last
owner releases it is not wiped: it waits, still findable, among the free blocks, and is reused
for new K/V only when no never-registered block is free (least recently released first); only
then does its key leave the cache.

Sliding-window pool (`group_local`, see gemma_dist.config.KVLayout): the model's layers form
groups, and a page holds one block of positions for one group. A table entry is then a tuple of
pages, one per group, for one block of positions. A LOCAL group needs only the blocks its window
still reaches: `free_outside_window` gives those pages back as the sequence advances (the entry
keeps NO_PAGE there), so a long sequence holds its window, not its context, in LOCAL layers.
A prefix-cache hit needs every GLOBAL group's pages of the prefix, but a LOCAL group's only
inside the window at the prefix's end.
"""

from __future__ import annotations

import collections
import math
from typing import Sequence as Seq

# A key of a block's contents: a hash over (parent key, the block's token ids). Python's hash of a
# tuple of ints is 64-bit and the same in every process (no hash randomisation for ints).
BlockKey = int
Entry = tuple[int, ...]  # one block of positions: a page per group (NO_PAGE where a LOCAL group let it go)
NO_PAGE = -1


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
    """Hands out KV-cache pages to sequences' block tables (one entry per block of positions: a
    page per layer group); with `caching`, keeps full blocks findable by their prefix key until
    their memory is needed."""

    def __init__(self, num_blocks: int, block_size: int, caching: bool = False,
                 group_local: Seq[bool] = (False,), sliding_window: int | None = None):
        """num_blocks: pages in the pool; group_local: per layer group, whether it is LOCAL (keeps
        only the blocks its `sliding_window` reaches); default one GLOBAL group."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        if not group_local:
            raise ValueError("group_local needs one entry per layer group")
        if any(group_local) and not (sliding_window and sliding_window > 0):
            raise ValueError(f"LOCAL groups need a positive sliding_window, got {sliding_window!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self.group_local = tuple(bool(x) for x in group_local)
        self.num_groups = len(self.group_local)
        self.sliding_window = sliding_window if any(self.group_local) else None
        self._global_groups = [g for g, local in enumerate(self.group_local) if not local]
        self._local_groups = [g for g, local in enumerate(self.group_local) if local]
        self._free: collections.deque[int] = collections.deque(range(num_blocks))  # unowned, never registered
        # Unowned registered pages, least recently released first: free, but their K/V may be reused.
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._refs = [0] * num_blocks
        self._key_of: list[BlockKey | None] = [None] * num_blocks  # a registered page's key
        self._group_of = [0] * num_blocks  # a registered page's group
        self._cached: list[dict[BlockKey, int]] = [{} for _ in self.group_local]  # per group: key -> page
        self._owned = [0, 0]  # pages some sequence owns: of GLOBAL groups, of LOCAL groups

    @property
    def num_free(self) -> int:
        """Pages not owned by any sequence (cached ones included: they are reused when needed)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks of positions registered in the prefix cache, owned or not (counted in the first
        group's cache: every group registers the same blocks)."""
        return len(self._cached[0])

    @property
    def owned_global(self) -> int:
        """Pages GLOBAL groups' tables hold now."""
        return self._owned[0]

    @property
    def owned_local(self) -> int:
        """Pages LOCAL groups' tables hold now (only blocks inside their windows)."""
        return self._owned[1]

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks (table entries) needed to hold `num_tokens` positions."""
        return math.ceil(num_tokens / self.block_size)

    def extra_blocks(self, block_table: list[Entry], num_tokens: int) -> int:
        """Entries a table must add to cover `num_tokens` positions."""
        return max(0, self.blocks_for(num_tokens) - len(block_table))

    def extra_pages(self, block_table: list[Entry], num_tokens: int) -> int:
        """Pages a table takes from the pool to cover `num_tokens` positions."""
        return self.extra_blocks(block_table, num_tokens) * self.num_groups

    def can_grow(self, block_table: list[Entry], num_tokens: int) -> bool:
        """True when enough pages are free to cover `num_tokens` positions."""
        return self.extra_pages(block_table, num_tokens) <= self.num_free

    def grow(self, block_table: list[Entry], num_tokens: int) -> None:
        """Append entries of free pages to `block_table` until it covers `num_tokens` positions."""
        needed = self.extra_pages(block_table, num_tokens)
        if needed > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {needed} pages, {self.num_free} free")
        for _ in range(self.extra_blocks(block_table, num_tokens)):
            block_table.append(tuple(self._take_free(g) for g in range(self.num_groups)))

    def copy_of(self, entry: Entry) -> tuple[Entry, list[tuple[int, int]]]:
        """A new entry of free pages for a copy of `entry` (copy-on-write of a shared partial block),
        and the (source page, new page) pairs the runners must copy before its first use."""
        copy = tuple(NO_PAGE if page == NO_PAGE else self._take_free(group) for group, page in enumerate(entry))
        return copy, [(src, dst) for src, dst in zip(entry, copy) if src != NO_PAGE]

    def pages_to_hold(self, num_tokens: int, chunk: int) -> int:
        """Most pages one sequence of `num_tokens` positions holds at once, when it computes at most
        `chunk` positions per step (a LOCAL group holds its window plus the step's new blocks)."""
        blocks = self.blocks_for(num_tokens)
        if not self._local_groups:
            return blocks * self.num_groups
        local = min(blocks, self.blocks_for(self.sliding_window + chunk) + 1)
        return blocks * len(self._global_groups) + local * len(self._local_groups)

    def _take_free(self, group: int) -> int:
        """A free page for new K/V of `group`: a never-registered one first, else the least recently
        released cached one (its key leaves the cache)."""
        if self._free:
            page = self._free.popleft()
        else:
            page, _ = self._evictable.popitem(last=False)
            del self._cached[self._group_of[page]][self._key_of[page]]
            self._key_of[page] = None
        self._refs[page] = 1
        self._owned[self.group_local[group]] += 1
        return page

    def share(self, block_table: list[Entry]) -> list[Entry]:
        """A copy of `block_table` whose pages are now owned by one more sequence."""
        for entry in block_table:
            for group, page in enumerate(entry):
                if page != NO_PAGE:
                    self._own(page, group)
        return list(block_table)

    def _own(self, page: int, group: int) -> None:
        """One more owner for `page` (an unowned cached page leaves the free pool)."""
        if self._refs[page] == 0:
            del self._evictable[page]  # only registered pages are found while unowned
            self._owned[self.group_local[group]] += 1
        self._refs[page] += 1

    def release(self, block_table: list[Entry]) -> None:
        """Drop one owner from every page of the table and empty it. Last block first: a prefix's
        tail is then evicted before its head, which more prompts share."""
        for entry in reversed(block_table):
            for group, page in enumerate(entry):
                if page != NO_PAGE:
                    self._disown(page, group)
        block_table.clear()

    def _disown(self, page: int, group: int) -> None:
        """One owner fewer for `page`; free (or reusable cached) once none is left."""
        self._refs[page] -= 1
        if self._refs[page] == 0:
            self._owned[self.group_local[group]] -= 1
            if self._key_of[page] is None:
                self._free.append(page)
            else:
                self._evictable[page] = None  # the most recently released: evicted last
        elif self._refs[page] < 0:
            raise RuntimeError(f"page {page} released more often than allocated")

    # ------------------------------------------------------------------ sliding window

    def window_start(self, position: int) -> int:
        """First block a LOCAL layer reads for a query at `position` (0 without LOCAL groups)."""
        if self.sliding_window is None:
            return 0
        return max(0, position - self.sliding_window + 1) // self.block_size

    def free_outside_window(self, block_table: list[Entry], freed: int, next_position: int) -> int:
        """Give back the LOCAL groups' pages of the blocks no query at `next_position` or later can
        read, from entry `freed` on (the ones before went already); returns the new `freed`."""
        stop = min(self.window_start(next_position), len(block_table))
        if not self._local_groups or stop <= freed:
            return freed
        for index in range(freed, stop):
            entry = list(block_table[index])
            for group in self._local_groups:
                if entry[group] != NO_PAGE:
                    self._disown(entry[group], group)
                    entry[group] = NO_PAGE
            block_table[index] = tuple(entry)
        return stop

    # ------------------------------------------------------------------ prefix cache

    def cached_prefix(self, keys: Seq[BlockKey]) -> list[Entry]:
        """The entries holding the longest run of `keys` (a prefix's chained block keys) that the
        cache can serve, in order; changes nothing. Every GLOBAL group needs all the run's blocks,
        a LOCAL group only those inside its window at the run's end (NO_PAGE before)."""
        if not self.caching:
            return []
        run = 0  # leading keys every GLOBAL group holds
        while run < len(keys) and all(keys[run] in self._cached[g] for g in self._global_groups):
            run += 1
        if self._local_groups:
            last_missing = -1  # the latest block so far that some LOCAL group lacks
            missing_before = []  # [k]: the latest such block below k, for every run length k
            for index in range(run):
                missing_before.append(last_missing)
                if not all(keys[index] in self._cached[g] for g in self._local_groups):
                    last_missing = index
            missing_before.append(last_missing)
            while run and missing_before[run] >= self.window_start(run * self.block_size):
                run -= 1
        start = self.window_start(run * self.block_size) if self._local_groups else 0
        return [tuple(self._cached[g].get(keys[index], NO_PAGE) if (not local or index >= start) else NO_PAGE
                      for g, local in enumerate(self.group_local))
                for index in range(run)]

    def unowned(self, entries: Seq[Entry]) -> int:
        """How many pages of `entries` no sequence owns (sharing them takes that many from num_free)."""
        return sum(page != NO_PAGE and self._refs[page] == 0 for entry in entries for page in entry)

    def register(self, key: BlockKey, entry: Entry) -> None:
        """Record that the owned, full block `entry` holds the K/V under `key`, group by group (a
        group's page already cached for that key keeps it; this one stays unregistered)."""
        if not self.caching:
            return
        for group, page in enumerate(entry):
            cache = self._cached[group]
            if page != NO_PAGE and key not in cache and self._key_of[page] is None:
                cache[key] = page
                self._key_of[page] = key
                self._group_of[page] = group
