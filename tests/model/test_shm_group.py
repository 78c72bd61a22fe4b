"""Shared-memory collectives between processes (gemma_dist.model.shm_group): the same sums and
exchanges as gloo's, a clear error when a peer dies or stays silent, gloo kept where the ranks are
on different hosts, cannot see each other's processes or the segment cannot be made, and no file
left under /dev/shm."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import free_port


def _rank(rank: int, port: int, scenario: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    from gemma_dist.model import shm_group
    from gemma_dist.model.layers import ParallelContext
    from gemma_dist.model.shm_group import CollectiveError, SharedMemoryGroup

    if scenario == "other_host" and rank == 1:
        shm_group._host_identity = lambda: "another-machine/boot"
    if scenario == "hidden_peer" and rank == 1:  # as from another PID namespace sharing /dev/shm
        shm_group._process_visible = lambda pid: pid == os.getpid()
    if scenario == "no_segment":  # e.g. no /dev/shm, or a full one
        shm_group.SHM_DIR = shm_group.Path("/nonexistent-dir")
    local = SharedMemoryGroup.create(rank, 2, dist.group.WORLD, timeout_s=0.5 if scenario == "silent" else 30)
    try:
        if scenario in ("other_host", "no_segment", "hidden_peer"):
            results.put((rank, "none" if local is None else "group"))
        elif scenario == "exchange":
            parallel = ParallelContext(rank, 2, dist.group.WORLD, local=local)
            generator = torch.Generator().manual_seed(rank)
            sums_equal = []
            # one row, a decode batch, and past the 4 MB slot (chunked): 3 x 700,001 floats
            for shape in [(1, 640), (64, 640), (3, 700_001)]:
                x = torch.randn(shape, generator=generator) * 10
                want = x.clone()
                dist.all_reduce(want)
                sums_equal.append(torch.equal(parallel.all_reduce(x.clone()), want))
            gathered = parallel.all_gather_last_dim(torch.tensor([[rank, 10 + rank]], dtype=torch.float32))
            mine = torch.tensor([7, 8, 9]) if rank == 0 else torch.zeros(3, dtype=torch.long)
            tokens = parallel.broadcast_from_first(mine)
            results.put((rank, sums_equal, gathered.tolist(), tokens.tolist()))
        elif scenario in ("dead", "silent"):
            dist.barrier()
            if rank == 1:
                if scenario == "dead":
                    os._exit(0)  # gone without a word
                time.sleep(5)  # alive, but never reaches the collective in time
                results.put((rank, "slept"))
                return
            started = time.monotonic()
            try:
                local.all_reduce(torch.ones(640))
                results.put((rank, "returned", time.monotonic() - started))
            except CollectiveError as error:
                results.put((rank, str(error), time.monotonic() - started))
    finally:
        if scenario not in ("dead", "silent"):  # there the peers left mid-way: the process just ends
            dist.destroy_process_group()


def _run(scenario: str, expect: int) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    before = set(os.listdir("/dev/shm"))
    procs = [ctx.Process(target=_rank, args=(r, port, scenario, results)) for r in range(2)]
    for p in procs:
        p.start()
    items = [results.get() for _ in range(expect)]
    for p in procs:
        p.join(timeout=60)
    leftovers = [n for n in set(os.listdir("/dev/shm")) - before if n.startswith("gemma_dist_tp_")]
    assert not leftovers, leftovers
    return {item[0]: item[1:] for item in items}


def test_sums_gathers_and_broadcasts_equal_gloos():
    got = _run("exchange", expect=2)
    for rank in (0, 1):
        sums_equal, gathered, tokens = got[rank]
        assert sums_equal == [True, True, True]
        assert gathered == [[0.0, 10.0, 1.0, 11.0]]  # rank order along the last dim
        assert tokens == [7, 8, 9]


def test_a_dead_peer_ends_the_collective_at_once():
    message, seconds = _run("dead", expect=1)[0]
    assert "process is gone" in message and seconds < 10


def test_a_silent_peer_ends_the_collective_after_its_timeout():
    got = _run("silent", expect=2)
    message, seconds = got[0]
    assert "silent" in message and 0.4 < seconds < 4


@pytest.mark.parametrize("scenario", ["other_host", "hidden_peer"])
def test_ranks_on_different_hosts_or_unseen_by_each_other_keep_gloo(scenario):
    got = _run(scenario, expect=2)
    assert got[0] == ("none",) and got[1] == ("none",)


def test_a_segment_that_cannot_be_made_keeps_gloo():
    got = _run("no_segment", expect=2)
    assert got[0] == ("none",) and got[1] == ("none",)
