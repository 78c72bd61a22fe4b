"""LLMEngine: requests in, per-step deltas out, over continuous batching and a paged KV cache.

    engine = LLMEngine.from_model("default")
    engine.add_request("r1", "Hello", SamplingParams(max_tokens=16))
    while engine.has_unfinished_requests:
        for delta in engine.step(): ...

A step is schedule → execute → postprocess: the scheduler plans it, the model runner runs one
forward over every planned token and samples, and each sampled token is appended, detokenized
and checked against the stop rules. `AsyncLLMEngine` runs the same loop in a background
thread and hands each request's deltas to an async iterator.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import dataclasses
import gc
import logging
import os
import queue
import threading
import time
from typing import AsyncIterator, Callable, Mapping, Sequence as Seq

import torch

from gemma_dist.config import KVLayout, default_dtype
from gemma_dist.engine.block_manager import BlockManager
from gemma_dist.engine.model_runner import ModelRunner, kv_bytes_per_token
from gemma_dist.engine.persistent_batch import PlanRunner
from gemma_dist.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from gemma_dist.engine.sequence import FinishReason, Sequence, find_stop_string, finish_on_token
from gemma_dist.engine.step_plan import NewRequest, SlotAllocator, StepPlan
from gemma_dist.model.layers import QUANTIZATIONS
from gemma_dist.sampling import Sampler, SampleResult, SamplingParams, TokenLogprob
from gemma_dist.structured import grammar_tokenizer
from gemma_dist.tokenizer import IncrementalDetokenizer

GiB = 1 << 30
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine limits and the KV-cache budget."""

    block_size: int = 16  # tokens per KV block
    kv_cache_memory: float = 2 * GiB  # bytes (> 1) or a fraction (0, 1] of the device's memory
    max_num_seqs: int = 64  # sequences per step
    max_num_batched_tokens: int = 2048  # new tokens per step (chunked prefill budget)
    seed: int | None = None  # seed of the shared generator used by unseeded requests
    max_model_len: int | None = None  # longest prompt + output per request (None: the model's context)
    prepack_weights: bool = True  # fp32 CPU weights also kept prepacked for oneDNN (faster; ~2x weight memory)
    prefix_caching: bool = True  # reuse the K/V of full blocks of prompts seen before (block_manager)
    kv_window_pool: bool = True  # sliding-window layers keep only their window's KV blocks (config.KVLayout)
    quantize: str | None = None  # "int8": CPU weights and activations in int8 blocks (layers.Int8Blocks); None: exact

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if not self.kv_cache_memory > 0:
            raise ValueError(f"kv_cache_memory must be > 0 (bytes, or a fraction <= 1), got {self.kv_cache_memory}")
        SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens)  # validates the limits
        if self.quantize not in (None, *QUANTIZATIONS):
            raise ValueError(f"quantize must be one of {QUANTIZATIONS} or None, got {self.quantize!r}")


def resolve_device(device: str) -> str:
    """"auto" → "cuda" when a GPU is visible, else "cpu"; other names pass through."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda", "xla") and not device.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu, cuda or xla; got {device!r}")
    return device


def kv_cache_bytes(budget: float, device: torch.device) -> int:
    """Bytes for the KV cache: `budget` bytes, or that fraction of the device's total memory."""
    if budget > 1:
        return int(budget)
    return int(device_memory(device) * budget)


