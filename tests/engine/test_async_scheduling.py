"""Async scheduling: with a runner that queues submitted steps, the engine plans step N+1 before
step N's tokens are known (they are pending; the runner appends what it samples itself). The
outputs must not change: every request gets exactly the tokens it would get alone, through
preemptions, stop tokens, max_tokens, aborts and slot reuse.

The runner here is a fake "model" over its own persistent state: the token it samples for a row
is a hash of the row's whole context as the runner knows it, and it checks that every row computes
exactly the tokens it has. A stale block table, a wrong position or a lost token changes outputs.
"""

from __future__ import annotations

import asyncio
import collections

import pytest

from gemma_dist import SamplingParams
from gemma_dist.engine.llm_engine import AsyncLLMEngine, EngineConfig, LLMEngine
from gemma_dist.sampling import SampleResult


def next_token(context: list[int]) -> int:
    """The fake model: a token (ids 300..349) that depends on the whole context."""
    h = 0
    for token in context:
        h = (h * 31 + token) % 1_000_003
    return 300 + h % 50


class QueuedFakeRunner:
    """Applies plans in submission order (as a remote worker's queue does), one step per result()."""

    def __init__(self):
        self.rows: dict[int, dict] = {}
        self.queue: collections.deque = collections.deque()
        self.most_queued = 0
        self.steps = 0

    def submit(self, plan):
        handle = _Handle(self, plan)
        self.queue.append(handle)
        self.most_queued = max(self.most_queued, len(self.queue))
        return handle

    def execute_plan(self, plan):
        return self.submit(plan).result()

    def run(self, plan) -> SampleResult:
        for slot in plan.removed:
            del self.rows[slot]
        for new in plan.added:
            assert new.slot not in self.rows
            self.rows[new.slot] = {"tokens": list(new.prompt_token_ids) + list(new.output_token_ids), "blocks": []}
        for slot in plan.reset:
            self.rows[slot]["blocks"] = []
        for slot, index, blocks in plan.block_updates:
            assert index == len(self.rows[slot]["blocks"])
            self.rows[slot]["blocks"] += blocks
        sampled = []
        for slot, cached, n, samples in zip(plan.slots, plan.num_cached, plan.num_tokens, plan.samples):
            row = self.rows[slot]
            assert len(row["blocks"]) * 4 >= cached + n  # block_size 4
            if samples:
                assert cached + n == len(row["tokens"]), "a sampling row must end at its last token"
                token = next_token(row["tokens"])
                row["tokens"].append(token)
                sampled.append(token)
            else:
                assert cached + n < len(row["tokens"])
        self.steps += 1
        return SampleResult(sampled, [None] * len(sampled))


class _Handle:
    def __init__(self, runner: QueuedFakeRunner, plan):
        self.runner, self.plan, self.value = runner, plan, None

    def result(self) -> SampleResult:
        while self.value is None:  # run every step queued before this one, then this one
            handle = self.runner.queue.popleft()
            handle.value = self.runner.run(handle.plan)
        return self.value


def solo(prompt: list[int], params: SamplingParams) -> list[int]:
    out: list[int] = []
    while len(out) < params.max_tokens:
        token = next_token(prompt + out)
        out.append(token)
        if token in params.stop_token_ids:
            break
    return out


@pytest.fixture(scope="module")
def checkpoint():
    from gemma_dist.model.loading import open_checkpoint

    opened = open_checkpoint("default")
    yield opened.config, opened.load_tokenizer()
    opened.source.close()


@pytest.mark.parametrize("num_blocks", [40, 400])  # 40: the cache is tight, sequences get preempted
def test_async_scheduling_gives_every_request_its_solo_tokens(checkpoint, num_blocks):
    config, tokenizer = checkpoint
    runner = QueuedFakeRunner()
    engine = LLMEngine.with_runner(config, tokenizer, EngineConfig(block_size=4, max_num_seqs=6,
                                                                   max_num_batched_tokens=48), runner, num_blocks)
    requests = []
    for i in range(16):
        prompt = [2] + [100 + (i * 7 + j) % 90 for j in range(3 + (i * 5) % 23)]
        stops = (300 + (i * 13) % 50,) if i % 3 == 0 else ()
        params = SamplingParams(temperature=0, max_tokens=4 + (i * 11) % 21, stop_token_ids=stops, ignore_eos=True)
        requests.append((f"r{i}", prompt, params))
    async_engine = AsyncLLMEngine(engine)

    async def one(request_id, prompt, params, abort_after=None):
        tokens = []
        async for delta in async_engine.generate(request_id, prompt, params):
            tokens += delta.token_ids
            if abort_after is not None and len(tokens) >= abort_after:
                break  # leaving the iterator aborts the request
        return tokens

    async def all_of_them():
        jobs = []
        for i, (request_id, prompt, params) in enumerate(requests):
            jobs.append(one(request_id, prompt, params, abort_after=3 if i == 5 else None))
            await asyncio.sleep(0.001 * (i % 4))  # arrivals spread over the first steps
        return await asyncio.gather(*jobs)

    try:
        outputs = asyncio.run(all_of_them())
    finally:
        async_engine.shutdown()
    for i, ((request_id, prompt, params), tokens) in enumerate(zip(requests, outputs)):
        want = solo(prompt, params)
        if i == 5:
            assert tokens == want[:len(tokens)] and len(tokens) >= 3
        else:
            assert tokens == want, request_id
    assert runner.most_queued >= 2  # steps really were planned ahead of their predecessors' tokens
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.free_blocks) == (0, 0, stats.total_blocks)
    if num_blocks == 40:
        assert stats.preemptions > 0
