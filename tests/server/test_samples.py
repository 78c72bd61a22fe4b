"""n samples per request (sampling.n over gRPC, n over HTTP) and beam search (sampling.beam_width)
on the real Gemma 3 270M.

Batch-invariant mode makes each sample's numerics independent of what shares its steps, so sample
i of a seeded request equals a lone request seeded seed + i, bit for bit.
"""

from __future__ import annotations

import threading

import grpc
import openai
import pytest

from gemma_dist.client import Client
from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine
from gemma_dist.model import layers
from gemma_dist.runtime.local import LocalReplica
from gemma_dist.v1 import gemma_pb2
from tests.helpers import assert_same_beams
from tests.server.harness import running_gateway, wait_until

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def served(default_llm):
    layers.set_batch_invariant(True)
    replica = LocalReplica("r0", LLMEngine(default_llm.model, default_llm.tokenizer,
                                           EngineConfig(kv_cache_memory=64 << 20)))
    try:
        with running_gateway([replica], default_llm, http=True) as server:
            yield server, replica
    finally:
        layers.set_batch_invariant(False)


@pytest.fixture(scope="module")
def client(served):
    with Client(f"127.0.0.1:{served[0].port}", timeout=120) as c:
        yield c


def test_unary_samples_are_the_lone_requests_seeded_seed_plus_i(client):
    out = client.generate(PROMPT, temperature=1.0, max_tokens=8, seed=40, n=3, logprobs=1, ignore_eos=True)
    assert [s.index for s in out.samples] == [0, 1, 2]
    lone = [client.generate(PROMPT, temperature=1.0, max_tokens=8, seed=40 + i, ignore_eos=True) for i in range(3)]
    assert [list(s.token_ids) for s in out.samples] == [list(x.token_ids) for x in lone]
    assert [s.text for s in out.samples] == [x.text for x in lone]
    assert len({s.text for s in out.samples}) > 1
    assert (out.text, list(out.token_ids)) == (out.samples[0].text, list(out.samples[0].token_ids))
    assert all(len(s.logprobs) == 8 and s.finish_reason == gemma_pb2.FINISH_REASON_LENGTH for s in out.samples)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (lone[0].usage.prompt_tokens, 24)


def test_streamed_samples_carry_their_index_and_add_up(client):
    unary = client.generate(PROMPT, temperature=1.0, max_tokens=6, seed=7, n=2, ignore_eos=True)
    pieces: dict[int, list[int]] = {0: [], 1: []}
    finished = []
    for response in client.generate_stream(PROMPT, temperature=1.0, max_tokens=6, seed=7, n=2, ignore_eos=True):
        pieces[response.index] += response.token_ids
        if response.finish_reason:
            finished.append(response.index)
            assert response.usage.completion_tokens == 6
    assert sorted(finished) == [0, 1]
    assert [pieces[0], pieces[1]] == [list(s.token_ids) for s in unary.samples]


def test_bad_n_is_invalid_argument(client):
    for n in (0, 17):
        with pytest.raises(grpc.RpcError) as info:
            client.generate(PROMPT, max_tokens=1, n=n)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("sampling.n")


def test_abort_by_id_stops_every_sample(served, client):
    stream = client.generate_stream(PROMPT, temperature=1.0, max_tokens=400, n=2, ignore_eos=True,
                                    request_id="both")
    next(stream)
    assert client.abort(["both"]) == ["both"]
    ends = [r for r in stream if r.finish_reason]
    assert sorted(r.index for r in ends) == [0, 1]
    assert all(r.finish_reason == gemma_pb2.FINISH_REASON_ABORTED for r in ends)


def test_http_n_samples_match_grpc(served, client):
    oai = openai.OpenAI(base_url=f"http://127.0.0.1:{served[0].http_port}/v1", api_key="x", max_retries=0)
    via_grpc = client.generate(PROMPT, temperature=1.0, max_tokens=10, seed=5, n=3)
    out = oai.completions.create(model="default", prompt=PROMPT, max_tokens=10, temperature=1.0, n=3, seed=5)
    choices = sorted(out.choices, key=lambda c: c.index)
    assert [c.index for c in choices] == [0, 1, 2] and [c.text for c in choices] == [s.text for s in via_grpc.samples]
    assert out.usage.completion_tokens == via_grpc.usage.completion_tokens
    streamed: dict[int, str] = {}
    for chunk in oai.completions.create(model="default", prompt=PROMPT, max_tokens=10, temperature=1.0, n=3, seed=5,
                                        stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[i] for i in range(3)] == [c.text for c in choices]


def test_samples_share_the_prompt_blocks_and_free_everything(served, client):
    """n=4 on a prompt of several blocks: samples 1..3 start after sample 0's prefill, forked from
    it: its full blocks shared and its partial block copied (copy-on-write), so each computes only
    the prompt's last token (read from the replica's stats); every block is free at the end."""
    server, replica = served
    prompt = "A shared prompt for four samples. " + " ".join(f"word{i}" for i in range(50))
    before = replica.stats()
    out = client.generate(prompt, temperature=1.0, max_tokens=40, seed=3, n=4, ignore_eos=True)
    taken = out.usage.prompt_tokens - 1  # positions a fork does not compute: all but the last
    assert taken >= 48 and taken % 16 and len(out.samples) == 4  # (a partial block to copy)
    after = replica.stats()
    assert after.prefix_cache_hits - before.prefix_cache_hits == 3 * taken
    assert after.copied_pages - before.copied_pages == 3 * after.kv_groups  # a partial block per fork

    def idle():
        s = replica.stats()
        return s.running == 0 and s.waiting == 0 and s.free_blocks == s.total_blocks

    assert wait_until(idle), replica.stats()


