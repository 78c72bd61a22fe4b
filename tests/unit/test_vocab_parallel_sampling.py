"""Vocabulary-parallel sampling (tp > 1): the tokens equal whole-row sampling, for every kind of row.

Each tensor-parallel rank holds a slice of the logits; `sample_vocab_parallel` moves candidates
between ranks instead of whole rows. Here the ranks are threads over one shared gather, so the
exchange is exercised exactly as over torch.distributed, without processes.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from gemma_dist.sampling import (SampleResult, Sampler, SamplingParams, SamplingRow, make_generator,
                                 sample_vocab_parallel, shard_candidates)


class ThreadGroup:
    """`world` ranks as threads; all_gather_last_dim concatenates every rank's tensor in rank order."""

    def __init__(self, world: int):
        self.world = world
        self.parts: list = [None] * world
        self.barrier = threading.Barrier(world, timeout=30)
        self.gathers = []  # (rank, shape) of each gather, to check what crossed ranks

    def gather_for(self, rank: int):
        def gather(x: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = x.clone()
            self.gathers.append((rank, tuple(x.shape)))
            self.barrier.wait()
            out = torch.cat(self.parts, dim=-1)
            self.barrier.wait()  # everyone has read before the next gather overwrites
            return out
        return gather


def run_sharded(logits: torch.Tensor, rows: list[SamplingRow], world: int, vocab_limit: int,
                seed: int) -> tuple[SampleResult, ThreadGroup]:
    """Split `logits` (S, V) over `world` ranks (the last one padded, as VocabParallelEmbedding
    does) and sample on all of them; rank 0's result."""
    vocab = logits.shape[1]
    local = math.ceil(vocab / world)
    padded = torch.nn.functional.pad(logits, (0, local * world - vocab), value=0.0)  # padding rows: logit 0
    group, results = ThreadGroup(world), [None] * world

    def rank_main(rank: int) -> None:
        sampler = Sampler(seed) if rank == 0 else None
        results[rank] = sample_vocab_parallel(padded[:, rank * local:(rank + 1) * local].contiguous(), rows,
                                              rank * local, vocab_limit, group.gather_for(rank), sampler)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is None for r in results[1:])
    return results[0], group


def mixed_rows(steps_seed: int) -> list[SamplingRow]:
    """One of each kind: greedy, top-k (seeded and not), top-k + top-p + min-p, penalties,
    logprobs, nucleus without top-k, full vocabulary, penalties + logprobs."""
    history = [[5, 9, 9, 40, 41], [7, 7, 7, 300, 301, 302]]
    kinds = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, logprobs=5),
        SamplingParams(temperature=0.8, top_k=40, seed=11),
        SamplingParams(temperature=1.0, top_k=64, top_p=0.9, min_p=0.02, seed=12),
        SamplingParams(temperature=0.7, top_k=20, repetition_penalty=1.3, frequency_penalty=0.5,
                       presence_penalty=0.4, seed=13),
        SamplingParams(temperature=1.0, top_k=30, logprobs=3, seed=14),
        SamplingParams(temperature=0.9, top_k=0, top_p=0.8, seed=15),
        SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=16),
        SamplingParams(temperature=0, repetition_penalty=1.5, logprobs=2),
        SamplingParams(temperature=0, presence_penalty=2.0),
    ]
    return [SamplingRow(p, history[i % 2], history[(i + 1) % 2],
                        make_generator(p.seed + steps_seed) if p.seed is not None else None)
            for i, p in enumerate(kinds)]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("vocab", [1000, 4099])
def test_tokens_equal_whole_row_sampling(world, vocab):
    torch.manual_seed(world * 31 + vocab)
    for step in range(5):
        logits = torch.randn(10, vocab) * 3
        logits[3, 17] = logits[3].max() + 0.01  # a clear winner in one shard
        limit = vocab - 7  # the tail past the tokenizer is never picked
        whole_rows, shard_rows = mixed_rows(step), mixed_rows(step)
        masked = logits.clone()
        masked[:, limit:] = float("-inf")
        want = Sampler(99)(masked, whole_rows)
        got, _ = run_sharded(logits, shard_rows, world, limit, seed=99)
        assert got.token_ids == want.token_ids, step
        assert all(t < limit for t in got.token_ids)
        for a, b in zip(got.logprobs, want.logprobs):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
                assert [t for t, _ in a.top] == [t for t, _ in b.top]
                assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-4)


def test_greedy_ties_pick_the_lowest_id_across_shards():
    logits = torch.zeros(2, 100)
    logits[0, [10, 60, 95]] = 5.0  # equal maxima in different shards
    logits[1, [70, 71]] = 5.0  # equal maxima in one shard
    rows = [SamplingRow(SamplingParams(temperature=0), [], []) for _ in range(2)]
    got, _ = run_sharded(logits, rows, 2, 100, seed=0)
    assert got.token_ids == [10, 70] == Sampler(0)(logits, rows).token_ids


def test_only_candidates_cross_ranks_for_top_k_rows():
    vocab = 262_144

    def rows():
        return [SamplingRow(SamplingParams(top_k=64, seed=s), [], [], make_generator(s)) for s in range(8)]

    logits = torch.randn(8, vocab)
    got, group = run_sharded(logits, rows(), 2, vocab, seed=0)
    widths = {shape[1] for _, shape in group.gathers}
    assert widths == {2 * 64}  # values and ids of 64 candidates, not 131,072 logits per row
    assert got.token_ids == Sampler(0)(logits, rows()).token_ids


def test_candidate_counts():
    assert shard_candidates(SamplingRow(SamplingParams(temperature=0), [], [])) == 1
    assert shard_candidates(SamplingRow(SamplingParams(temperature=0, logprobs=7), [], [])) == 7
    assert shard_candidates(SamplingRow(SamplingParams(top_k=64), [], [])) == 64
    assert shard_candidates(SamplingRow(SamplingParams(top_k=0, top_p=0.5), [], [])) is None
    assert shard_candidates(SamplingRow(SamplingParams(top_k=5000), [], [])) is None
    assert shard_candidates(SamplingRow(SamplingParams(top_k=8, logprobs=2, repetition_penalty=1.2), [], [])) is None
