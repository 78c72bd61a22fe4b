"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))` in one process.

Requests are batched together: every step runs one forward over the decode tokens of the
running requests plus prompt chunks of newly admitted ones, over a paged KV cache.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Iterable, Mapping, Sequence as Seq

import torch

from gemma_dist.engine.block_manager import BlockManager
from gemma_dist.engine.model_runner import ModelRunner, StepInput, kv_bytes_per_token
from gemma_dist.engine.sequence import FinishReason, Sequence, find_stop_string, finish_on_token
from gemma_dist.model.layers import set_batch_invariant
from gemma_dist.model.loading import load_model, open_checkpoint
from gemma_dist.sampling import Sampler, SamplingParams, SamplingRow, TokenLogprob, make_generator
from gemma_dist.tokenizer import IncrementalDetokenizer

GiB = 1 << 30
Prompt = str | Seq[int]
Conversation = Seq[Mapping[str, str]]


@dataclasses.dataclass
class RequestOutput:
    """The finished generation for one prompt."""

    request_id: str
    prompt: str | None  # the prompt text (None when token ids were given)
    prompt_token_ids: list[int]
    text: str  # generated text (stop string excluded)
    token_ids: list[int]  # generated token ids
    finish_reason: str  # "stop" or "length"
    logprobs: list[TokenLogprob] | None  # per generated token, when params.logprobs > 0


class LLM:
    """Load a Gemma checkpoint and generate for batches of prompts in this process."""

    def __init__(self, model: str = "default", dtype: str = "float32", variant: str | None = None,
                 device: str = "cpu", kv_cache_memory: int = 2 * GiB, block_size: int = 16,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 64, seed: int | None = None,
                 batch_invariant: bool | None = None):
        # batch_invariant: every sequence's numerics are bitwise independent of what shares its
        # step, also when it runs alone (costs ~40% of solo decode speed on CPU). Process-wide;
        # None leaves the current setting (off by default).
        if batch_invariant is not None:
            set_batch_invariant(batch_invariant)
        checkpoint = open_checkpoint(model, variant)
        self.config = checkpoint.config
        self.tokenizer = checkpoint.load_tokenizer()
        self.model = load_model(checkpoint, dtype, device)
        checkpoint.source.close()
        self.dtype = next(self.model.parameters()).dtype
        num_blocks = max(1, kv_cache_memory // (kv_bytes_per_token(self.model, self.dtype) * block_size))
        self.runner = ModelRunner(self.model, num_blocks, block_size, Sampler(seed))
        self.blocks = BlockManager(num_blocks, block_size)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self._ids = itertools.count()

    @property
    def max_cached_tokens(self) -> int:
        """How many tokens the KV cache holds across all requests."""
        return self.blocks.num_blocks * self.blocks.block_size

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for each prompt (text, or a list of token ids); outputs keep the input order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = _per_prompt(sampling_params, len(prompts))
        seqs = [self._make_sequence(p, sp, chat=False) for p, sp in zip(prompts, params)]
        return self._run(seqs)

    def chat(self, conversations: Conversation | Seq[Conversation],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate the model's reply to each conversation (Gemma chat template; stops at <end_of_turn>)."""
        if conversations and isinstance(conversations[0], Mapping):
            conversations = [conversations]
        params = _per_prompt(sampling_params, len(conversations))
        seqs = [self._make_sequence(c, sp, chat=True) for c, sp in zip(conversations, params)]
        return self._run(seqs)

    # ------------------------------------------------------------------ internals

    def _make_sequence(self, prompt, params: SamplingParams, chat: bool) -> Sequence:
        text = None
        if chat:
            ids = self.tokenizer.encode_chat(prompt)
        elif isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
            if not ids:
                raise ValueError("prompt_token_ids must not be empty")
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"prompt_token_ids: id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        if len(ids) >= self.config.max_position_embeddings:
            raise ValueError(f"prompt has {len(ids)} tokens; the context holds {self.config.max_position_embeddings}")
        seq = Sequence(request_id=str(next(self._ids)), prompt_token_ids=ids, params=params,
                       eos_token_ids=self.tokenizer.stop_token_ids(chat=chat),
                       max_context=self.config.max_position_embeddings, prompt=text)
        if params.seed is not None:
            seq.generator = make_generator(params.seed)
        return seq

    def _reserve(self, seq: Sequence) -> int:
        """Positions to reserve at admission: the prompt plus every token it may generate."""
        return min(len(seq.prompt_token_ids) + seq.params.max_tokens, seq.max_context)

    def _run(self, seqs: list[Sequence]) -> list[RequestOutput]:
        for seq in seqs:
            if self.blocks.blocks_for(self._reserve(seq)) > self.blocks.num_blocks:
                raise ValueError(f"request needs {self._reserve(seq)} tokens of KV cache; "
                                 f"the cache holds {self.max_cached_tokens}")
        waiting = collections.deque(seqs)
        running: list[Sequence] = []
        detok = {seq.request_id: IncrementalDetokenizer(self.tokenizer) for seq in seqs}
        while waiting or running:
            while (waiting and len(running) < self.max_num_seqs
                   and self.blocks.can_grow([], self._reserve(waiting[0]))):
                seq = waiting.popleft()
                self.blocks.grow(seq.block_table, self._reserve(seq))
                running.append(seq)
            steps, stepped = self._plan(running)
            result = self.runner.execute(steps)
            sampled = [seq for seq, step in zip(stepped, steps) if step.sampling is not None]
            for seq, step in zip(stepped, steps):
                seq.num_cached += len(step.token_ids)
            for seq, token, logprob in zip(sampled, result.token_ids, result.logprobs):
                self._append(seq, token, logprob, detok[seq.request_id])
            for seq in [s for s in running if s.is_finished]:
                self.blocks.release(seq.block_table)
                running.remove(seq)
        return [self._output(seq) for seq in seqs]

    def _plan(self, running: list[Sequence]) -> tuple[list[StepInput], list[Sequence]]:
        """Decode tokens for every running request, then prompt chunks within the token budget."""
        steps, stepped = [], []
        budget = self.max_num_batched_tokens
        for seq in sorted(running, key=lambda s: s.in_prefill):
            if budget <= 0:
                break
            tokens = seq.uncached_token_ids()[:budget]
            completes = seq.num_cached + len(tokens) == seq.num_tokens
            row = SamplingRow(seq.params, seq.prompt_token_ids, seq.output_token_ids, seq.generator) \
                if completes else None
            steps.append(StepInput(tokens, seq.num_cached, seq.block_table, row))
            stepped.append(seq)
            budget -= len(tokens)
        return steps, stepped

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None,
                detok: IncrementalDetokenizer) -> None:
        seq.output_token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        reason = finish_on_token(seq, token)
        before = len(seq.text)
        seq.text += detok.push(token)  # special tokens (<eos>, <end_of_turn>) add no text
        if reason is not None:
            seq.text += detok.flush()
        at = find_stop_string(seq.text, before, seq.params.stop)
        if at is not None:
            seq.text, reason = seq.text[:at], FinishReason.STOP
        seq.finish_reason = reason

    def _output(self, seq: Sequence) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id, prompt=seq.prompt, prompt_token_ids=seq.prompt_token_ids,
            text=seq.text, token_ids=list(seq.output_token_ids), finish_reason=seq.finish_reason.value,
            logprobs=seq.logprobs if seq.params.logprobs else None)


def _per_prompt(params: SamplingParams | Seq[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"sampling_params has {len(params)} entries for {n} prompts")
    return params
