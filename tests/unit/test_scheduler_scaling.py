"""The scheduler plans a step in time linear in the number of sequences (no per-sequence scans).

Two measures, each compared between 250 and 1,000 sequences in the same run (4x the work if
linear, 16x if quadratic): the count of Python function calls during planning (deterministic),
and the best of several wall-clock timings (with a wide margin, as machines are noisy).
"""

from __future__ import annotations

import sys
import time

from gemma_dist.engine.block_manager import BlockManager
from gemma_dist.engine.scheduler import Scheduler, SchedulerConfig
from gemma_dist.engine.sequence import Sequence, finish_on_token
from tests.unit.test_scheduler import Params


def decoding_scheduler(num_seqs: int) -> Scheduler:
    """num_seqs sequences past their prefill, each decoding, plus as many waiting behind them."""
    blocks = BlockManager(num_blocks=num_seqs * 8, block_size=16)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=num_seqs, max_num_batched_tokens=num_seqs * 32), blocks)
    for i in range(2 * num_seqs):
        scheduler.add(Sequence(request_id=f"r{i}", prompt_token_ids=list(range(20)),
                               params=Params(max_tokens=100), eos_token_ids=frozenset(), max_context=10**6))
    plan = scheduler.schedule()  # admits num_seqs of them with their whole prompt
    scheduler.on_step_done(plan)
    for item in plan.scheduled:
        item.seq.output_token_ids.append(7)
    return scheduler


def one_step(scheduler: Scheduler) -> None:
    """Plan a decode step for every running sequence, record it, append tokens, release finished."""
    plan = scheduler.schedule()
    scheduler.on_step_done(plan)
    for item in plan.scheduled:
        item.seq.output_token_ids.append(7)
        item.seq.finish_reason = finish_on_token(item.seq, 7)
    scheduler.release_finished()


def calls_during(fn) -> int:
    """Python and C function calls made while fn() runs."""
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def best_time(num_seqs: int, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        scheduler = decoding_scheduler(num_seqs)
        start = time.perf_counter()
        one_step(scheduler)
        times.append(time.perf_counter() - start)
    return min(times)


def test_planning_calls_grow_linearly():
    small = calls_during(lambda: one_step(decoding_scheduler_250))
    large = calls_during(lambda: one_step(decoding_scheduler_1000))
    assert large / small < 5, (small, large)  # linear: ~4; quadratic: ~16


def test_planning_time_grows_linearly():
    one_step(decoding_scheduler(50))  # warm-up
    ratio = best_time(1000) / best_time(250)
    assert ratio < 9, ratio  # linear: ~4; quadratic: ~16


def test_every_running_sequence_decodes_each_step():
    scheduler = decoding_scheduler(1000)
    plan = scheduler.schedule()
    assert len(plan.scheduled) == 1000 and all(item.num_tokens == 1 for item in plan.scheduled)
    assert len(scheduler.waiting) == 1000


decoding_scheduler_250 = decoding_scheduler(250)
decoding_scheduler_1000 = decoding_scheduler(1000)
