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
        params = SamplingParams(temperature=0, max_tokens=8 + (i * 11) % 30, stop_token_ids=stops, ignore_eos=True)
        if i % 4 == 1:  # a stop string: the text of its solo output's 9th token, found only after detokenizing
            params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                    stop=[tokenizer.decode(solo(prompt, params)[8:9]).strip() or "never"])
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
        if params.stop:  # up to the token whose text completes the stop string
            want = next(want[:k] for k in range(1, len(want) + 1) if params.stop[0] in tokenizer.decode(want[:k]))
        if i == 5:
            assert tokens == want[:len(tokens)] and len(tokens) >= 3
        else:
            assert tokens == want, request_id
    assert runner.most_queued >= 2  # steps really were planned ahead of their predecessors' tokens
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.free_blocks) == (0, 0, stats.total_blocks)
    if num_blocks == 40:
        assert stats.preemptions > 0


@pytest.mark.parametrize("seed", range(200))
def test_random_workloads_two_steps_in_flight(checkpoint, seed):
    """Random prompts, lengths, stop tokens and stop strings over tight caches, driven as the
    async engine drives a remote runner (launch N+1 before completing N), without threads: every
    request gets its solo tokens, and everything is freed, including sequences that finish while
    waiting to resume (preempted while the step that finished them ran)."""
    import random

    rng = random.Random(seed)
    config, tokenizer = checkpoint
    runner = QueuedFakeRunner()
    block_size, max_len = 4, 0
    requests = {}
    for i in range(rng.randint(3, 10)):
        prompt = [2] + [rng.randint(100, 250) for _ in range(rng.randint(1, 20))]
        params = SamplingParams(temperature=0, max_tokens=rng.randint(1, 30), ignore_eos=True,
                                stop_token_ids=(rng.randint(300, 349),) if rng.random() < 0.4 else ())
        if rng.random() < 0.3:
            text = tokenizer.decode(solo(prompt, params)[rng.randint(0, 3):][:1]).strip()
            params = SamplingParams(temperature=0, max_tokens=params.max_tokens, ignore_eos=True,
                                    stop=[text] if text else [])
        requests[f"r{i}"] = (prompt, params)
        max_len = max(max_len, len(prompt) + params.max_tokens)
    num_blocks = rng.randint(-(-max_len // block_size), 2 * -(-max_len // block_size))
    engine = LLMEngine.with_runner(config, tokenizer, EngineConfig(block_size=block_size, max_num_seqs=rng.randint(1, 6),
                                                                   max_num_batched_tokens=rng.randint(6, 40)),
                                   runner, num_blocks)
    pending = list(requests.items())
    outputs: dict[str, list[int]] = {rid: [] for rid in requests}
    in_flight: collections.deque = collections.deque()
    for step in range(2000):
        if pending and rng.random() < 0.5:  # arrivals between steps
            rid, (prompt, params) = pending.pop(0)
            engine.add_request(rid, prompt, params)
        while len(in_flight) < 2:
            launched = engine.launch()
            if launched is None:
                break
            in_flight.append(launched)
        if in_flight:
            for delta in engine.complete(in_flight.popleft()):
                outputs[delta.request_id] += delta.token_ids
        elif not pending and not engine.has_unfinished_requests:
            break
    assert not pending and not in_flight and not engine.has_unfinished_requests
    for rid, (prompt, params) in requests.items():
        want = solo(prompt, params)
        if params.stop:
            want = next((want[:k] for k in range(1, len(want) + 1) if params.stop[0] in tokenizer.decode(want[:k])),
                        want)
        assert outputs[rid] == want, rid
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.free_blocks) == (0, 0, stats.total_blocks)
