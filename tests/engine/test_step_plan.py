"""Step plans carry changes only: a decode step's message does not grow with context length, and
the runners' persistent batch stays in step with the engine through preemption and reuse."""

from __future__ import annotations

import pickle

import pytest

from gemma_dist import SamplingParams
from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine
from gemma_dist.engine.step_plan import StepPlan
from gemma_dist.sampling import SampleResult


class RecordingRunner:
    """Stands in for the shard workers: records each plan's wire size, returns token 1000 + step."""

    def __init__(self):
        self.plans: list[StepPlan] = []
        self.sizes: list[int] = []

    def execute_plan(self, plan: StepPlan) -> SampleResult:
        self.plans.append(plan)
        self.sizes.append(len(pickle.dumps(plan)))
        return SampleResult([1000 + len(self.plans)] * plan.num_sampled, [None] * plan.num_sampled)


@pytest.fixture(scope="module")
def checkpoint():
    from gemma_dist.model.loading import open_checkpoint

    opened = open_checkpoint("default")
    yield opened.config, opened.load_tokenizer()
    opened.source.close()


def decode_payload(checkpoint, context: int) -> int:
    """Wire size of a decode step of one request whose context is `context` tokens."""
    config, tokenizer = checkpoint
    runner = RecordingRunner()
    engine = LLMEngine.with_runner(config, tokenizer, EngineConfig(block_size=16, max_num_batched_tokens=4096),
                                   runner, num_blocks=512)
    prompt = [2] + [300 + i % 1000 for i in range(context - 1)]
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for _ in range(4):
        engine.step()
    # Steps 2..4 are decodes at positions context..context+2; none starts a new block here.
    assert all(plan.num_tokens == [1] for plan in runner.plans[1:])
    assert runner.plans[0].num_tokens == [context] and len(runner.plans[0].added[0].prompt_token_ids) == context
    return runner.sizes[2]


def test_decode_step_payload_does_not_grow_with_context(checkpoint):
    short, long = decode_payload(checkpoint, 100), decode_payload(checkpoint, 2000)
    assert abs(long - short) <= 16, (short, long)  # a few bytes for bigger numbers, not 1,900 tokens
    assert long < 1024


def test_plan_bookkeeping_through_preemption_and_slot_reuse(checkpoint):
    """A tiny cache forces preemptions; a mirror of the runner state, rebuilt from the plans and
    the tokens the runner sampled (as every runner appends them), always agrees with the engine:
    tokens, block tables, and which slot holds which request."""
    config, tokenizer = checkpoint
    runner = RecordingRunner()
    engine = LLMEngine.with_runner(config, tokenizer, EngineConfig(block_size=4, max_num_seqs=4,
                                                                   max_num_batched_tokens=64), runner, num_blocks=24)
    for i in range(8):
        engine.add_request(f"r{i}", [2] + [100 + i] * (5 + 3 * i), SamplingParams(temperature=0, max_tokens=12,
                                                                                 ignore_eos=True))
    seqs = {request_id: request.seq for request_id, request in engine._requests.items()}
    mirror: dict[int, dict] = {}  # slot -> {"id", "tokens", "blocks"}
    seen = 0
    while engine.has_unfinished_requests:
        engine.step()
        for step, plan in enumerate(runner.plans[seen:], start=seen + 1):
            for slot in plan.removed:
                del mirror[slot]
            for new in plan.added:
                assert new.slot not in mirror
                mirror[new.slot] = {"id": new.request_id, "tokens": list(new.prompt_token_ids) + new.output_token_ids,
                                    "blocks": []}
            for slot in plan.reset:
                mirror[slot]["blocks"] = []
            for slot, index, blocks in plan.block_updates:
                assert index == len(mirror[slot]["blocks"])
                mirror[slot]["blocks"] += blocks
            for slot, cached, n, samples in zip(plan.slots, plan.num_cached, plan.num_tokens, plan.samples):
                seq = seqs[mirror[slot]["id"]]
                assert cached + n == len(mirror[slot]["tokens"]) if samples else cached + n < len(mirror[slot]["tokens"])
                assert seq.is_finished or mirror[slot]["blocks"] == seq.block_table
                if samples:
                    mirror[slot]["tokens"].append(1000 + step)  # what RecordingRunner sampled
                assert mirror[slot]["tokens"] == seq.prompt_token_ids + seq.output_token_ids[:len(
                    mirror[slot]["tokens"]) - len(seq.prompt_token_ids)]
        seen = len(runner.plans)
    assert engine.scheduler.num_preemptions > 0
    assert len(mirror) <= 4 + engine.scheduler.num_preemptions  # slots are reused, not leaked
