"""The gRPC gateway over real loopback gRPC, with two in-process replicas of the real Gemma 3 270M."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import grpc
import pytest

from gemma_dist.client import Client
from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine
from gemma_dist.runtime.local import LocalReplica
from gemma_dist.v1 import gemma_pb2
from tests.helpers import assert_greedy_agrees, stable_prefix
from tests.server.harness import running_gateway, wait_until

GOLDEN = {c["kind"]: c for c in json.loads(
    (Path(__file__).parent.parent / "data" / "gemma3_270m_greedy.json").read_text())["cases"]}


@pytest.fixture(scope="module")
def served(default_llm):
    config = EngineConfig(kv_cache_memory=256 << 20)
    replicas = [LocalReplica(f"replica-{i}", LLMEngine(default_llm.model, default_llm.tokenizer, config))
                for i in range(2)]
    with running_gateway(replicas, default_llm) as server:
        yield server, replicas


@pytest.fixture(scope="module")
def client(served):
    with Client(f"127.0.0.1:{served[0].port}", timeout=120) as c:
        yield c


def test_generate_matches_the_reference(client):
    case = GOLDEN["prose"]
    out = client.generate(case["prompt"], temperature=0, max_tokens=12, request_id="mine")
    assert out.request_id == "mine"
    assert list(out.token_ids) == stable_prefix(case)[:12] and len(stable_prefix(case)) >= 12
    assert out.finish_reason == gemma_pb2.FINISH_REASON_LENGTH
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(case["prompt_token_ids"]), 12)


def test_stream_concatenates_to_the_unary_result(client):
    case = GOLDEN["cjk"]
    unary = client.generate(case["prompt"], temperature=0, max_tokens=20)
    chunks = list(client.generate_stream(case["prompt"], temperature=0, max_tokens=20))
    assert len(chunks) > 1 and chunks[0].finish_reason == gemma_pb2.FINISH_REASON_UNSPECIFIED
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert chunks[-1].finish_reason == unary.finish_reason and chunks[-1].usage == unary.usage
    assert len({c.request_id for c in chunks}) == 1 and chunks[0].request_id


def test_token_ids_and_chat_inputs(client, default_llm):
    case = GOLDEN["code"]
    by_ids = client.generate(case["prompt_token_ids"], temperature=0, max_tokens=6)
    assert list(by_ids.token_ids) == stable_prefix(case)[:6] and len(stable_prefix(case)) >= 6
    chat = client.generate(chat=[{"role": "user", "content": "Hi"}], temperature=0, max_tokens=4)
    # The in-process reference, with its top-1 margins: served and in-process runs may sum in another
    # order, so they must agree up to the reference's first near-tie.
    expected = default_llm.chat([{"role": "user", "content": "Hi"}],
                                __import__("gemma_dist").SamplingParams(temperature=0, max_tokens=4, logprobs=2))[0]
    margins = [lp.top[0][1] - lp.top[1][1] for lp in expected.logprobs]
    assert assert_greedy_agrees(list(chat.token_ids), expected.token_ids, margins, what="chat") >= 1


def test_tokenize_and_model_info(client, default_llm):
    assert client.tokenize("Hello world", add_bos=True) == default_llm.tokenizer.encode("Hello world")
    info = client.model_info()
    assert (info.name, info.variant, info.vocab_size, info.tp, info.replicas_ready) == \
        ("default", "gemma-3-270m", 262144, 1, 2)


BAD_REQUESTS = [  # (request kwargs, expected status, the field the message must start with)
    (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (dict(), grpc.StatusCode.INVALID_ARGUMENT, "input"),
    (dict(prompt=[]), grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids.ids"),
    (dict(chat=[]), grpc.StatusCode.INVALID_ARGUMENT, "chat.messages"),
    (dict(prompt=[2, 999999]), grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids.ids[1]"),
    (dict(prompt=[2, -5]), grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids.ids[1]"),
    (dict(chat=[{"role": "bot", "content": "x"}]), grpc.StatusCode.INVALID_ARGUMENT, "chat.messages[0].role"),
    (dict(prompt=[2] * 32000, max_tokens=1000), grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids"),
    (dict(prompt="x", max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
    (dict(prompt="x", max_tokens=100000), grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
    (dict(prompt="x", temperature=-1), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    (dict(prompt="x", temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    (dict(prompt="x", temperature=float("inf")), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    (dict(prompt="x", top_p=0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    (dict(prompt="x", top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    (dict(prompt="x", top_k=-1), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_k"),
    (dict(prompt="x", min_p=-0.1), grpc.StatusCode.INVALID_ARGUMENT, "sampling.min_p"),
    (dict(prompt="x", min_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "sampling.min_p"),
    (dict(prompt="x", repetition_penalty=0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.repetition_penalty"),
    (dict(prompt="x", presence_penalty=2.5), grpc.StatusCode.INVALID_ARGUMENT, "sampling.presence_penalty"),
    (dict(prompt="x", frequency_penalty=-3), grpc.StatusCode.INVALID_ARGUMENT, "sampling.frequency_penalty"),
    (dict(prompt="x", stop=["s"] * 17), grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop"),
    (dict(prompt="x", stop=[""]), grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop"),
    (dict(prompt="x", stop=["s" * 257]), grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop"),
    (dict(prompt="x", logprobs=21), grpc.StatusCode.INVALID_ARGUMENT, "sampling.logprobs"),
    (dict(prompt="x", logprobs=-1), grpc.StatusCode.INVALID_ARGUMENT, "sampling.logprobs"),
    (dict(prompt="x", stop_token_ids=[10**7]), grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop_token_ids[0]"),
    (dict(prompt="x", request_id="r" * 129), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
    (dict(prompt="x", model="gemma-9000"), grpc.StatusCode.NOT_FOUND, "model"),
]


@pytest.mark.parametrize("kwargs, code, field", BAD_REQUESTS, ids=[f"{i}-{c[2]}" for i, c in enumerate(BAD_REQUESTS)])
def test_bad_requests_fail_with_the_field_named_and_the_server_keeps_serving(client, kwargs, code, field):
    with pytest.raises(grpc.RpcError) as info:
        client.generate(**kwargs)
    assert info.value.code() == code
    assert info.value.details().startswith(field)
    assert client.generate("Hi", temperature=0, max_tokens=1).usage.completion_tokens == 1


@contextlib.contextmanager
def routed(replicas):
    """The names of the replicas that get each request, in order, while in the block."""
    seen: list[str] = []
    original = [r.generate for r in replicas]

    def spy(replica, generate):
        def wrapped(*args, **kwargs):
            seen.append(replica.name)
            return generate(*args, **kwargs)
        return wrapped

    for replica, generate in zip(replicas, original):
        replica.generate = spy(replica, generate)
    try:
        yield seen
    finally:
        for replica, generate in zip(replicas, original):
            replica.generate = generate


def test_requests_spread_over_both_replicas(served, client):
    server, replicas = served
    with routed(replicas) as seen:
        # Different first words: no shared prefix for cache-aware routing to follow, so load decides.
        streams = [client.generate_stream(f"{word}: " + GOLDEN["digits"]["prompt"], temperature=0, max_tokens=8)
                   for word in ("One", "Two", "Three", "Four")]
        for stream in streams:
            assert sum(len(c.token_ids) for c in stream) == 8
    assert set(seen) == {"replica-0", "replica-1"}


def test_health_and_reflection(served):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{served[0].port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "gemma_dist.v1.GemmaService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10)
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert {"gemma_dist.v1.GemmaService", "grpc.health.v1.Health"} <= names


def test_invalid_utf8_from_a_raw_client_is_rejected_and_the_server_keeps_serving(served, client):
    raw = b"\x1a\x04ab\xff\xfe"  # field 3 (prompt), 4 bytes, not UTF-8
    with grpc.insecure_channel(f"127.0.0.1:{served[0].port}") as channel:
        call = channel.unary_unary("/gemma_dist.v1.GemmaService/Generate")
        with pytest.raises(grpc.RpcError) as info:
            call(raw, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in info.value.details()
    assert client.generate("Hi", temperature=0, max_tokens=1).usage.completion_tokens == 1


def test_a_shared_prefix_goes_where_it_is_cached_unless_that_replica_is_much_busier(served, client):
    """Prefix routing (the default): a prompt that starts like an earlier one follows it to its
    replica, which finds the prefix's K/V cached, although the other replica is idler."""
    server, replicas = served
    shared = "Routing test. " + " ".join(f"item{i}" for i in range(60))  # many full blocks
    with routed(replicas) as seen:
        client.generate(shared + " first", temperature=0, max_tokens=1)
        home = next(r for r in replicas if r.name == seen[-1])
        busy = client.generate_stream(shared + " and a long story", temperature=0, max_tokens=400, ignore_eos=True)
        next(busy)  # in flight now, on `home` (its prefix): home is the busier replica from here
        assert seen[-1] == home.name and home.load() == 1
        hits_before = home.stats().prefix_cache_hits
        out = client.generate(shared + " second", temperature=0, max_tokens=1)  # least-loaded would go elsewhere
        assert seen[-1] == home.name and out.usage.completion_tokens == 1
        assert home.stats().prefix_cache_hits - hits_before >= 3 * 16
        client.generate("Something else entirely, with nothing in common", temperature=0, max_tokens=1)
        assert seen[-1] != home.name  # no match anywhere: the least-loaded replica
        busy.cancel()


def test_abort_stops_a_request_in_flight_by_its_id(served, client):
    server, replicas = served
    stream = client.generate_stream("Tell me a long story about the sea", temperature=0, max_tokens=500,
                                    ignore_eos=True, request_id="abort-me")
    first = next(stream)
    assert first.request_id == "abort-me"
    assert client.abort(["abort-me", "no-such-request"]) == ["abort-me"]
    rest = list(stream)
    assert rest[-1].finish_reason == gemma_pb2.FINISH_REASON_ABORTED
    assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) < 500
    assert client.abort(["abort-me"]) == []  # done: nothing to stop

    def freed():  # its blocks are back (read from the replicas' stats)
        return all((s := r.stats()).running == 0 and s.free_blocks == s.total_blocks for r in replicas)

    assert wait_until(freed)
    with pytest.raises(grpc.RpcError) as info:
        client.abort([f"id-{i}" for i in range(1001)])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("request_ids")
    assert client.generate("Hi", temperature=0, max_tokens=1).usage.completion_tokens == 1
