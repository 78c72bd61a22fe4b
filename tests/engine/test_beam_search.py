"""LLM.beam_search on a tiny random Gemma 3 against transformers: its `generate(num_beams=...)`,
an exhaustive search over two tokens, and greedy decoding for beam_width 1.

Beams at near-ties (scores within a small margin) may come out in either order on another
machine's kernels, so token lists are compared only where the reference's scores are apart.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from gemma_dist import LLM, SamplingParams
from gemma_dist.model.loading.default_model import default_model_dir
from tests.helpers import assert_greedy_agrees, assert_same_beams, make_tiny_hf_checkpoint

SCORE_MARGIN = 1e-3  # beams whose reference scores are closer than this may swap places
EOS = 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(our LLM, the transformers model) over the same tiny Gemma 3 weights."""
    directory = tmp_path_factory.mktemp("beam-gemma3")
    reference = make_tiny_hf_checkpoint("gemma3", directory)
    shutil.copy(default_model_dir() / "tokenizer.model", directory / "tokenizer.model")
    llm = LLM(str(directory), dtype="float32", device="cpu", kv_cache_memory=32 << 20, block_size=4)
    return llm, reference


def prompts(count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(10, 500, (9,), generator=g).tolist() for _ in range(count)]


def reference_beams(model, prompt, width: int, n: int, max_tokens: int, length_penalty: float, early_stopping: bool,
                    end: int) -> tuple[list[list[int]], list[float]]:
    """transformers' best n beams (generated tokens up to the end token) and their scores."""
    out = model.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=n, max_new_tokens=max_tokens,
                         do_sample=False, length_penalty=length_penalty, early_stopping=early_stopping,
                         eos_token_id=[EOS, end], pad_token_id=0, top_k=None, top_p=None, temperature=None,
                         output_scores=True, return_dict_in_generate=True)
    beams = []
    for row in out.sequences[:, len(prompt):].tolist():
        stop = next((i + 1 for i, t in enumerate(row) if t in (EOS, end)), len(row))
        beams.append(row[:stop])
    return beams, out.sequences_scores.tolist()


@pytest.mark.parametrize("length_penalty, early_stopping", [(1.0, False), (-0.5, False), (2.0, True)])
def test_beams_equal_transformers_generate(tiny, length_penalty, early_stopping):
    """Same best beams and scores as transformers' beam search, with beams that end early: each
    prompt also runs with an end token that its beams reach (a stop id here, eos there)."""
    llm, reference = tiny
    ended = 0
    for prompt in prompts(2, seed=1):
        first = llm.beam_search([prompt], SamplingParams(beam_width=4, max_tokens=2), n=4)[0]
        for end in (first.sequences[0].token_ids[0], first.sequences[1].token_ids[1]):
            params = SamplingParams(beam_width=4, max_tokens=6, length_penalty=length_penalty,
                                    early_stopping=early_stopping, stop_token_ids=(end,))
            ours = llm.beam_search([prompt], params, n=3)[0]
            want_tokens, want_scores = reference_beams(reference, prompt, 4, 3, 6, length_penalty, early_stopping, end)
            assert_same_beams([seq.token_ids for seq in ours.sequences],
                              [seq.cumulative_logprob / len(seq.token_ids) ** length_penalty for seq in ours.sequences],
                              want_tokens, want_scores, SCORE_MARGIN)
            ended += sum(s.finish_reason == "stop" for s in ours.sequences)
    if length_penalty < 1:  # (with 1 or more the tiny model's long beams outscore the ended ones)
        assert ended > 0  # the end-token rules were exercised


def test_best_beam_equals_an_exhaustive_search_over_two_tokens(tiny):
    """Score every one of the 512 x 512 two-token continuations with transformers; a beam at least
    as wide as the rank of the best continuation's first token must find it (its second token is
    that beam's own best)."""
    llm, reference = tiny
    checked = 0
    for prompt in prompts(6, seed=7):
        with torch.no_grad():
            first = torch.log_softmax(reference(torch.tensor([prompt])).logits[0, -1].float(), -1)  # (V,)
            both = torch.tensor([prompt + [t] for t in range(first.numel())])
            second = torch.log_softmax(reference(both).logits[:, -1].float(), -1)  # (V, V)
        totals = first[:, None] + second  # (V, V): log p(t1) + log p(t2 | t1)
        top2 = totals.flatten().topk(2).values
        if top2[0] - top2[1] < SCORE_MARGIN:
            continue  # a near-tie: either answer is right
        t1, t2 = divmod(int(totals.flatten().argmax()), totals.shape[1])
        width = int((first > first[t1]).sum()) + 1  # the best first token's rank, from 1
        if width > 10:
            continue  # outside what beam_width allows
        params = SamplingParams(beam_width=max(width, 2), max_tokens=2, ignore_eos=True)
        best = llm.beam_search([prompt], params)[0].sequences[0]
        assert best.token_ids == [t1, t2]
        assert best.cumulative_logprob == pytest.approx(float(top2[0]), abs=1e-4)
        checked += 1
    assert checked >= 3


def test_width_one_equals_greedy(tiny):
    llm, reference = tiny
    batch = prompts(4, seed=3)
    greedy = llm.generate(batch, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1))
    beams = llm.beam_search(batch, SamplingParams(beam_width=1, max_tokens=12, ignore_eos=True))
    total = 0
    for prompt, want, got in zip(batch, greedy, beams):
        margins = _margins(reference, prompt, want.token_ids)
        compared = assert_greedy_agrees(got.sequences[0].token_ids, want.token_ids, margins, what=str(prompt))
        total += compared
        if compared == len(want.token_ids):
            want_total = sum(lp.logprob for lp in want.logprobs)
            assert got.sequences[0].cumulative_logprob == pytest.approx(want_total, abs=1e-3)
    assert total >= 24  # enough steps were away from near-ties


def _margins(model, prompt, continuation) -> list[float]:
    """transformers' top-1 margin (logit gap) at each step of a continuation."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + continuation])).logits[0, len(prompt) - 1:-1].float()
    top = logits.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()


def test_beam_search_leaves_the_engine_empty_and_rejects_beams_in_add_request(tiny):
    llm, _ = tiny
    llm.beam_search(prompts(3, seed=9), SamplingParams(beam_width=3, max_tokens=5), n=2)
    stats = llm.engine.stats()
    assert (stats.running, stats.waiting) == (0, 0) and stats.free_blocks == stats.total_blocks
    with pytest.raises(ValueError, match="^beam_width"):
        llm.engine.add_request("x", [2, 5, 6], SamplingParams(beam_width=2))
