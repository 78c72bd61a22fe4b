"""Continuous batching: which sequences run in the next step, and how many tokens each.

Plain Python (no torch). Every step:
1. running sequences that are decoding get one token each, growing their block tables; when
   the cache is full the newest running sequence is preempted (blocks freed, resumed later by
   recomputing its prompt + output), so older requests keep their progress;
2. sequences part-way through their prompt continue with a chunk (chunked prefill);
3. waiting sequences are admitted in arrival order while the token budget, the sequence
   limit and free blocks allow; a long prompt takes only a chunk per step, so the decoding
   streams never stall behind it.
Finished and aborted sequences release their blocks at once. With a sliding-window pool, a
sequence's LOCAL layers give back each block their window has left after every step.

A sample forked from a running sequence of the same prompt (Sequence.fork_of; n samples per
request) starts from its K/V: it shares the full blocks and copies the last partial one
(copy-on-write: the runners copy the pages before its first step), and computes only its last
token. With prefix caching (the block manager's `caching`), a sequence being admitted first takes the
longest run of its prompt's leading full blocks that the cache holds (at least its last token is
always computed, so a token is sampled from fresh logits), and every block a step fills is offered
to the cache.
"""

from __future__ import annotations

import collections
import dataclasses

from gemma_dist.engine.block_manager import BlockManager, chain_keys
from gemma_dist.engine.sequence import FinishReason, Sequence


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one engine step."""

    max_num_seqs: int = 64  # sequences in one step (decoding + prefilling)
    max_num_batched_tokens: int = 2048  # new tokens in one step (prompt chunks + decodes)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({self.max_num_seqs})")


@dataclasses.dataclass
class ScheduledSequence:
    """One sequence's share of a step: compute K/V for `num_tokens` uncached tokens."""

    seq: Sequence
    num_tokens: int
    samples: bool  # the chunk reaches the sequence's last token, so a new token is sampled after it

    @classmethod
    def plan(cls, seq: Sequence, num_tokens: int) -> "ScheduledSequence":
        """Schedule `num_tokens` of seq's uncached tokens (fixes `samples` before the step runs)."""
        return cls(seq, num_tokens, seq.num_cached + num_tokens == seq.num_tokens)


@dataclasses.dataclass
class SchedulerOutput:
    """The plan of one step."""

    scheduled: list[ScheduledSequence]
    preempted: list[Sequence]  # sent back to waiting this step (their blocks were freed)
    copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # KV pages (src, dst) to copy first

    @property
    def num_tokens(self) -> int:
        """New tokens in the step."""
        return sum(s.num_tokens for s in self.scheduled)


class RunningSet:
    """Running sequences in admission order, keyed by identity: O(1) add, remove, membership
    and newest (a list made `seq in running` a scan comparing whole Sequences: quadratic)."""

    def __init__(self) -> None:
        self._seqs: dict[int, Sequence] = {}  # id(seq) -> seq, insertion (admission) order

    def append(self, seq: Sequence) -> None:
        """Add seq as the newest."""
        self._seqs[id(seq)] = seq

    def remove(self, seq: Sequence) -> None:
        """Drop seq (KeyError if absent)."""
        del self._seqs[id(seq)]

    def newest(self) -> Sequence:
        """The most recently admitted sequence (the first to be preempted)."""
        return self._seqs[next(reversed(self._seqs))]

    def __contains__(self, seq: object) -> bool:
        return self._seqs.get(id(seq)) is seq

    def __iter__(self):
        return iter(list(self._seqs.values()))  # a snapshot: callers may remove while iterating

    def __len__(self) -> int:
        return len(self._seqs)

    def __eq__(self, other: object) -> bool:
        return list(self._seqs.values()) == list(other) if isinstance(other, (list, tuple, RunningSet)) \
            else NotImplemented

    __hash__ = None  # mutable


