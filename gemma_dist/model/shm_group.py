"""Collectives of the CPU tensor-parallel ranks of one host through shared memory.

A `ParallelContext` with a `SharedMemoryGroup` (its `local`) runs its fp32 all-reduces and its
small exchanges (the LM head's per-rank best logits, rank 0's sampled tokens) here instead of
through gloo. gloo's all-reduce over loopback TCP measured 0.9-1.7 ms per call on a 2-core machine
whatever the size (bench/bench_shm_collectives.py), and a forward makes one per row-parallel layer;
here a call costs a copy and a wait for the peers (the kernel: native/shm_collectives.c).

Setup goes through the torch.distributed group, which stays for everything else: rank 0 creates
the segment under /dev/shm, the others map it, and rank 0 unlinks the name once all have (so no
file outlives the group, however it ends). `SharedMemoryGroup.create` returns None where it cannot
help (ranks on different hosts, no /dev/shm, no AVX2 or compiler for the kernel), and says why in
the log: the group then keeps gloo.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import socket
import uuid
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SLOT_BYTES = 4 << 20  # one rank's slot: larger all-reduces run in chunks of this
SHM_DIR = Path("/dev/shm")


class CollectiveError(RuntimeError):
    """A shared-memory collective failed: a peer's process is gone, or it stayed silent too long."""


class SharedMemoryGroup:
    """This rank's view of a segment shared by `size` ranks of one host (see the module doc)."""

    def __init__(self, rank: int, size: int, path: Path, timeout_s: float, create: bool):
        from gemma_dist.model import native

        self.rank, self.size, self.timeout_s = rank, size, timeout_s
        self.lib = _library(native.load("shm_collectives"))
        if size > self.lib.shm_max_ranks():
            raise ValueError(f"shared-memory collectives take at most {self.lib.shm_max_ranks()} ranks, got {size}")
        nbytes = self.lib.shm_segment_bytes(size, SLOT_BYTES)
        fd = os.open(path, (os.O_CREAT | os.O_EXCL | os.O_RDWR) if create else os.O_RDWR, 0o600)
        try:
            if create:  # reserved now: a full tmpfs fails here, not with SIGBUS at a later write
                os.posix_fallocate(fd, 0, nbytes)
            self.segment = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self._anchor = ctypes.c_char.from_buffer(self.segment)  # the segment's first byte, for its address
        self.base = ctypes.addressof(self._anchor)
        self.lib.shm_register(self.base, rank, os.getpid())

    @classmethod
    def create(cls, rank: int, size: int, group, timeout_s: float) -> "SharedMemoryGroup | None":
        """Collective over `group` (every rank calls it): the shared group, or None (logged why) where
        the ranks are on different hosts or the segment or kernel is unavailable."""
        import torch.distributed as dist

        first = dist.get_global_rank(group, 0)
        identities = [None] * size
        dist.all_gather_object(identities, (_host_identity(), os.getpid()), group=group)
        path, shared, reason = SHM_DIR / f"gemma_dist_tp_{uuid.uuid4().hex}", None, None
        if len({host for host, _ in identities}) > 1:
            reason = "the ranks are on different hosts"
        elif not all(map(_process_visible, (pid for _, pid in identities))):
            reason = f"{socket.gethostname()}: a peer rank's process is not visible here (another PID namespace)"
        elif rank == 0:
            shared, reason = _attempt(lambda: cls(rank, size, path, timeout_s, create=True), "create")
        plan = [str(path), reason if rank == 0 else None]
        dist.broadcast_object_list(plan, src=first, group=group)  # rank 0's segment name, or why not
        path = Path(plan[0])
        reason = reason or plan[1]
        if reason is None and rank != 0:
            shared, reason = _attempt(lambda: cls(rank, size, path, timeout_s, create=False), "map")
        reasons = [None] * size
        dist.all_gather_object(reasons, reason, group=group)
        if rank == 0:  # every rank has mapped it or given up (a half-made one too): the name can go
            path.unlink(missing_ok=True)
        reason = next((r for r in reasons if r is not None), None)
        if reason is None:
            return shared
        if rank == 0:
            log.warning("tensor-parallel collectives stay on gloo: %s", reason)
        if shared is not None:
            shared.close()
        return None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum a contiguous fp32 CPU `x` over the ranks in place (added in rank order: every rank
        gets the same values)."""
        status = self.lib.shm_all_reduce_f32(self.base, self.rank, self.size, SLOT_BYTES, x.data_ptr(), x.numel(),
                                             self.timeout_s)
        _check(status, "all_reduce")
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """(size, *x.shape): every rank's contiguous CPU `x` (at most SLOT_BYTES), in rank order."""
        out = torch.empty((self.size, *x.shape), dtype=x.dtype)
        nbytes = x.numel() * x.element_size()
        if nbytes > SLOT_BYTES:
            raise ValueError(f"all_gather of {nbytes} bytes exceeds the {SLOT_BYTES}-byte slot")
        status = self.lib.shm_all_gather(self.base, self.rank, self.size, SLOT_BYTES, x.data_ptr(), nbytes,
                                         out.data_ptr(), self.timeout_s)
        _check(status, "all_gather")
        return out

    def sums(self, x: torch.Tensor) -> bool:
        """Whether `all_reduce` takes `x` (contiguous fp32 on CPU; any size: it runs in chunks)."""
        return x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous()

    def fits(self, x: torch.Tensor) -> bool:
        """Whether `x` can be exchanged here (CPU, contiguous, at most a slot)."""
        return x.device.type == "cpu" and x.is_contiguous() and x.numel() * x.element_size() <= SLOT_BYTES

    def close(self) -> None:
        """Unmap the segment (the file is already unlinked)."""
        del self._anchor  # mmap refuses to close while a ctypes view of it lives
        self.segment.close()


def _attempt(make, what: str):
    """(make(), None), or (None, why it failed)."""
    try:
        return make(), None
    except Exception as error:  # noqa: BLE001 - any failure leaves the group on gloo, logged
        return None, f"{socket.gethostname()}: could not {what} the segment: {error}"


def _check(status: int, what: str) -> None:
    if status == -1:
        raise CollectiveError(f"shared-memory {what}: a peer rank's process is gone")
    if status == -2:
        raise CollectiveError(f"shared-memory {what}: a peer rank stayed silent past the collective timeout")


def _process_visible(pid: int) -> bool:
    """Whether this process sees process `pid` (the wait tells a dead peer by its /proc entry, so a
    peer in another PID namespace, e.g. another container sharing /dev/shm, would look dead)."""
    return Path(f"/proc/{pid}").exists()


def _host_identity() -> str:
    """This host (and boot: a container on another machine with the same name differs)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _library(lib):
    """The kernel with its argument types declared."""
    if not getattr(lib, "_typed", False):
        i64, ptr, i32, f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_double
        lib.shm_segment_bytes.argtypes, lib.shm_segment_bytes.restype = [i32, i64], i64
        lib.shm_max_ranks.argtypes, lib.shm_max_ranks.restype = [], i32
        lib.shm_register.argtypes, lib.shm_register.restype = [ptr, i32, i64], None
        lib.shm_all_reduce_f32.argtypes = [ptr, i32, i32, i64, ptr, i64, f64]
        lib.shm_all_gather.argtypes = [ptr, i32, i32, i64, ptr, i64, ptr, f64]
        lib.shm_all_reduce_f32.restype = lib.shm_all_gather.restype = i32
        lib._typed = True
    return lib