def device_memory(device: torch.device) -> int:
    """Total memory of `device`: the GPU's; every XLA device's together where the backend reports
    it (TPU); host memory otherwise (CPU, XLA:CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "xla":
        import torch_xla.core.xla_model as xm
        import torch_xla.runtime as xr

        try:
            return xm.get_memory_info(device)["bytes_limit"] * xr.global_runtime_device_count()
        except Exception:  # noqa: BLE001 - backends without memory stats (XLA:CPU) raise various errors
            pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def freeze_startup_objects() -> None:
    """Take every object alive now (modules, model, tokenizer: ~200,000 of them) out of the cyclic
    garbage collector's walks. Without this, each full collection (every few hundred steps at 256
    streams) scans them all: measured host time per step 3.6 ms, frozen 2.3 ms. They are unfrozen
    at exit, so the interpreter's shutdown still collects them (extension modules such as Triton's
    report objects left uncollected as leaks)."""
    global _unfreeze_registered
    gc.collect()
    gc.freeze()
    if not _unfreeze_registered:
        atexit.register(gc.unfreeze)
        _unfreeze_registered = True


_unfreeze_registered = False


def tune_gc_for_serving() -> None:
    """For processes that only serve (gateway, coordinator, shard workers): freeze what start-up
    made and collect the young generation every 20,000 allocations instead of 700; a step at 256
    streams allocates thousands of short-lived objects (measured host time per step 1.9 ms)."""
    freeze_startup_objects()
    gc.set_threshold(20_000, 50, 100)


@dataclasses.dataclass
class RequestDelta:
    """What one request gained in one step."""

    request_id: str
    token_ids: list[int]  # new token ids
    text: str  # new text (never a broken UTF-8 character; held back while it may start a stop string)
    finish_reason: FinishReason | None  # set on the request's last delta
    logprobs: list[TokenLogprob]  # for the new tokens, when requested
    prompt_tokens: int
    completion_tokens: int  # generated so far
    queue_seconds: float | None = None  # on a request's first delta: arrival → first scheduled
    cumulative_logprob: float | None = None  # a beam-search result's summed token logprobs


@dataclasses.dataclass
class EngineStats:
    """Counters for monitoring and tests."""

    waiting: int
    running: int
    free_blocks: int  # KV pages no request holds (a page: one block of positions of one layer group)
    total_blocks: int  # KV pages in the cache (kv_groups per block of positions for every layer)
    block_size: int
    preemptions: int
    times: dict[str, float] = dataclasses.field(default_factory=dict)  # cumulative seconds per step phase
    steps: int = 0  # steps run so far
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (cumulative)
    prefix_cache_hits: int = 0  # of those, tokens whose K/V were found cached, not computed (cumulative)
    cached_blocks: int = 0  # blocks registered in the prefix cache now (owned or reusable)
    kv_groups: int = 1  # layer groups of the KV layout: pages per block of positions (config.KVLayout)
    global_pages_used: int = 0  # pages held now by full-attention layers' block tables
    local_pages_used: int = 0  # pages held now by sliding-window layers' tables (their windows only)
    copied_pages: int = 0  # KV pages copied for samples forked from a running one (cumulative)
    max_num_seqs: int = 0  # the scheduler's limit of sequences in a step (how many may run at once)

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Share of looked-up prompt tokens found cached so far (0 before any lookup)."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def max_concurrent_tokens(self) -> int:
        """Tokens the KV cache holds across all requests at short contexts (longer ones hold more:
        sliding-window layers keep only their window)."""
        return self.total_blocks // self.kv_groups * self.block_size


@dataclasses.dataclass
class EngineTimes:
    """Cumulative host seconds per phase of the engine's steps (the overhead benchmark and the
    /metrics step-phase counters read these)."""

    steps: int = 0
    schedule: float = 0.0  # the scheduler's plan, and turning it into a StepPlan
    execute: float = 0.0  # handing the step to the runner and waiting for its tokens
    prepare: float = 0.0  # of `execute`, the runner applying the plan and building tensors (as it reports)
    forward: float = 0.0  # of `execute`, the runner's model forward up to the final hidden states
    sample: float = 0.0  # of `execute`, the runner's LM head and token choice
    postprocess: float = 0.0  # appending tokens, stop checks, detokenizing, building deltas

    idle: float = 0.0  # the runner waiting for its next plan between steps (what an accelerator would idle)
    _last_end: float | None = None  # when the runner finished the previous step (its clock)

    def add_runner(self, result: SampleResult) -> None:
        """Count one step's runner times (as the runner reports them) and its idle gap before it."""
        prepare, forward, sample = result.runner_times
        self.prepare += prepare
        self.forward += forward
        self.sample += sample
        self.steps += 1
        began, ended = result.runner_span
        if self._last_end is not None and began:
            self.idle += max(0.0, began - self._last_end)
        self._last_end = ended or None

    def went_idle(self) -> None:
        """No request is left: the gap before the next step is not counted as idle."""
        self._last_end = None

    def as_dict(self) -> dict[str, float]:
        """Phase → seconds. transport = execute minus the runner's own time: serializing, sending,
        waiting for the slowest rank (0 in process; it can hide behind work the engine overlaps)."""
        runner = self.prepare + self.forward + self.sample
        return {"schedule": self.schedule, "prepare": self.prepare, "forward": self.forward, "sample": self.sample,
                "postprocess": self.postprocess, "transport": max(0.0, self.execute - runner), "idle": self.idle}


