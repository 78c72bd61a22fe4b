"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))` in one process.

A thin layer over `LLMEngine`: every prompt becomes a request, the engine's continuous batching
runs them together (decodes and prompt chunks in one forward per step), and the finished
outputs come back in input order.
"""

from __future__ import annotations

import dataclasses
import itertools
import numbers
from typing import Mapping, Sequence as Seq


from gemma_dist import beam_search as beams
from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine
from gemma_dist.model.layers import set_batch_invariant
from gemma_dist.sampling import SamplingParams, TokenLogprob

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


@dataclasses.dataclass
class BeamSequence:
    """One hypothesis of a beam search."""

    text: str  # generated text
    token_ids: list[int]  # generated token ids (an end token included, as in sampling)
    cumulative_logprob: float  # summed log-probabilities of token_ids
    finish_reason: str  # "stop" or "length"
    logprobs: list[TokenLogprob] | None  # per generated token, when params.logprobs > 0


@dataclasses.dataclass
class BeamSearchOutput:
    """The best hypotheses for one prompt, best first."""

    prompt: str | None  # the prompt text (None when token ids were given)
    prompt_token_ids: list[int]
    sequences: list[BeamSequence]


class LLM:
    """Load a Gemma checkpoint and generate for batches of prompts in this process."""

    def __init__(self, model: str = "default", dtype: str | None = None, variant: str | None = None,
                 device: str = "auto", kv_cache_memory: float = 2 * GiB, block_size: int = 16,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 64, seed: int | None = None,
                 batch_invariant: bool | None = None, max_model_len: int | None = None, tp: int | None = None,
                 prefix_caching: bool = True, kv_window_pool: bool = True, quantize: str | None = None):
        # dtype None: bfloat16 on cuda/xla, float32 on cpu. device "auto": cuda when available.
        # tp: devices to shard over with device="xla" (default: all of them).
        # batch_invariant: every sequence's numerics are bitwise independent of what shares its
        # step, also when it runs alone (costs ~40% of solo decode speed on CPU). Process-wide;
        # None leaves the current setting (off by default).
        # prefix_caching: prompts that start like an earlier one reuse its cached K/V blocks.
        # kv_window_pool: sliding-window layers (Gemma 2/3) keep only their window's K/V blocks.
        # quantize: "int8" runs the CPU model's linear layers and LM head in int8 blocks (not exact).
        if batch_invariant is not None:
            set_batch_invariant(batch_invariant)
        config = EngineConfig(block_size=block_size, kv_cache_memory=kv_cache_memory, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens, seed=seed,
                              max_model_len=max_model_len, prefix_caching=prefix_caching,
                              kv_window_pool=kv_window_pool, quantize=quantize)
        self.engine = LLMEngine.from_model(model, dtype, variant, device, config, tp=tp)
        self.config = self.engine.model_config
        self.tokenizer = self.engine.tokenizer
        self.model = self.engine.model
        self._ids = itertools.count()

    @property
    def max_cached_tokens(self) -> int:
        """How many tokens the KV cache holds across all requests."""
        return self.engine.stats().max_concurrent_tokens

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for each prompt (text, a list of token ids, or a vLLM-style dict: {"prompt": text}
        or {"prompt_token_ids": ids}); outputs keep the input order."""
        if isinstance(prompts, (str, Mapping)) or (len(prompts) and isinstance(prompts[0], numbers.Integral)) \
                or getattr(prompts, "ndim", None) == 1:
            prompts = [prompts]
        params = _per_prompt(sampling_params, len(prompts))
        return self._run([dict(prompt=_prompt_of(p)) for p in prompts], params)

    def chat(self, conversations: Conversation | Seq[Conversation],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate the model's reply to each conversation (Gemma chat template; stops at <end_of_turn>)."""
        if conversations and isinstance(conversations[0], Mapping):
            conversations = [conversations]
        params = _per_prompt(sampling_params, len(conversations))
        return self._run([dict(chat=c) for c in conversations], params)

    def beam_search(self, prompts: Prompt | Seq[Prompt], params: SamplingParams,
                    n: int | None = None) -> list[BeamSearchOutput]:
        """Beam search (params.beam_width, length_penalty, early_stopping, max_tokens, ignore_eos,
        stop_token_ids, logprobs) for each prompt, all prompts' beams batched together; the best
        n (default beam_width) hypotheses per prompt. Each step runs every live beam as a
        single-token request (gemma_dist.beam_search); prefix caching shares their blocks."""
        if not params.beam_search:
            raise ValueError("beam_width: LLM.beam_search needs beam_width >= 1")
        if isinstance(prompts, (str, Mapping)) or (len(prompts) and isinstance(prompts[0], numbers.Integral)):
            prompts = [prompts]
        prompts = [_prompt_of(p) for p in prompts]
        texts = [p if isinstance(p, str) else None for p in prompts]
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        eos = self.tokenizer.stop_token_ids(chat=False)
        searches = [beams.search_for(params, len(p), self.engine.max_model_len, eos, n or params.beam_width)
                    for p in ids]
        per_step = beams.step_params(params)
        while not all(search.done for search in searches):
            live = [(search, ids[i]) for i, search in enumerate(searches) if not search.done]
            inputs = [dict(prompt=prompt + list(beam.token_ids)) for search, prompt in live for beam in search.live]
            steps = iter(self._run(inputs, [per_step] * len(inputs)))
            for search, _ in live:
                search.advance([next(steps).logprobs[0].top for _ in search.live])
        return [BeamSearchOutput(text, prompt, [
            BeamSequence(self.tokenizer.decode(beam.token_ids), list(beam.token_ids), beam.cumulative_logprob,
                         beam.finish_reason, beams.token_logprobs(beam, params.logprobs) if params.logprobs else None)
            for beam in search.best()]) for text, prompt, search in zip(texts, ids, searches)]

    def _run(self, inputs: list[dict], params: list[SamplingParams]) -> list[RequestOutput]:
        ids = [f"offline-{next(self._ids)}" for _ in inputs]
        added = []
        try:
            for request_id, kwargs, sp in zip(ids, inputs, params):
                self.engine.add_request(request_id, params=sp, **kwargs)
                added.append(request_id)
            seqs = {r: self.engine._requests[r].seq for r in ids}
            while self.engine.has_unfinished_requests:
                self.engine.step()
        except BaseException:
            for request_id in added:  # leave the engine clean for the next call
                self.engine.abort(request_id)
            raise
        return [_output(seqs[r]) for r in ids]


def _output(seq) -> RequestOutput:
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


def _prompt_of(prompt: Prompt | Mapping) -> Prompt:
    """A prompt as text or token ids; a vLLM-style dict gives "prompt_token_ids" or "prompt"."""
    if not isinstance(prompt, Mapping):
        return prompt
    if "prompt_token_ids" in prompt:
        return list(prompt["prompt_token_ids"])
    if "prompt" in prompt:
        return prompt["prompt"]
    raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
