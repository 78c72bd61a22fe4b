"""The autoscaling policy on its own (no server): windows, cooldowns, bounds and the two signals."""

from __future__ import annotations

import pytest

from gemma_dist.server.autoscale import AutoscaleConfig, Autoscaler, Load

BUSY = Load(ready=1, waiting=5, kv_use=0.3)
FULL = Load(ready=2, waiting=0, kv_use=0.95)
IDLE = Load(ready=2, waiting=0, kv_use=0.1, running=3, slots=8)  # 3 running fit half of one replica's 8
SATURATED = Load(ready=2, waiting=0, kv_use=0.1, running=16, slots=8)  # both full, the queue just emptied
STEADY = Load(ready=2, waiting=1, kv_use=0.6)  # some queue, some cache: neither up nor down


def policy(**overrides) -> Autoscaler:
    return Autoscaler(AutoscaleConfig(**{"min_replicas": 1, "max_replicas": 3, "up_queue": 2.0, "window": 10.0,
                                         "cooldown": 30.0, **overrides}))


def test_scales_up_only_after_the_queue_held_for_the_window():
    a = policy()
    assert [a.desired(t, BUSY, 1) for t in (0, 5, 9.9)] == [1, 1, 1]
    assert a.desired(10, BUSY, 1) == 2


def test_a_gap_in_the_signal_restarts_the_window():
    a = policy()
    a.desired(0, BUSY, 1)
    a.desired(8, STEADY, 1)  # the queue drained for a moment
    assert a.desired(12, BUSY, 1) == 1 and a.desired(21.9, BUSY, 1) == 1 and a.desired(22, BUSY, 1) == 2


def test_full_replicas_with_an_empty_queue_do_not_shrink():
    """Removing one would put its running sequences back in a queue (and flap up again)."""
    a = policy()
    a.desired(0, SATURATED, 2)
    assert a.desired(100, SATURATED, 2) == 2
    assert a.signal(Load(ready=2, waiting=0, kv_use=0.1, running=4, slots=8)) == -1  # 4 <= half of 8
    assert a.signal(Load(ready=2, waiting=0, kv_use=0.1, running=5, slots=8)) == 0


def test_kv_cache_use_alone_asks_for_a_replica():
    a = policy()
    a.desired(0, FULL, 2)
    assert a.desired(10, FULL, 2) == 3


def test_cooldown_prevents_flapping_and_bounds_hold():
    a = policy()
    a.desired(0, BUSY, 1)
    assert a.desired(10, BUSY, 1) == 2
    assert a.desired(25, BUSY, 2) == 2  # the signal held 15 s, but the cooldown runs to 40
    assert a.desired(40, BUSY, 2) == 3
    assert a.desired(80, BUSY, 3) == 3  # max_replicas
    a.desired(81, IDLE, 3)
    assert a.desired(90, IDLE, 3) == 3 and a.desired(91, IDLE, 3) == 2  # window from 81, then one at a time
    assert a.desired(110, IDLE, 2) == 2 and a.desired(121, IDLE, 2) == 1
    assert a.desired(200, IDLE, 1) == 1  # min_replicas


def test_out_of_bounds_comes_back_at_once_and_a_failed_change_waits_a_cooldown():
    a = policy(min_replicas=2)
    assert a.desired(0, STEADY, 1) == 2
    b = policy()
    b.desired(0, BUSY, 1)
    assert b.desired(10, BUSY, 1) == 2
    b.failed(11)  # the new replica could not be placed
    assert b.desired(30, BUSY, 1) == 1 and b.desired(41, BUSY, 1) == 2


@pytest.mark.parametrize("kwargs", [dict(min_replicas=0, max_replicas=1), dict(min_replicas=3, max_replicas=2),
                                    dict(min_replicas=1, max_replicas=2, up_queue=0),
                                    dict(min_replicas=1, max_replicas=2, down_kv=0.9, up_kv=0.5),
                                    dict(min_replicas=1, max_replicas=2, window=-1),
                                    dict(min_replicas=1, max_replicas=2, down_busy=0)])
def test_bad_configs(kwargs):
    with pytest.raises(ValueError):
        AutoscaleConfig(**kwargs)
