"""Fixed-size KV blocks: a free list with reference counts. Plain Python (no torch).

Reference counts let forked sequences (n > 1 samples, beam search, prefix caching) share
blocks; a block returns to the free list when its last owner releases it.
"""

from __future__ import annotations

import collections
import math


class BlockManager:
    """Hands out KV-cache block ids to sequences' block tables."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: collections.deque[int] = collections.deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        """Blocks not owned by any sequence."""
        return len(self._free)

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
            block = self._free.popleft()
            self._refs[block] = 1
            block_table.append(block)

    def share(self, block_table: list[int]) -> list[int]:
        """A copy of `block_table` whose blocks are now owned by one more sequence."""
        for block in block_table:
            self._refs[block] += 1
        return list(block_table)

    def release(self, block_table: list[int]) -> None:
        """Drop one owner from every block of the table and empty it."""
        for block in block_table:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)
            elif self._refs[block] < 0:
                raise RuntimeError(f"block {block} released more often than allocated")
        block_table.clear()
