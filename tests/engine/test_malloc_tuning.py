"""A CPU runner's process keeps freed tensor memory for reuse (model_runner.tune_malloc_for_tensors)."""

import platform
import resource

import pytest
import torch

from gemma_dist.engine import model_runner

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


@glibc
def test_settings_are_in_force_once_per_process():
    assert model_runner.tune_malloc_for_tensors()
    assert model_runner.tune_malloc_for_tensors()  # a second call changes nothing and says the same


def test_opting_out_leaves_the_allocator_alone(monkeypatch):
    model_runner.tune_malloc_for_tensors.cache_clear()  # as in a fresh process
    monkeypatch.setenv("GEMMA_DIST_MALLOC_TUNING", "0")
    try:
        assert not model_runner.tune_malloc_for_tensors()
    finally:
        model_runner.tune_malloc_for_tensors.cache_clear()  # the next caller decides afresh


@glibc
def test_a_repeated_activation_reuses_its_pages():
    """An activation-sized block (16 MiB) allocated and freed step after step is served from the
    heap it left: no fresh pages once the heap holds it (glibc's defaults fault in all 4,096 pages
    again each step here, torch allocating it aligned)."""
    assert model_runner.tune_malloc_for_tensors()

    def step() -> None:
        torch.empty(4 << 20, dtype=torch.float32).fill_(1.0)  # touches every page, then frees

    step()
    step()  # the heap has grown to hold it
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 1024, f"{faults} page faults over 8 steps"
