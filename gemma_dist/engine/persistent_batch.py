"""The runner side of a step plan: a persistent batch updated in place, and the step's tensors.

Every runner of a replica (the in-process engine's, or each tensor-parallel shard worker) keeps
one `PersistentBatch`: per slot, a request's prompt and output tokens (for the penalties and for
prompt chunks), its sampling parameters and, where it samples, its seeded generator; and one
(slots, blocks) tensor of block tables. A `StepPlan` changes only what moved (see
gemma_dist.engine.step_plan), and `prepare` builds the step's inputs with vectorized ops over
that tensor, so the host work of a step grows with its rows, not with their context length.
With a sliding-window pool (G layer groups) a table entry is a page per group: the tensor is
(G, slots, blocks), and a LOCAL group's entries the window left are never read again.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from gemma_dist.engine.step_plan import StepPlan
from gemma_dist.model.attention import AttentionMetadata, copy_pages, metadata_from_tables, positions_of, table_rows
from gemma_dist.sampling import SampleResult, SamplingParams, SamplingRow, make_generator


class _Row:
    """One request's state in the batch."""

    __slots__ = ("request_id", "prompt", "output", "params", "generator", "constraint", "num_blocks")

    def __init__(self, request_id: str, prompt: list[int], output: list[int], params: SamplingParams,
                 generator: torch.Generator | None, constraint=None):
        self.request_id = request_id
        self.prompt = prompt  # prompt token ids
        self.output = output  # generated token ids; the runner appends each token it samples
        self.params = params
        self.generator = generator  # seeded requests, on a runner that samples
        self.constraint = constraint  # structured output (structured.Constraint), on a runner that samples
        self.num_blocks = 0  # valid entries of its block-table row

    def sampling_row(self) -> SamplingRow:
        """This request's sampling state for a step."""
        return SamplingRow(self.params, self.prompt, self.output, self.generator, self.constraint)

    def token_at(self, position: int) -> int:
        """The token at `position` of prompt + output."""
        prompt = len(self.prompt)
        return self.prompt[position] if position < prompt else self.output[position - prompt]

    def tokens(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output."""
        prompt = len(self.prompt)
        if start >= prompt:
            return self.output[start - prompt: stop - prompt]
        if stop <= prompt:
            return self.prompt[start:stop]
        return self.prompt[start:] + self.output[: stop - prompt]


@dataclasses.dataclass
class PreparedStep:
    """A step's model inputs, built from the persistent batch."""

    input_ids: torch.Tensor  # (T,) int64 on the runner's device
    host_input_ids: torch.Tensor  # the same on the host (CUDA-graph decode copies from here, no sync)
    positions: torch.Tensor  # (T,) int64
    meta: AttentionMetadata
    sampling: list[SamplingRow]  # one per sampling row, in row order
    sample_rows: list[int]  # which rows sample (indices into the plan's rows)
    num_cached: list[int]  # per row (CUDA-graph decode reads these)
    tables: torch.Tensor  # (G, B, W) int64 CPU block tables (page ids per layer group) of the step's rows


@dataclasses.dataclass
class StepTimes:
    """Seconds a runner spent on one step per phase (reported to the engine with its tokens)."""

    prepare: float = 0.0  # applying the plan and building the step's tensors
    forward: float = 0.0  # the model up to its final hidden states (the LM head counts under sample)
    sample: float = 0.0  # the LM head and picking tokens (rank 0), with the vocab-parallel exchange at tp > 1
    # (a captured CUDA graph runs the LM head inside it: forward there)


class PersistentBatch:
    """Requests in flight on one runner, numbered by slot; updated in place by StepPlans."""

    def __init__(self, block_size: int, samples: bool = True, groups: int = 1, grammar_tokenizer=None):
        """samples: this runner picks tokens (rank 0, or in-process), so seeded requests get
        their generator here, and constrained ones their grammar state, created once and kept
        across preemptions. groups: layer groups of the KV layout (page ids per table entry).
        grammar_tokenizer: () -> llguidance tokenizer, for structured output (None: no constraints)."""
        self.block_size = block_size
        self.samples = samples
        self.groups = groups
        self.grammar_tokenizer = grammar_tokenizer
        self.rows: list[_Row | None] = []
        self.tables = torch.zeros((groups, 16, 16), dtype=torch.int64)  # (G, capacity, width); grows by doubling

    def apply(self, plan: StepPlan) -> None:
        """Bring the batch up to date with the plan's changes."""
        for slot in plan.removed:
            self.rows[slot] = None
        for new in plan.added:
            self._ensure_rows(new.slot + 1)
            generator = make_generator(new.params.seed) if self.samples and new.params.seed is not None else None
            self.rows[new.slot] = _Row(new.request_id, list(new.prompt_token_ids), list(new.output_token_ids),
                                       new.params, generator, self._constraint(new))
        for slot in plan.reset:
            self.rows[slot].num_blocks = 0
        if plan.block_updates:
            self._write_blocks(plan.block_updates)

    def _constraint(self, new):
        """The grammar state of a constrained request, on a runner that samples (else None)."""
        if not (self.samples and new.params.constrained):
            return None
        if self.grammar_tokenizer is None:
            raise ValueError(f"request {new.request_id}: this runner has no tokenizer for structured output")
        from gemma_dist.structured import Constraint

        return Constraint(new.params.grammar, self.grammar_tokenizer(), new.output_token_ids)

    def append_sampled(self, plan: StepPlan, token_ids: list[int]) -> None:
        """Append each sampling row's new token to its output (in the plan's row order)."""
        rows, tokens = self.rows, iter(token_ids)
        for slot, samples in zip(plan.slots, plan.samples):
            if samples:
                rows[slot].output.append(next(tokens))

    def _write_blocks(self, updates: list[tuple[int, int, list]]) -> None:
        """Append entries (a page per group, or a block id: attention.table_rows) to table rows
        with one scatter."""
        flat_rows, flat_cols, values = [], [], []
        widest = 0
        for slot, index, blocks in updates:
            end = index + len(blocks)
            flat_rows.extend([slot] * len(blocks))
            flat_cols.extend(range(index, end))
            values.extend(blocks)
            self.rows[slot].num_blocks = end
            widest = max(widest, end)
        self._ensure_width(widest)
        pages = torch.tensor(table_rows(values, self.groups), dtype=torch.int64)  # (G, n)
        self.tables[:, flat_rows, flat_cols] = pages

    def _ensure_rows(self, count: int) -> None:
        if len(self.rows) < count:
            self.rows.extend([None] * (count - len(self.rows)))
        groups, capacity, width = self.tables.shape
        if capacity < count:
            grown = torch.zeros((groups, max(count, 2 * capacity), width), dtype=torch.int64)
            grown[:, :capacity] = self.tables
            self.tables = grown

    def _ensure_width(self, width: int) -> None:
        groups, capacity, known = self.tables.shape
        if known < width:
            grown = torch.zeros((groups, capacity, max(width, 2 * known)), dtype=torch.int64)
            grown[:, :, :known] = self.tables
            self.tables = grown

    def prepare(self, plan: StepPlan, device: torch.device, use_kernel: bool = False,
                sliding_window: int | None = None) -> PreparedStep:
        """The step's tensors: token ids, positions, attention metadata, sampling rows."""
        bs = self.block_size
        rows = [self.rows[slot] for slot in plan.slots]
        ids: list[int] = []
        width = 1
        for row, cached, n in zip(rows, plan.num_cached, plan.num_tokens):
            if row.num_blocks * bs < cached + n:
                raise ValueError(f"request {row.request_id}: its block table covers {row.num_blocks * bs} "
                                 f"positions, the step needs {cached + n}")
            if n == 1:
                ids.append(row.token_at(cached))
            else:
                ids.extend(row.tokens(cached, cached + n))
            width = max(width, (cached + n - 1) // bs + 1)
        slots = torch.tensor(plan.slots, dtype=torch.int64)
        tables = self.tables[:, :, :width].index_select(1, slots)  # (G, B, W)
        positions = positions_of(plan.num_tokens, plan.num_cached)  # (T,) on the host
        meta = metadata_from_tables(plan.num_tokens, plan.num_cached, tables, bs, sliding_window, device, use_kernel,
                                    positions)
        sample_rows = [i for i, s in enumerate(plan.samples) if s]
        sampling = [rows[i].sampling_row() for i in sample_rows]
        host_ids = torch.tensor(ids, dtype=torch.int64)
        return PreparedStep(host_ids.to(device), host_ids, positions.to(device), meta, sampling, sample_rows,
                            list(plan.num_cached), tables)

    def step_inputs(self, plan: StepPlan) -> list:
        """The step as full `StepInput`s (for runners without a persistent-batch path: XLA).
        Builds every row's whole block table: cost grows with context length."""
        from gemma_dist.engine.model_runner import StepInput

        inputs = []
        for slot, cached, n, samples in zip(plan.slots, plan.num_cached, plan.num_tokens, plan.samples):
            row = self.rows[slot]
            sampling = row.sampling_row() if samples else None
            table = [tuple(entry) for entry in self.tables[:, slot, : row.num_blocks].t().tolist()]
            inputs.append(StepInput(row.tokens(cached, cached + n), cached, table, sampling, row.request_id))
        return inputs


class PlanRunner:
    """Runs StepPlans: applies each to a PersistentBatch, then executes it on a model runner
    (`ModelRunner`'s vectorized path, or any runner taking `StepInput`s, e.g. XLA's)."""

    def __init__(self, runner, samples: bool = True, grammar_tokenizer=None):
        """samples: this runner returns tokens (False on tensor-parallel ranks other than 0).
        grammar_tokenizer: () -> llguidance tokenizer, for structured output (PersistentBatch)."""
        self.runner = runner
        self.samples = samples
        self.batch = PersistentBatch(runner.block_size, samples, getattr(runner, "kv_groups", 1), grammar_tokenizer)

    def execute_plan(self, plan: StepPlan) -> SampleResult | None:
        """Apply the plan and run its rows; tokens for its sampling rows (None where this
        runner does not sample), with the phase times and wall-clock span of the step. Every
        runner appends the sampled tokens to its rows (rank 0 shares them at tp > 1), so the
        engine can plan the next step before it knows them."""
        began, start = time.time(), time.perf_counter()
        self.batch.apply(plan)
        if plan.copies:
            copy_pages(self.runner.kv_cache, plan.copies)
        if not plan.slots:
            return SampleResult([], []) if self.samples else None
        step = StepTimes()
        execute_prepared = getattr(self.runner, "execute_prepared", None)
        if execute_prepared is None:
            steps = self.batch.step_inputs(plan)
            step.prepare = time.perf_counter() - start
            result = self.runner.execute(steps, sample=True)  # single-process runners (XLA) always sample
            step.forward = time.perf_counter() - start - step.prepare  # forward and sampling together
        else:
            prepared = self.runner.prepare(self.batch, plan)
            step.prepare = time.perf_counter() - start
            result = execute_prepared(prepared, sample=self.samples, times=step)
        self.batch.append_sampled(plan, result.token_ids)
        if not self.samples:
            return None
        result.runner_times = (step.prepare, step.forward, step.sample)
        result.runner_span = (began, time.time())
        return result
