"""Structured output through the served stack (real gRPC and HTTP on 127.0.0.1, the real Gemma 3
270M): JSON-schema, regex and choice constraints are token masks in the batched sampler, so a
constrained request's text always parses, and constrained and free requests share steps."""

from __future__ import annotations

import concurrent.futures
import json
import re

import grpc
import jsonschema
import openai
import pytest

from gemma_dist.client import Client
from tests.helpers import assert_greedy_agrees
from tests.server.harness import one_local_replica

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 16},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}}}


@pytest.fixture(scope="module")
def served(default_llm):
    with one_local_replica(default_llm, 128 << 20) as server:
        yield server


@pytest.fixture(scope="module")
def client(served):
    with Client(f"127.0.0.1:{served.port}", timeout=120) as c:
        yield c


def check_schema(value) -> None:
    jsonschema.validate(value, SCHEMA)


@pytest.mark.parametrize("temperature, seed", [(0, None), (1.0, 7), (1.0, 8)])
def test_json_schema_output_parses_and_follows_the_schema(client, temperature, seed):
    out = client.generate("Invent a person and describe them:", temperature=temperature, seed=seed, max_tokens=80,
                          json_schema=json.dumps(SCHEMA))
    check_schema(json.loads(out.text))
    assert out.finish_reason == 1  # STOP: the grammar completed and only <eos> was allowed


def test_regex_and_choice_constraints(client):
    date = client.generate("The day the war ended:", temperature=1.0, seed=3, max_tokens=16,
                           regex=r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d)")
    assert re.fullmatch(r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d)", date.text), date.text
    for seed in range(3):
        answer = client.generate("Is water wet?", temperature=1.0, seed=seed, max_tokens=8,
                                 choice=["yes", "no", "it depends"])
        assert answer.text in {"yes", "no", "it depends"}


def test_twenty_json_requests_batched_with_free_ones_all_validate(client):
    """20 constrained prompts (greedy and seeded) run together with two free greedy requests: every
    constrained text validates against the schema (jsonschema), and each free request returns what
    it returns alone (each row's mask is its own; up to its first near-tie, as batching may move
    last bits)."""
    free_prompts = ["The capital of France is", "def fibonacci(n):"]
    alone = [client.generate(p, temperature=0, max_tokens=12, logprobs=2) for p in free_prompts]
    topics = ["a pilot", "a baker", "a child", "a sailor", "a painter"]
    with concurrent.futures.ThreadPoolExecutor(22) as pool:
        constrained = [pool.submit(client.generate, f"Describe {topics[i % 5]} as JSON:", max_tokens=80,
                                   temperature=0 if i < 10 else 1.0, seed=i, json_schema=json.dumps(SCHEMA))
                       for i in range(20)]
        together = [pool.submit(client.generate, p, temperature=0, max_tokens=12, logprobs=2) for p in free_prompts]
        for future in constrained:
            out = future.result()
            check_schema(json.loads(out.text))
            assert out.finish_reason == 1
        for want, got in zip(alone, together):
            margins = [lp.top[0].logprob - lp.top[1].logprob for lp in want.logprobs]
            assert assert_greedy_agrees(list(got.result().token_ids), list(want.token_ids), margins) >= 4


@pytest.mark.parametrize("fields, field", [
    ({"json_schema": "{not json"}, "sampling.json_schema"),
    ({"json_schema": json.dumps({"type": "objectx"})}, "sampling.json_schema"),
    ({"regex": "(a"}, "sampling.regex"),
    ({"choice": ["a", ""]}, "sampling.choice"),
    ({"regex": "a", "choice": ["a"]}, "sampling.choice"),
])
def test_a_constraint_that_does_not_compile_is_invalid_argument_naming_it(client, fields, field):
    with pytest.raises(grpc.RpcError) as info:
        client.generate("Hello", max_tokens=4, **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field), info.value.details()
    assert client.generate("Hello", temperature=0, max_tokens=2).usage.completion_tokens == 2  # still serving


def test_openai_response_format_and_guided_fields(served):
    oai = openai.OpenAI(base_url=f"http://127.0.0.1:{served.http_port}/v1", api_key="none", max_retries=0,
                        timeout=120)
    out = oai.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Describe a person."}], max_tokens=80,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    check_schema(json.loads(out.choices[0].message.content))
    anything = oai.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Any JSON object, please."}], max_tokens=40,
        temperature=0, response_format={"type": "json_object"}).choices[0]
    if anything.finish_reason == "stop":
        assert isinstance(json.loads(anything.message.content), dict)
    else:  # an open object that ran to max_tokens: a prefix of one, with keys
        assert anything.finish_reason == "length" and anything.message.content.startswith('{"')
    picked = oai.completions.create(model="default", prompt="Pick a color:", max_tokens=4, temperature=0,
                                    extra_body={"guided_choice": ["red", "green"]})
    assert picked.choices[0].text in {"red", "green"}
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="default", prompt="x", max_tokens=4, extra_body={"guided_regex": "(x"})
    assert info.value.body["param"] == "guided_regex"
