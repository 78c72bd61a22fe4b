"""Cache-aware routing at the gateway (plain Python, fake replicas)."""

from __future__ import annotations

import dataclasses

import pytest

from gemma_dist.server.routing import PREFIX_BLOCK_TOKENS, Router


@dataclasses.dataclass
class FakeReplica:
    name: str
    in_flight: int = 0

    def load(self) -> int:
        return self.in_flight


def prompt(family: int, length: int = 80, tail: int = 0) -> list[int]:
    return [2] + [1000 + family * 7 + i for i in range(length - 1)] + [50 + tail]


def send(router: Router, replicas, ids) -> FakeReplica:
    keys = router.keys(ids)
    chosen = router.pick(replicas, keys)
    router.record(chosen.name, keys)
    return chosen


def test_a_request_follows_its_prefix_to_the_replica_that_served_it():
    router = Router("prefix")
    a, b = FakeReplica("a"), FakeReplica("b")
    assert send(router, [a, b], prompt(1)) is a  # nothing indexed: least-loaded (ties: the first)
    a.in_flight = 1
    assert send(router, [a, b], prompt(2)) is b  # no match: least-loaded
    a.in_flight, b.in_flight = 3, 0
    assert send(router, [a, b], prompt(1, tail=9)) is a  # the shared prefix wins over a small load gap
    assert send(router, [a, b], prompt(2, tail=9)) is b


def test_new_prefixes_spread_over_idle_replicas_and_then_stick():
    """Requests one at a time (every replica idle): each new prefix goes to the replica holding the
    fewest indexed blocks, and its later requests follow it."""
    router = Router("prefix")
    a, b = FakeReplica("a"), FakeReplica("b")
    first = [send(router, [a, b], prompt(family)).name for family in range(4)]
    assert first == ["a", "b", "a", "b"]
    again = [send(router, [a, b], prompt(family, tail=1)).name for family in range(4)]
    assert again == first


def test_the_longest_match_wins():
    router = Router("prefix")
    a, b = FakeReplica("a"), FakeReplica("b")
    base = prompt(3, length=200)
    router.record("a", router.keys(base[:40]))  # two blocks
    router.record("b", router.keys(base[:120]))  # seven blocks
    assert router.matched_blocks("a", router.keys(base)) == 2
    assert router.pick([a, b], router.keys(base)) is b


def test_a_much_busier_replica_loses_its_prefix_match_to_the_least_loaded():
    router = Router("prefix", load_slack=4)
    a, b = FakeReplica("a", in_flight=5), FakeReplica("b", in_flight=0)
    router.record("a", router.keys(prompt(1)))
    assert router.pick([a, b], router.keys(prompt(1))) is b  # 5 more in flight than b: over the slack
    a.in_flight = 4
    assert router.pick([a, b], router.keys(prompt(1))) is a  # within the slack


def test_least_loaded_policy_ignores_prefixes():
    router = Router("least-loaded")
    a, b = FakeReplica("a", in_flight=1), FakeReplica("b")
    assert router.keys(prompt(1)) == []
    router.record("a", router.keys(prompt(1)))
    assert router.pick([a, b], router.keys(prompt(1))) is b


def test_a_forgotten_replica_has_no_index_and_the_index_is_bounded():
    router = Router("prefix", index_blocks=3)
    ids = prompt(1, length=5 * PREFIX_BLOCK_TOKENS)
    router.record("a", router.keys(ids))
    assert router.matched_blocks("a", router.keys(ids)) == 3  # the tail went first: the head is shared more
    router.record("a", router.keys(prompt(2)))  # 5 newer blocks push all of those out
    assert router.matched_blocks("a", router.keys(ids)) == 0
    router.forget("a")
    assert router.matched_blocks("a", router.keys(ids)) == 0


def test_no_candidates_and_bad_settings():
    assert Router().pick([], []) is None
    with pytest.raises(ValueError, match="routing policy"):
        Router("round-robin")
    with pytest.raises(ValueError, match="load_slack"):
        Router(load_slack=-1)
