"""The OpenAI-compatible HTTP front, driven by the official `openai` client and raw HTTP over
loopback, on two in-process replicas of the real Gemma 3 270M."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from gemma_dist.client import Client
from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine
from gemma_dist.runtime.local import LocalReplica
from tests.server.harness import running_gateway, wait_until
from tests.server.test_metrics import scrape

PROMPT = "The three primary colors are"
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def served(default_llm):
    config = EngineConfig(kv_cache_memory=128 << 20)
    replicas = [LocalReplica(f"replica-{i}", LLMEngine(default_llm.model, default_llm.tokenizer, config))
                for i in range(2)]
    with running_gateway(replicas, default_llm, http=True, http_token=TOKEN, max_queued_requests=64) as server:
        yield server, replicas


@pytest.fixture(scope="module")
def oai(served):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served[0].http_port}/v1", api_key=TOKEN, max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def grpc_client(served):
    with Client(f"127.0.0.1:{served[0].port}", timeout=120) as client:
        yield client


def http(served, method: str, path: str, body=None, token: str | None = TOKEN) -> tuple[int, dict | str]:
    """(status, parsed JSON body or raw text) of one raw HTTP call."""
    data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{served[0].http_port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, raw = response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read().decode()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def test_completion_equals_the_grpc_result(oai, grpc_client):
    expected = grpc_client.generate(PROMPT, temperature=0, max_tokens=8)
    out = oai.completions.create(model="default", prompt=PROMPT, max_tokens=8, temperature=0)
    assert out.object == "text_completion" and out.model == "default" and len(out.choices) == 1
    assert out.choices[0].text == expected.text and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (expected.usage.prompt_tokens, 8)
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8
    by_ids = oai.completions.create(model="default", prompt=grpc_client.tokenize(PROMPT, add_bos=True), max_tokens=8,
                                    temperature=0)
    assert by_ids.choices[0].text == expected.text


def test_streamed_completion_concatenates_to_the_whole_and_ends_with_done(served, oai):
    whole = oai.completions.create(model="default", prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(oai.completions.create(model="default", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert len(chunks) > 2 and "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    # The raw stream: server-sent events, the last one [DONE].
    status, raw = http(served, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "stream": True})
    events = [line for line in raw.split("\n\n") if line]
    assert status == 200 and events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_chat_completion_uses_the_chat_template(oai, grpc_client):
    messages = [{"role": "user", "content": "Name one primary color. Answer in one word."}]
    expected = grpc_client.generate(chat=messages, temperature=0, max_tokens=6)
    out = oai.chat.completions.create(model="default", messages=messages, max_completion_tokens=6, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected.text
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name one primary color. "},
                                          {"type": "text", "text": "Answer in one word."}]}]
    assert oai.chat.completions.create(model="default", messages=parts, max_tokens=6,
                                       temperature=0).choices[0].message.content == expected.text
    stream = list(oai.chat.completions.create(model="default", messages=messages, max_tokens=6, temperature=0,
                                              stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected.text


def test_stop_strings_and_seeds_behave_as_over_grpc(oai, grpc_client):
    expected = grpc_client.generate(PROMPT, temperature=0, max_tokens=16, stop=[","])
    out = oai.completions.create(model="default", prompt=PROMPT, max_tokens=16, temperature=0, stop=",")
    assert out.choices[0].text == expected.text and "," not in out.choices[0].text
    assert out.choices[0].finish_reason == ("stop" if expected.finish_reason == 1 else "length")
    seeded = dict(model="default", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=123)
    assert oai.completions.create(**seeded).choices[0].text == grpc_client.generate(
        PROMPT, temperature=1.0, max_tokens=8, seed=123).text


def test_logprobs_match_the_grpc_ones(oai, grpc_client):
    expected = grpc_client.generate(PROMPT, temperature=0, max_tokens=4, logprobs=3)
    chat = oai.completions.create(model="default", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3)
    lp = chat.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([x.chosen.logprob for x in expected.logprobs])
    assert all(len(top) == 3 for top in lp.top_logprobs) and len(lp.tokens) == 4
    messages = [{"role": "user", "content": "Say hi"}]
    out = oai.chat.completions.create(model="default", messages=messages, max_tokens=3, temperature=0, logprobs=True,
                                      top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


@pytest.mark.parametrize("body, param", [
    ({"prompt": PROMPT, "top_p": 9.0}, "top_p"),
    ({"prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [PROMPT, PROMPT]}, "prompt"),
    ({"prompt": [1, 2, 10**9]}, "prompt[2]"),
    ({"prompt": PROMPT, "n": 99}, "n"),
    ({"prompt": PROMPT, "stop": 3}, "stop"),
    ({"prompt": PROMPT, "response_format": {"type": "xml"}}, "response_format"),
    ({"prompt": PROMPT, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 3}}}},
     "response_format"),
    ({"prompt": PROMPT, "response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ({"prompt": PROMPT, "guided_regex": "[a-"}, "guided_regex"),
    ({"prompt": PROMPT, "guided_choice": []}, "guided_choice"),
    ({"prompt": PROMPT, "guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
    ({"prompt": PROMPT, "echo": True}, "echo"),
    ({"prompt": "x", "max_tokens": 40000}, "max_tokens"),
    ({"prompt": "x", "ignore_eos": "yes"}, "ignore_eos"),
    ({"prompt": "x", "top_k": 2.5}, "top_k"),
])
def test_bad_fields_are_400_naming_the_field(served, body, param):
    status, reply = http(served, "POST", "/v1/completions", body)
    assert status == 400, reply
    assert reply["error"]["param"] == param and reply["error"]["message"].startswith(param)
    assert reply["error"]["type"] == "invalid_request_error"


def test_chat_errors_and_bad_json(served):
    status, reply = http(served, "POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]})
    assert status == 400 and reply["error"]["param"] == "messages[0].role"
    status, reply = http(served, "POST", "/v1/chat/completions", {"messages": []})
    assert status == 400 and reply["error"]["param"] == "messages"
    status, reply = http(served, "POST", "/v1/completions", b"{not json")
    assert status == 400 and reply["error"]["param"] == "body"


def test_unknown_model_is_404_and_a_wrong_token_401(served, oai):
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=1)
    status, reply = http(served, "POST", "/v1/completions", {"prompt": PROMPT}, token="wrong")
    assert status == 401 and reply["error"]["type"] == "authentication_error"
    status, _ = http(served, "GET", "/v1/models", token=None)
    assert status == 401
    status, reply = http(served, "GET", "/health", token=None)  # health stays open
    assert status == 200 and reply["status"] == "ok"


def test_models_lists_the_served_model(oai, default_llm):
    models = oai.models.list().data
    assert [m.id for m in models] == ["default"]


def test_no_ready_replica_is_503_and_a_full_queue_429(served, default_llm, oai):
    server, replicas = served
    for replica in replicas:
        replica.draining = True
    try:
        with pytest.raises(openai.InternalServerError) as info:
            oai.completions.create(model="default", prompt=PROMPT, max_tokens=1)
        assert info.value.status_code == 503
        status, reply = http(served, "GET", "/health", token=None)
        assert status == 503
    finally:
        for replica in replicas:
            replica.draining = False
    servicer = server.servicer
    limit, servicer.max_queued_requests = servicer.max_queued_requests, 0
    try:
        with pytest.raises(openai.RateLimitError):
            oai.completions.create(model="default", prompt=PROMPT, max_tokens=1)
    finally:
        servicer.max_queued_requests = limit


def test_http_calls_are_counted_in_the_metrics(served, oai):
    port = served[0].servicer.metrics.serve("127.0.0.1", 0)
    before = scrape(port)
    oai.completions.create(model="default", prompt=PROMPT, max_tokens=2, temperature=0)
    http(served, "POST", "/v1/completions", {"prompt": PROMPT, "top_p": 9.0})
    key_ok = ("gemma_requests_total", (("code", "OK"), ("method", "CreateCompletion")))
    key_bad = ("gemma_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "CreateCompletion")))

    def counted():  # a call is counted when its handler ends, just after the client got its answer
        m = scrape(port)
        return m if m.get(key_bad, 0) > before.get(key_bad, 0) and m.get(key_ok, 0) > before.get(key_ok, 0) else None

    after = wait_until(counted) or scrape(port)
    assert after[key_ok] - before.get(key_ok, 0) == 1
    assert after[key_bad] - before.get(key_bad, 0) == 1


def test_a_client_that_goes_away_frees_its_requests(served):
    """A non-streamed call whose client disconnects is aborted in its replica (within a poll)."""
    import socket

    server, replicas = served
    body = json.dumps({"prompt": "Write a very long essay about rivers.", "max_tokens": 2000, "temperature": 0,
                       "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        assert wait_until(lambda: sum(r.stats().running for r in replicas) == 1, seconds=60)
    # The connection is closed: the request must leave its replica long before 2,000 tokens.
    assert wait_until(lambda: sum(r.stats().running + r.stats().waiting for r in replicas) == 0, seconds=30)