class Scheduler:
    """Owns the waiting queue and the running set; plans steps over a BlockManager.

    Planning is linear in the number of sequences: membership and removal go through
    `RunningSet` (identity-keyed), and a step touches each running sequence a constant number
    of times.
    """

    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running = RunningSet()  # in admission order: the newest is preempted first
        self.num_preemptions = 0
        self.prefix_queried_tokens = 0  # prompt tokens looked up in the prefix cache at admission
        self.prefix_hit_tokens = 0  # of those, tokens found cached or forked (not computed)
        self.num_copied_pages = 0  # KV pages copied for forked samples' partial blocks (cumulative)

    # ------------------------------------------------------------------ queue

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; all it may ever hold must fit the cache alone, or it could hang."""
        # The last token fed to the model sits at position prompt + max_tokens - 2.
        needed = min(seq.num_tokens + seq.params.max_tokens - 1, seq.max_context)
        pages = self.blocks.pages_to_hold(needed, self.config.max_num_batched_tokens)
        if pages > self.blocks.num_blocks:
            holds = self.blocks.num_blocks // self.blocks.num_groups * self.blocks.block_size
            detail = f" ({pages} pages; the cache has {self.blocks.num_blocks})" if self.blocks.num_groups > 1 else ""
            raise ValueError(f"request {seq.request_id} may need {needed} tokens of KV cache{detail}; "
                             f"the cache holds {holds}")
        self.waiting.append(seq)

    def abort(self, request_id: str, seq: Sequence | None = None) -> Sequence | None:
        """Remove a waiting or running sequence, free its blocks, mark it aborted. Pass `seq`
        (the sequence of that id) to skip the search by id."""
        if seq is None:
            seq = next((s for s in self.running if s.request_id == request_id), None) or \
                next((s for s in self.waiting if s.request_id == request_id), None)
        if seq is None or seq.is_finished or not self._remove(seq):
            return None
        return self._finish(seq, FinishReason.ABORTED)

    def release(self, seq: Sequence) -> None:
        """Drop a finished sequence wherever it is, freeing its blocks (a sequence preempted while
        the step sampling its last token ran finishes while waiting)."""
        if self._remove(seq):
            self.blocks.release(seq.block_table)

    def _remove(self, seq: Sequence) -> bool:
        """Take seq out of the running set or the waiting queue; False if it is in neither."""
        if seq in self.running:
            self.running.remove(seq)
            return True
        try:
            self.waiting.remove(seq)  # identity compare (Sequence has eq=False)
        except ValueError:
            return False
        return True

    def release_finished(self) -> list[Sequence]:
        """Drop running sequences that finished this step, freeing their blocks at once."""
        done = [s for s in self.running if s.is_finished]
        for seq in done:
            self.running.remove(seq)
            self.blocks.release(seq.block_table)
        return done

    def _finish(self, seq: Sequence, reason: FinishReason) -> Sequence:
        self.blocks.release(seq.block_table)
        if seq.finish_reason is None:
            seq.finish_reason = reason
        return seq

    @property
    def has_unfinished(self) -> bool:
        """True while any sequence waits or runs."""
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ planning

    def schedule(self) -> SchedulerOutput:
        """Plan the next step."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted: list[Sequence] = []
        planned: set[int] = set()  # id() of sequences already in the plan
        block_size = self.blocks.block_size
        for seq in self.running:  # decodes first: the running streams never stall
            num_tokens = seq.num_tokens
            if num_tokens - seq.num_cached != 1 or seq.awaits_last_token or seq not in self.running:
                continue  # (not decoding, its last token is being computed, or preempted meanwhile)
            # The table usually covers the new position already (all but one step in block_size).
            if num_tokens > len(seq.block_table) * block_size and not self._make_room(seq, num_tokens, preempted):
                continue  # seq itself was preempted
            scheduled.append(ScheduledSequence(seq, 1, True))  # (one uncached token: its last)
            planned.add(id(seq))
            budget -= 1
        for seq in self.running:  # prompts part-way through their chunked prefill
            if budget <= 0:
                break
            remaining = seq.num_tokens - seq.num_cached
            if remaining <= 1 or id(seq) in planned:
                continue
            chunk = min(remaining, budget)
            if not self.blocks.can_grow(seq.block_table, seq.num_cached + chunk):
                break
            self.blocks.grow(seq.block_table, seq.num_cached + chunk)
            scheduled.append(ScheduledSequence.plan(seq, chunk))
            budget -= chunk
        copies: list[tuple[int, int]] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            seq = self.waiting[0]
            fork = self._fork_source(seq)
            # Blocks it may share instead of computing (their K/V are there): a running sample's of
            # the same prompt, else the prefix cache's.
            hits = fork[0] if fork else self._cached_prefix(seq)
            start = max(seq.num_cached, fork[2] if fork else len(hits) * self.blocks.block_size)
            chunk = min(seq.num_tokens - start, budget)
            # Pages taken from the free pool: new ones, plus cached ones nobody owns right now.
            new_blocks = self.blocks.blocks_for(start + chunk) - len(hits) - len(seq.block_table)
            needed = new_blocks * self.blocks.num_groups + self.blocks.unowned(hits)
            # Keep one free block per running sequence so admissions don't force preemptions.
            reserve = len(self.running) * self.blocks.num_groups
            if needed + reserve > self.blocks.num_free:
                if self.running or needed > self.blocks.num_free:
                    break
            self.waiting.popleft()
            if fork:
                copies += self._take_fork(seq, *fork)
            elif self.blocks.caching and not seq.num_cached:
                self._take_cached(seq, hits)
            self.blocks.grow(seq.block_table, seq.num_cached + chunk)
            self.running.append(seq)
            scheduled.append(ScheduledSequence.plan(seq, chunk))
            budget -= chunk
        return SchedulerOutput(scheduled, preempted, copies)

    def _fork_source(self, seq: Sequence) -> tuple[list, tuple | None, int] | None:
        """For a fresh sample forked from a running one (seq.fork_of, same prompt): the parent's
        full blocks to share, its partial block to copy (None when the split is at a block
        boundary) and the positions they cover, all but seq's last token (computed, to sample
        from fresh logits). None when the parent cannot give them (gone, still computing them,
        or its window already let a needed block go)."""
        parent = seq.fork_of
        if parent is None:
            return None
        usable = seq.num_known_tokens - 1
        if seq.output_token_ids or seq.num_cached or seq.block_table or parent not in self.running:
            seq.fork_of = None  # (never again: the parent is gone, or seq resumes with its own tokens)
            return None
        if parent.num_cached < usable or parent.window_freed > self.blocks.window_start(usable):
            return None
        full, partial = divmod(usable, self.blocks.block_size)
        return parent.block_table[:full], parent.block_table[full] if partial else None, usable

    def _take_fork(self, seq: Sequence, shared: list, partial: tuple | None, usable: int) -> list[tuple[int, int]]:
        """Make seq share its parent's full blocks and a copy of its partial one, their positions
        counted as computed; returns the page copies the runners must make first."""
        seq.block_table.extend(self.blocks.share(shared))
        copies = []
        if partial is not None:
            entry, copies = self.blocks.copy_of(partial)
            seq.block_table.append(entry)
        seq.num_cached = usable
        seq.registered_blocks = len(shared)  # (the parent registers them)
        seq.window_freed = seq.fork_of.window_freed  # LOCAL pages the parent gave back are not shared
        seq.fork_of = None
        self.prefix_queried_tokens += usable
        self.prefix_hit_tokens += usable
        self.num_copied_pages += len(copies)
        return copies

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding seq's leading full blocks, for a sequence with nothing cached yet;
        never its last known token's block, which must be computed to sample from its logits."""
        if not self.blocks.caching or seq.num_cached or seq.block_table:
            return []
        usable = seq.num_known_tokens - 1
        return self.blocks.cached_prefix(self._block_keys(seq, usable)[:usable // self.blocks.block_size])

    def _block_keys(self, seq: Sequence, num_tokens: int) -> list[int]:
        """seq's prefix-cache keys, covering at least the full blocks of its first `num_tokens`
        tokens (extended in place on seq: each is computed once)."""
        keys = seq.block_keys
        if len(keys) < num_tokens // self.blocks.block_size:  # (all_token_ids copies the tokens: only when needed)
            chain_keys(seq.all_token_ids, self.blocks.block_size, keys, num_tokens)
        return keys

    def _take_cached(self, seq: Sequence, hits: list[int]) -> None:
        """Make seq (admitted with nothing computed) share `hits` as its first blocks, their tokens
        counted as computed."""
        seq.block_table.extend(self.blocks.share(hits))
        seq.registered_blocks = len(hits)
        seq.num_cached = len(hits) * self.blocks.block_size
        seq.window_freed = self.blocks.window_start(seq.num_cached)  # LOCAL pages before it were not shared
        self.prefix_queried_tokens += seq.num_known_tokens - 1
        self.prefix_hit_tokens += seq.num_cached

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Offer the prefix cache every block of seq that is now full of computed, known tokens."""
        full = min(seq.num_cached, seq.num_known_tokens) // self.blocks.block_size
        if seq.registered_blocks >= full:
            return
        keys = self._block_keys(seq, full * self.blocks.block_size)
        for index in range(seq.registered_blocks, full):
            self.blocks.register(keys[index], seq.block_table[index])
        seq.registered_blocks = full

    def _make_room(self, seq: Sequence, num_tokens: int, preempted: list[Sequence]) -> bool:
        """Grow seq's table to num_tokens positions, preempting the newest others if needed.

        Returns False when seq itself had to be preempted.
        """
        while not self.blocks.can_grow(seq.block_table, num_tokens):
            victim = self.running.newest()
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq.block_table, num_tokens)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and queue it first in line; it resumes by recomputing its tokens."""
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.num_cached = seq.registered_blocks = seq.window_freed = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def on_step_done(self, out: SchedulerOutput) -> None:
        """Record that the planned tokens' K/V are now cached; LOCAL layers' pages that no later
        query can read go back to the pool (steps run in order, so the step already planned on top
        of this one reads only blocks inside its window: none of these)."""
        blocks = self.blocks
        caching, block_size, windowed = blocks.caching, blocks.block_size, blocks.sliding_window is not None
        for item in out.scheduled:
            seq = item.seq
            seq.num_cached += item.num_tokens
            if caching and seq.num_cached >= (seq.registered_blocks + 1) * block_size:  # a block filled up
                self._register_full_blocks(seq)
            if windowed and blocks.window_start(seq.num_cached) > seq.window_freed:  # a block left the window
                seq.window_freed = blocks.free_outside_window(seq.block_table, seq.window_freed, seq.num_cached)