@dataclasses.dataclass
class _InFlight:
    """A step handed to the runner, not yet postprocessed."""

    sampled: list[Sequence]  # the sequences whose rows sample, in result order
    result: object  # the runner's future (`.result()`) or a finished SampleResult
    deltas: list  # deltas already known (expired requests)


class _Request:
    """Engine-side state of one request beyond its Sequence: detokenizer and emitted text."""

    def __init__(self, seq: Sequence, detokenizer: IncrementalDetokenizer):
        self.seq = seq
        self.detokenizer = detokenizer
        self.arrival = time.monotonic()
        self.queue_seconds: float | None = None  # arrival → first scheduled, once known
        self.emitted_text = 0  # chars of seq.text already handed out
        self.emitted_tokens = 0
        self.hold_back = max((len(s) for s in seq.params.stop), default=1) - 1


class LLMEngine:
    """One process: scheduler + model runner + tokenizer. Not thread-safe (see AsyncLLMEngine)."""

    def __init__(self, model, tokenizer, config: EngineConfig = EngineConfig()):
        """An engine over a model in this process (its own KV cache, sized by the config's budget)."""
        param = next(model.parameters())
        per_block = kv_bytes_per_token(model, param.dtype) * config.block_size
        num_blocks = kv_cache_bytes(config.kv_cache_memory, param.device) // per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory {config.kv_cache_memory} holds no block of {per_block} bytes")
        # Gemma 3 4b+ embeddings have more rows (262,208) than the tokenizer has pieces: never sample those.
        runner = ModelRunner(model, num_blocks, config.block_size, Sampler(config.seed),
                             vocab_limit=min(tokenizer.vocab_size, model.config.vocab_size),
                             max_model_len=config.max_model_len, prepack=config.prepack_weights,
                             window_pool=config.kv_window_pool, quantize=config.quantize)
        self._setup(model.config, tokenizer, config, runner, num_blocks)
        self.model = model

    @classmethod
    def with_runner(cls, model_config, tokenizer, config: EngineConfig, runner, num_blocks: int) -> "LLMEngine":
        """An engine whose steps run elsewhere: `runner.execute_plan(StepPlan) -> SampleResult`
        (e.g. on tensor-parallel shard workers that own `num_blocks` KV blocks each), or a model
        runner taking `StepInput`s (`execute(steps)`), which then gets a persistent batch here."""
        engine = cls.__new__(cls)
        engine._setup(model_config, tokenizer, config, runner, num_blocks)
        engine.model = None
        return engine

    def _setup(self, model_config, tokenizer, config: EngineConfig, runner, num_blocks: int) -> None:
        # The runner executes StepPlans: a remote one directly, a model runner through a
        # persistent batch kept here. `self.runner` stays the model runner (tests, tools).
        self.executor = runner if hasattr(runner, "execute_plan") else PlanRunner(
            runner, grammar_tokenizer=lambda: grammar_tokenizer(tokenizer, model_config.vocab_size))
        self.times = EngineTimes()
        self._slots = SlotAllocator()
        self._freed_slots: list[int] = []  # slots of finished requests, removed in the next plan
        self.tokenizer = tokenizer
        self.config = config
        self.model_config = model_config
        self.max_model_len = min(config.max_model_len or model_config.max_position_embeddings,
                                 model_config.max_position_embeddings)
        layout = KVLayout.of(model_config, config.kv_window_pool)
        groups = getattr(runner, "kv_groups", layout.num_groups)
        if groups != layout.num_groups:
            raise ValueError(f"the runner's KV cache has {groups} layer groups, the engine's layout "
                             f"{layout.num_groups} (kv_window_pool must match)")
        # num_blocks blocks of positions for every layer = num_blocks x G pages of one group each.
        self.blocks = BlockManager(num_blocks * layout.num_groups, config.block_size, caching=config.prefix_caching,
                                   group_local=layout.group_local, sliding_window=layout.sliding_window)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), self.blocks)
        self.runner = runner
        self._requests: dict[str, _Request] = {}
        self._deadlines: dict[str, float] = {}  # request id → deadline (time.time()), for requests that have one
        self._expired: list[RequestDelta] = []  # final deltas of expired requests, not yet returned
        freeze_startup_objects()

    @classmethod
    def from_model(cls, model: str = "default", dtype: str | None = None, variant: str | None = None,
                   device: str = "cpu", config: EngineConfig = EngineConfig(), tp: int | None = None) -> "LLMEngine":
        """Load a checkpoint ("default", HF dir, .gguf, .ckpt) and build an engine on it.

        device: "cpu", "cuda", "auto" (cuda when available) or "xla" (torch_xla SPMD over `tp`
        devices, default all; compiles every bucketed shape before returning). dtype None picks
        the device's default (bfloat16 on cuda/xla, float32 on cpu)."""
        from gemma_dist.model.loading import load_model, open_checkpoint

        device = resolve_device(device)
        dtype = dtype or default_dtype(device)
        checkpoint = open_checkpoint(model, variant)
        try:
            tokenizer = checkpoint.load_tokenizer()
            if device == "xla":
                return cls.on_xla(checkpoint, tokenizer, dtype, tp, config)
            loaded = load_model(checkpoint, dtype, device)
        finally:
            checkpoint.source.close()
        return cls(loaded, tokenizer, config)

    @classmethod
    def on_xla(cls, checkpoint, tokenizer, dtype: str, tp: int | None, config: EngineConfig,
               warm_up: bool = True) -> "LLMEngine":
        """An engine whose steps run on XLA devices: `checkpoint` sharded over `tp` of them by
        torch_xla SPMD (default: `xla_runner.default_tp`), every bucketed shape compiled first."""
        from gemma_dist.engine.xla_runner import XlaModelRunner

        runner = XlaModelRunner.from_checkpoint(checkpoint, dtype, tp, config, tokenizer.vocab_size, warm_up)
        engine = cls.with_runner(checkpoint.config, tokenizer, config, runner, runner.num_blocks)
        engine.model = runner.model
        return engine

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt: str | Seq[int] | None = None,
                    params: SamplingParams | None = None, *, chat: Seq[Mapping[str, str]] | None = None,
                    deadline: float | None = None, prompt_text: str | None = None,
                    chat_template: bool = False, fork_of: str | None = None) -> None:
        """Queue a request: a text prompt (BOS added), a list of token ids, or a chat. A request
        still unfinished at `deadline` (time.time()) is aborted; if still waiting, never prefilled.

        Token ids that a caller already made from text (the gateway tokenizes once) may bring
        that text as `prompt_text`, and `chat_template=True` when they are a rendered chat, so
        <end_of_turn> stops the request as it would for `chat=`. `fork_of` names another sample of
        the same prompt (n samples): while that one runs, this one starts from its K/V (shared full
        blocks, a copy of the partial one) instead of computing the prompt."""
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = params or SamplingParams()
        if params.beam_search:
            raise ValueError("beam_width: beam search runs in LLM.beam_search or the gateway, which drive the "
                             "engine with one single-token request per beam")
        text, ids = self._prompt_ids(prompt, chat)
        is_chat = chat is not None or chat_template
        seq = Sequence(request_id=request_id, prompt_token_ids=ids, params=params,
                       eos_token_ids=self.tokenizer.stop_token_ids(chat=is_chat),
                       max_context=self.max_model_len, prompt=text if text is not None else prompt_text)
        parent = self._requests.get(fork_of) if fork_of is not None else None
        if parent is not None and parent.seq.prompt_token_ids == ids and not parent.seq.is_finished:
            seq.fork_of = parent.seq
        self.scheduler.add(seq)
        self._requests[request_id] = _Request(seq, IncrementalDetokenizer(self.tokenizer))
        if deadline is not None:
            self._deadlines[request_id] = deadline

    def _prompt_ids(self, prompt, chat) -> tuple[str | None, list[int]]:
        if (prompt is None) == (chat is None):
            raise ValueError("give exactly one of prompt or chat")
        if chat is not None:
            ids, text = self.tokenizer.encode_chat(chat), None
        elif isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            ids, text = self.tokenizer.encode(prompt), prompt
        else:
            ids, text = [int(t) for t in prompt], None
            if not ids:
                raise ValueError("prompt_token_ids must not be empty")
            vocab = self.model_config.vocab_size
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"prompt_token_ids: id {bad} is outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the context holds {self.max_model_len}")
        return text, ids

    def abort(self, request_id: str) -> RequestDelta | None:
        """Stop a request now and free its blocks; returns its final (aborted) delta."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        self._forget(request_id)
        self.scheduler.abort(request_id, request.seq)
        self._free_slot(request.seq)
        return RequestDelta(request_id, [], "", FinishReason.ABORTED, [], len(request.seq.prompt_token_ids),
                            len(request.seq.output_token_ids))

    @property
    def has_unfinished_requests(self) -> bool:
        """True while any request waits or runs."""
        return self.scheduler.has_unfinished

    def stats(self) -> EngineStats:
        """Current counters."""
        blocks = self.blocks
        return EngineStats(len(self.scheduler.waiting), len(self.scheduler.running), blocks.num_free,
                           blocks.num_blocks, blocks.block_size, self.scheduler.num_preemptions,
                           self.times.as_dict(), self.times.steps, self.scheduler.prefix_queried_tokens,
                           self.scheduler.prefix_hit_tokens, blocks.num_cached, blocks.num_groups,
                           blocks.owned_global, blocks.owned_local, self.scheduler.num_copied_pages,
                           self.scheduler.config.max_num_seqs)

    # ------------------------------------------------------------------ the step

    def step(self) -> list[RequestDelta]:
        """Run one step: schedule → execute → postprocess. Returns the deltas of this step."""
        in_flight = self.launch()
        if in_flight is None:
            return self._take_expired()
        return self.complete(in_flight)

    # A step in two halves, so a driver can overlap them (AsyncLLMEngine): `launch` plans a step
    # and hands it to the runner; `complete` waits for its tokens and postprocesses them. A driver
    # may launch step N+1 before completing step N (its sampled tokens are pending meanwhile).
    # Runners run plans in order, so blocks freed while a step is in flight are only reused by
    # steps that run after it, and a sequence that finishes meanwhile just has its later tokens
    # dropped.

    def launch(self) -> _InFlight | None:
        """Plan the next step and start it on the runner; None when nothing is scheduled.

        The plan counts as done at once (async scheduling): its tokens are marked cached and its
        sampled tokens pending, so the next step can be planned before this one's tokens are
        known. The runners append the tokens they sample themselves."""
        start = time.perf_counter()
        self._expired.extend(self._abort_expired())
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return None
        now = time.monotonic()
        sampled = []
        for item in plan.scheduled:
            if item.seq.slot is None:  # its first step (or its first since a preemption)
                request = self._requests[item.seq.request_id]
                if request.queue_seconds is None:
                    request.queue_seconds = now - request.arrival
            if item.samples:
                sampled.append(item.seq)
        step_plan = self._step_plan(plan)
        self.scheduler.on_step_done(plan)
        for seq in sampled:
            seq.pending_tokens += 1
        submit = getattr(self.executor, "submit", None)
        launched = time.perf_counter()
        self.times.schedule += launched - start
        result = submit(step_plan) if submit is not None else self.executor.execute_plan(step_plan)
        self.times.execute += time.perf_counter() - launched
        return _InFlight(sampled, result, self._take_expired())

    def complete(self, in_flight: _InFlight) -> list[RequestDelta]:
        """Wait for a launched step's tokens and postprocess them; the step's deltas."""
        return self.finish_text(self.finish_tokens(in_flight))

    def finish_tokens(self, in_flight: _InFlight) -> tuple[list, list[RequestDelta]]:
        """Wait for the step's tokens, append them and apply the token stop rules (eos, stop ids,
        max_tokens); frees what finished. The text work is left to `finish_text`."""
        start = time.perf_counter()
        result = in_flight.result
        if not isinstance(result, SampleResult):
            result = result.result()
        waited = time.perf_counter()
        self.times.execute += waited - start
        self.times.add_runner(result)
        appended = []
        for seq, token, logprob in zip(in_flight.sampled, result.token_ids, result.logprobs):
            seq.pending_tokens -= 1
            if seq.finish_reason is not None:  # stopped (stop string, abort, earlier token) meanwhile: dropped
                continue
            seq.output_token_ids.append(token)
            if logprob is not None:
                seq.logprobs.append(logprob)
            reason = finish_on_token(seq, token)
            if reason is not None:
                seq.finish_reason = reason
                self._release(seq)
            appended.append(seq)
        self._note_if_idle()
        self.times.postprocess += time.perf_counter() - waited
        return appended, in_flight.deltas

    def finish_text(self, finished_tokens: tuple[list, list[RequestDelta]]) -> list[RequestDelta]:
        """Detokenize the appended tokens, check stop strings, and build the step's deltas."""
        start = time.perf_counter()
        appended, deltas = finished_tokens
        deltas = list(deltas)
        for seq in appended:
            request = self._requests.get(seq.request_id)
            if request is None:  # aborted meanwhile: its final delta is already out
                continue
            try:
                deltas.append(self._postprocess(request))
            except Exception:  # one request's failure (e.g. detokenizing) must not stall the rest
                log.exception("request %s failed in postprocessing; aborting it", seq.request_id)
                seq.finish_reason = FinishReason.ABORTED
                deltas.append(RequestDelta(seq.request_id, [], "", FinishReason.ABORTED, [],
                                           len(seq.prompt_token_ids), len(seq.output_token_ids)))
            if seq.is_finished:
                self._forget(seq.request_id)
                self._release(seq)
        self._note_if_idle()
        self.times.postprocess += time.perf_counter() - start
        return deltas

    def _release(self, seq: Sequence) -> None:
        """Free a sequence that just finished, wherever it is: running, or waiting to resume (it
        was preempted while the step that finished it ran); nothing if it is already released.
        Only the step's finished sequences are visited, never the whole running set."""
        self.scheduler.release(seq)
        self._free_slot(seq)

    def _note_if_idle(self) -> None:
        if not self.scheduler.has_unfinished:
            self.times.went_idle()  # the runner's wait for new requests is not host overhead

    def _take_expired(self) -> list[RequestDelta]:
        expired, self._expired = self._expired, []
        return expired

    def _abort_expired(self) -> list[RequestDelta]:
        """Abort requests past their deadline (waiting ones are never prefilled)."""
        if not self._deadlines:
            return []
        now = time.time()
        late = [rid for rid, deadline in self._deadlines.items() if deadline <= now]
        return [delta for delta in map(self.abort, late) if delta is not None]

    def _forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self._deadlines.pop(request_id, None)

    def _free_slot(self, seq: Sequence) -> None:
        """The runners drop seq's persistent-batch row with the next plan."""
        if seq.slot is not None:
            self._freed_slots.append(seq.slot)
            seq.slot = None

    def _step_plan(self, plan: SchedulerOutput) -> StepPlan:
        """The scheduler's plan as changes to the runners' persistent batch (see step_plan)."""
        step = StepPlan(removed=self._freed_slots, copies=plan.copies)
        for slot in self._freed_slots:  # removed before added: a freed slot may be reused at once
            self._slots.give_back(slot)
        self._freed_slots = []
        for seq in plan.preempted:
            seq.synced_blocks = 0
            if seq.slot is not None:
                step.reset.append(seq.slot)
        for item in plan.scheduled:
            seq = item.seq
            if seq.slot is None:  # its first step: the runners learn its tokens (sampled ones they add)
                seq.slot = self._slots.take()
                step.added.append(NewRequest(seq.slot, seq.request_id, seq.prompt_token_ids,
                                             list(seq.output_token_ids), seq.params))
                seq.synced_blocks = 0
            if len(seq.block_table) > seq.synced_blocks:
                step.block_updates.append((seq.slot, seq.synced_blocks, seq.block_table[seq.synced_blocks:]))
                seq.synced_blocks = len(seq.block_table)
            step.slots.append(seq.slot)
            step.num_cached.append(seq.num_cached)
            step.num_tokens.append(item.num_tokens)
            step.samples.append(item.samples)
        return step

    def _postprocess(self, request: _Request) -> RequestDelta:
        """Text of the tokens appended since the last delta; stop strings; the delta."""
        seq = request.seq
        reason = seq.finish_reason
        outputs = seq.output_token_ids
        emitted = request.emitted_tokens
        new_tokens = outputs[emitted:]
        checked = len(seq.text)
        push = request.detokenizer.push
        added = push(new_tokens[0]) if len(new_tokens) == 1 else "".join(map(push, new_tokens))
        if reason is not None:
            added += request.detokenizer.flush()
        if added:
            seq.text += added
        if seq.params.stop:
            at = find_stop_string(seq.text, checked, seq.params.stop)
            if at is not None:
                seq.text, reason = seq.text[:at], FinishReason.STOP
                seq.finish_reason = reason
        # Hold back text that might be the start of a stop string until it is decided.
        end = len(seq.text)
        safe = end if reason is not None else max(request.emitted_text, end - request.hold_back)
        text = seq.text[request.emitted_text: safe] if safe > request.emitted_text else ""
        request.emitted_text = safe
        new_logprobs = seq.logprobs[emitted:] if seq.params.logprobs else []
        request.emitted_tokens = len(outputs)
        return RequestDelta(seq.request_id, new_tokens, text, reason, new_logprobs,
                            len(seq.prompt_token_ids), len(outputs), request.queue_seconds if not emitted else None)


