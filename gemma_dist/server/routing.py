"""Which replica serves a request: least-loaded, or cache-aware (prefix). Plain Python.

Cache-aware routing keeps, per replica, an approximate index of the prompt prefixes the gateway
sent there: the chained block keys of each prompt's full blocks (block_manager.chain_keys, the
keys the replicas' prefix caches use), bounded and least recently used first out. A request goes
to the replica whose index holds the longest run of its leading blocks, since that replica most
likely still caches their K/V, unless that replica carries `load_slack` more requests than the
least-loaded one: then to the least-loaded (a hit is not worth queueing behind a busy replica).
With no match anywhere, least-loaded decides, and among equally loaded replicas the one whose
index is smallest, so distinct prefixes spread over the replicas' caches. The index is approximate: a replica may have
evicted blocks the gateway still lists (that only costs a recomputation), and it is dropped
for a replica that fails or leaves.
"""

from __future__ import annotations

import collections
from typing import Protocol, Sequence

from gemma_dist.engine.block_manager import BlockKey, chain_keys

ROUTING_POLICIES = ("prefix", "least-loaded")
PREFIX_BLOCK_TOKENS = 16  # tokens per indexed block: the engine's default KV block size
DEFAULT_LOAD_SLACK = 8  # requests in flight a prefix match may add over the least-loaded replica
DEFAULT_INDEX_BLOCKS = 1 << 16  # keys kept per replica (~one replica's cache at 16 tokens a block)


class Routable(Protocol):
    """What routing needs of a replica."""

    name: str

    def load(self) -> int: ...


class Router:
    """Picks a replica for each request under one policy; `record` tells it where one went."""

    def __init__(self, policy: str = "prefix", load_slack: int = DEFAULT_LOAD_SLACK,
                 index_blocks: int = DEFAULT_INDEX_BLOCKS):
        if policy not in ROUTING_POLICIES:
            raise ValueError(f"routing policy must be one of {', '.join(ROUTING_POLICIES)}, got {policy!r}")
        if load_slack < 0 or index_blocks < 1:
            raise ValueError(f"load_slack must be >= 0 and index_blocks >= 1, got {load_slack}, {index_blocks}")
        self.policy = policy
        self.load_slack = load_slack
        self.index_blocks = index_blocks
        self._index: dict[str, collections.OrderedDict[BlockKey, None]] = {}  # replica name -> keys, LRU first

    def keys(self, prompt_token_ids: Sequence[int] | None) -> list[BlockKey]:
        """The request's prefix keys (none under least-loaded, or without token ids)."""
        if self.policy != "prefix" or not prompt_token_ids:
            return []
        return chain_keys(prompt_token_ids, PREFIX_BLOCK_TOKENS)

    def pick(self, candidates: Sequence[Routable], keys: Sequence[BlockKey]) -> Routable | None:
        """The replica for a request with prefix `keys` among ready `candidates` (None if there are none)."""
        if not candidates:
            return None
        loads = {id(r): r.load() for r in candidates}  # read once: loads move while we decide
        # Ties: the replica whose index holds the fewest blocks, so new prefixes spread over the replicas
        # (and their caches) even when requests come one at a time; then the first.
        least = min(candidates, key=lambda r: (loads[id(r)], len(self._index.get(r.name, ()))))
        best, best_match = least, 0
        for replica in candidates:
            match = self.matched_blocks(replica.name, keys)
            if match > best_match or (match == best_match and match and loads[id(replica)] < loads[id(best)]):
                best, best_match = replica, match
        if best_match and loads[id(best)] - loads[id(least)] <= self.load_slack:
            return best
        return least

    def matched_blocks(self, name: str, keys: Sequence[BlockKey]) -> int:
        """How many leading `keys` the index lists for replica `name`."""
        index = self._index.get(name)
        count = 0
        if index:
            for key in keys:
                if key not in index:
                    break
                count += 1
        return count

    def record(self, name: str, keys: Sequence[BlockKey]) -> None:
        """Note that replica `name` received a prompt with prefix `keys` (now its most recent; its
        first blocks, which more prompts share, the most recent of all, so they leave last)."""
        if not keys:
            return
        index = self._index.setdefault(name, collections.OrderedDict())
        for key in reversed(keys):
            index[key] = None
            index.move_to_end(key)
        while len(index) > self.index_blocks:
            index.popitem(last=False)

    def forget(self, name: str) -> None:
        """Drop what the index knows of replica `name` (it failed, was rebuilt, or left)."""
        self._index.pop(name, None)