# ------------------------------------------------------------------ beam search

BEAM_PROMPT = "The capital of France is"


def test_beam_search_returns_the_best_n_beams_as_llm_beam_search_does(default_llm, client):
    """Served beams equal LLM.beam_search on the same weights (batch-invariant numerics), best
    first, with their cumulative logprobs, in unary and streaming calls (tokens compared where
    the offline beams' scores are apart: logprobs may differ in the last bit with the batch)."""
    from gemma_dist import SamplingParams

    want = default_llm.beam_search([BEAM_PROMPT], SamplingParams(beam_width=3, max_tokens=10, logprobs=2), n=2)[0]
    out = client.generate(BEAM_PROMPT, beam_width=3, n=2, max_tokens=10, logprobs=2)
    assert [s.index for s in out.samples] == [0, 1]
    want_tokens = [w.token_ids for w in want.sequences]
    want_scores = [w.cumulative_logprob for w in want.sequences]
    assert_same_beams([list(s.token_ids) for s in out.samples], [s.cumulative_logprob for s in out.samples],
                      want_tokens, want_scores, abs_score=1e-5)
    same_tokens = [list(s.token_ids) == w for s, w in zip(out.samples, want_tokens)]
    assert [s.text for s, same in zip(out.samples, same_tokens) if same] == \
        [w.text for w, same in zip(want.sequences, same_tokens) if same]
    scores = [s.cumulative_logprob / len(s.token_ids) for s in out.samples]
    assert scores[0] >= scores[1]
    for sample in out.samples:  # per-token logprobs add up to the beam's
        assert len(sample.logprobs) == len(sample.token_ids)
        assert sum(lp.chosen.logprob for lp in sample.logprobs) == pytest.approx(sample.cumulative_logprob, abs=1e-4)
    assert (out.text, out.cumulative_logprob) == (out.samples[0].text, out.samples[0].cumulative_logprob)
    streamed = {r.index: r for r in client.generate_stream(BEAM_PROMPT, beam_width=3, n=2, max_tokens=10)}
    assert sorted(streamed) == [0, 1]
    assert_same_beams([list(streamed[i].token_ids) for i in (0, 1)],
                      [streamed[i].cumulative_logprob for i in (0, 1)], want_tokens, want_scores, abs_score=1e-5)
    assert all(streamed[i].finish_reason and streamed[i].HasField("cumulative_logprob") for i in (0, 1))


def test_http_beam_search_matches_grpc(served, client):
    """vLLM's use_beam_search (n beams, the n best) and our beam_width, over the OpenAI client."""
    oai = openai.OpenAI(base_url=f"http://127.0.0.1:{served[0].http_port}/v1", api_key="x", max_retries=0)
    via_grpc = client.generate(BEAM_PROMPT, beam_width=2, n=2, max_tokens=8)
    out = oai.completions.create(model="default", prompt=BEAM_PROMPT, max_tokens=8, n=2,
                                 extra_body={"use_beam_search": True})
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [s.text for s in via_grpc.samples]
    one = oai.completions.create(model="default", prompt=BEAM_PROMPT, max_tokens=8, extra_body={"beam_width": 2})
    assert [c.text for c in one.choices] == [via_grpc.samples[0].text]
    with pytest.raises(openai.BadRequestError, match="beam_width"):
        oai.completions.create(model="default", prompt=BEAM_PROMPT, max_tokens=8, extra_body={"beam_width": 20})


def test_beam_width_one_is_greedy(client):
    """Compared up to the greedy run's first near-tie (top-2 logprob gap, from the same server)."""
    greedy = client.generate(BEAM_PROMPT, temperature=0, max_tokens=16, logprobs=2)
    beam = client.generate(BEAM_PROMPT, beam_width=1, max_tokens=16)
    margins = [lp.top[0].logprob - lp.top[1].logprob for lp in greedy.logprobs]
    end = next((i for i, m in enumerate(margins) if m < 0.01), len(margins))
    assert end >= 8 and list(beam.token_ids)[:end] == list(greedy.token_ids)[:end]


def test_bad_beam_requests_are_invalid_argument_naming_the_field(client):
    for sampling, field in [(dict(beam_width=11), "sampling.beam_width"), (dict(beam_width=2, n=3), "sampling.n"),
                            (dict(beam_width=-1), "sampling.beam_width"),
                            (dict(beam_width=2, stop=["."]), "sampling.stop"),
                            (dict(beam_width=2, json_schema='{"type": "object"}'), "sampling.json_schema")]:
        with pytest.raises(grpc.RpcError) as info:
            client.generate(BEAM_PROMPT, max_tokens=4, **sampling)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith(field)


def test_abort_ends_a_beam_search_and_frees_its_blocks(served, client):
    server, replica = served
    ends, errors = [], []  # a beam search streams nothing before it ends: read its stream in a thread

    def read():
        try:
            ends.extend(client.generate_stream(BEAM_PROMPT, beam_width=4, n=2, max_tokens=400, ignore_eos=True,
                                               request_id="beams"))
        except grpc.RpcError as e:
            errors.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    assert wait_until(lambda: len(server.servicer._sample_ids.get("beams", ())) == 4, seconds=30)  # 4 live beams
    assert client.abort(["beams"]) == ["beams"]
    reader.join(timeout=60)
    assert not errors and not reader.is_alive()
    assert sorted(r.index for r in ends) == [0, 1]
    assert all(r.finish_reason == gemma_pb2.FINISH_REASON_ABORTED for r in ends)

    def idle():
        s = replica.stats()
        return s.running == 0 and s.waiting == 0 and s.free_blocks == s.total_blocks

    assert wait_until(idle), replica.stats()