class EngineStoppedError(RuntimeError):
    """The async engine was shut down, or its step loop failed."""


@dataclasses.dataclass(eq=False)
class _Stream:
    """Where one request's deltas go: `sink(item)`, called on the consumer's event loop."""

    loop: asyncio.AbstractEventLoop
    sink: Callable[[object], None]


def _run_sinks(items: list[tuple[_Stream, object]]) -> None:
    """On a consumer's event loop: hand every item of one step to its stream."""
    for stream, item in items:
        stream.sink(item)


class AsyncLLMEngine:
    """Runs an LLMEngine's step loop in a background thread; each request is an async iterator.

    The event loop never waits for a step: adds and aborts are commands the engine thread
    applies between steps, and stats are a snapshot taken after each step. Torch releases
    the GIL inside its kernels, so the event loop stays responsive while a step runs. Closing
    a request's iterator early (client gone) aborts the request. A step's deltas reach each
    consumer event loop in one hand-off, not one per request.

    With a runner that can `submit` a step and return before it finishes (remote shard
    workers), the loop schedules asynchronously: step N+1 is planned and sent while step N runs
    (its sampled tokens pending, see LLMEngine.launch), so the workers never wait for the
    coordinator's scheduling, postprocessing or the round trip between them.
    """

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}  # touched by the engine thread only
        self._outgoing: list[tuple[_Stream, object]] = []  # this step's items, delivered together
        self._stats = engine.stats()
        self._failure: BaseException | None = None
        self._stopped = False
        # Steps in flight at once: 2 with a runner that queues submitted steps (remote workers), so
        # it finds its next plan waiting when a step ends; 1 in process (launch runs the step).
        self._depth = 2 if hasattr(engine.executor, "submit") else 1
        self._thread = threading.Thread(target=self._run, name="gemma-engine", daemon=True)
        self._thread.start()

    async def generate(self, request_id: str, prompt: str | Seq[int] | None = None,
                       params: SamplingParams | None = None, *, chat: Seq[Mapping[str, str]] | None = None,
                       deadline: float | None = None, **inputs) -> AsyncIterator[RequestDelta]:
        """Add a request and yield its deltas as the engine produces them.

        Bad input (an empty prompt, an id in use, ...) raises ValueError on the first iteration.
        `inputs`: further keyword arguments of LLMEngine.add_request (prompt_text, chat_template).
        """
        deltas: asyncio.Queue = asyncio.Queue()
        stream = self.submit(request_id, deltas.put_nowait, prompt=prompt, params=params, chat=chat,
                             deadline=deadline, **inputs)
        finished = False
        try:
            while True:
                delta = await deltas.get()
                if isinstance(delta, BaseException):
                    finished = True
                    raise delta
                finished = delta.finish_reason is not None
                yield delta
                if finished:
                    return
        finally:
            if not finished:  # the consumer left early: stop generating for it
                self._send(("abort", request_id, stream))

    def submit(self, request_id: str, sink: Callable[[object], None], **inputs) -> _Stream:
        """Add a request whose deltas go to `sink`, called on the current event loop: each
        RequestDelta, ending with the one that has a finish_reason, or an exception (ValueError
        for bad input, EngineStoppedError) as the last item. `inputs`: LLMEngine.add_request's
        keyword arguments. Returns the stream's handle."""
        if self._stopped or self._failure is not None:
            raise EngineStoppedError("the engine is shut down") from self._failure
        stream = _Stream(asyncio.get_running_loop(), sink)
        self._send(("add", request_id, stream, inputs))
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; its iterator ends with an ABORTED delta."""
        self._send(("abort", request_id, None))

    def stats(self) -> EngineStats:
        """The engine's counters as of the end of the last step."""
        return self._stats

    def shutdown(self) -> None:
        """Stop the step loop; open iterators end with EngineStoppedError."""
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=60)

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wakeup.set()

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        engine = self.engine
        in_flight: collections.deque = collections.deque()
        try:
            while not self._stopped:
                self._apply_commands()
                while len(in_flight) < self._depth:  # keep the runner's queue full (async scheduling)
                    step = engine.launch()
                    if step is None:
                        break
                    in_flight.append(step)
                if not in_flight:
                    self._queue_deltas(engine._take_expired())
                    self._flush()
                    # Idle, or (briefly) nothing schedulable yet: sleep until a command or a moment passes.
                    self._wakeup.wait(0.001 if engine.has_unfinished_requests else 0.05)
                    self._wakeup.clear()
                    continue
                self._queue_deltas(engine.complete(in_flight.popleft()))  # with requests that expired at its launch
                self._stats = engine.stats()  # before delivery: a consumer may look at once
                self._flush()
        except BaseException as error:  # a failed step fails every open stream, loudly
            self._failure = error
            log.error("engine step loop failed: %r", error)
        finally:
            reason = EngineStoppedError("the engine is shut down" if self._failure is None
                                        else f"the engine step loop failed: {self._failure!r}")
            for request_id in list(self._streams):
                engine.abort(request_id)
            self._stats = engine.stats()
            self._outgoing = []
            for request_id in list(self._streams):
                self._deliver(request_id, reason, final=True)
            self._flush()

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            kind, request_id, stream = command[:3]
            if kind == "add":
                try:
                    self.engine.add_request(request_id, **command[3])
                except ValueError as error:
                    self._outgoing.append((stream, error))
                    continue
                self._streams[request_id] = stream
            elif stream is None or self._streams.get(request_id) is stream:  # never a newer namesake
                final = self.engine.abort(request_id)
                self._stats = self.engine.stats()
                if final is not None:
                    self._deliver(request_id, final, final=True)

    def _queue_deltas(self, deltas: list[RequestDelta]) -> None:
        for delta in deltas:
            self._deliver(delta.request_id, delta, final=delta.finish_reason is not None)

    def _deliver(self, request_id: str, item, final: bool) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        if final:
            del self._streams[request_id]
        self._outgoing.append((stream, item))

    def _flush(self) -> None:
        """Hand this step's items to their event loops: one call per loop."""
        if not self._outgoing:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, object]]] = {}
        for stream, item in self._outgoing:
            by_loop.setdefault(stream.loop, []).append((stream, item))
        self._outgoing = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_run_sinks, items)
            except RuntimeError:  # the consumer's loop was closed: nobody is listening any more
                for stream, _ in items:
                    for request_id in [r for r, s in self._streams.items() if s is stream]:
                        del self._streams[request_id]
                        self.engine.abort(request_id)
