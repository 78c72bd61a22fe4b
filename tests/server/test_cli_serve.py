"""`gemma-dist serve` as users run it: start, answer the CLI over loopback, drain on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.helpers import free_port


def serve_process(port: int, *flags: str, **popen) -> subprocess.Popen:
    """`gemma-dist serve --port PORT *flags` in a subprocess, its output on a pipe (see wait_listening)."""
    return subprocess.Popen([sys.executable, "-m", "gemma_dist.cli", "serve", "--port", str(port), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, **popen)


def wait_listening(server: subprocess.Popen, port: int, timeout: float = 120) -> None:
    """Read the server's output until it says it listens on `port` (or `timeout` seconds pass)."""
    deadline = time.time() + timeout
    for line in server.stdout:
        if f"on 127.0.0.1:{port}" in line or time.time() > deadline:
            break


def test_serve_generate_and_drain_on_sigterm():
    port, http_port = free_port(), free_port()
    server = serve_process(port, "--metrics-port", str(free_port()), "--http-port", str(http_port))
    try:
        wait_listening(server, port)
        cli = [sys.executable, "-m", "gemma_dist.cli", "generate", "--target", f"127.0.0.1:{port}",
               "--temperature", "0", "--max-tokens", "8"]
        unary = subprocess.run(cli + ["The three primary colors are"], capture_output=True, text=True, timeout=120)
        streamed = subprocess.run(cli + ["--stream", "The three primary colors are"], capture_output=True,
                                  text=True, timeout=120)
        assert unary.returncode == 0 and streamed.returncode == 0, unary.stderr + streamed.stderr
        assert unary.stdout == streamed.stdout and "red" in unary.stdout
        bad = subprocess.run(cli + ["--top-p", "3", "x"], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 1 and "INVALID_ARGUMENT: sampling.top_p" in bad.stderr
        # The OpenAI-compatible HTTP front of the same server gives the same greedy text.
        import openai
        oai = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0)
        completion = oai.completions.create(model="default", prompt="The three primary colors are", max_tokens=8,
                                            temperature=0)
        assert completion.choices[0].text in unary.stdout and completion.usage.completion_tokens == 8
        # SIGTERM drains: a stream in flight still completes, then the server exits cleanly.
        from gemma_dist.client import Client
        with Client(f"127.0.0.1:{port}", timeout=120) as client:
            stream = client.generate_stream("Once upon a time", temperature=0, max_tokens=30, ignore_eos=True)
            got = len(next(stream).token_ids)
            server.send_signal(signal.SIGTERM)
            got += sum(len(c.token_ids) for c in stream)
        assert got == 30
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()


def test_sigterm_to_the_whole_process_group_exits_0_at_once():
    """systemd's default stop and `kill -TERM -PGID` also reach the local Ray cluster that serve
    started: the gateway must not wait 60 s for a dead GCS and exit 1. A stream in flight ends
    (its replica died with the group), and the server exits 0 well inside the drain window."""
    import grpc

    from gemma_dist.client import Client

    port = free_port()
    server = serve_process(port, "--metrics-port", "0", "--http-port", "0", start_new_session=True)
    try:
        wait_listening(server, port)
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            stream = client.generate_stream("Once upon a time", temperature=0, max_tokens=200, ignore_eos=True)
            assert next(stream).token_ids
            started = time.monotonic()
            os.killpg(server.pid, signal.SIGTERM)
            try:
                for _ in stream:
                    pass
            except grpc.RpcError as e:
                assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), e
        assert server.wait(timeout=30) == 0
        assert time.monotonic() - started < 30
        assert "the Ray cluster is gone" in server.stdout.read()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)


def test_a_taken_http_port_fails_at_once_in_one_line():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        started = time.time()
        result = subprocess.run([sys.executable, "-m", "gemma_dist.cli", "serve", "--port", str(free_port()),
                                 "--http-port", str(busy)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and time.time() - started < 60
    assert f"gemma-dist: error: --http-port: cannot bind 127.0.0.1:{busy}" in result.stderr


def test_a_drain_ends_at_once_when_the_ray_cluster_dies_during_it(monkeypatch):
    """A group signal whose Ray processes die slower than the first look: the drain began (the
    cluster still answered), the in-flight call cannot finish; the next look sees the cluster
    gone and ends the calls at once instead of waiting out DRAIN_SECONDS (and then Ray's 60 s)."""
    import asyncio

    from gemma_dist.server import serve

    class Server:
        """grpc.aio.Server's stop: waits out the grace for a call that never ends; None aborts."""

        def __init__(self):
            self.graces, self.aborted = [], asyncio.Event()

        async def stop(self, grace):
            self.graces.append(grace)
            if grace is None:
                self.aborted.set()
                return
            await asyncio.wait_for(self.aborted.wait(), grace)

    looks = iter([True, False])  # still there at the first poll, gone at the second
    monkeypatch.setattr(serve, "ray_reachable", lambda timeout=1.0: next(looks))
    monkeypatch.setattr(serve, "RAY_POLL_SECONDS", 0.05)

    async def drain():
        server = Server()
        started = time.monotonic()
        alive = await serve._drain(server, None, alive=True)
        return alive, server.graces, time.monotonic() - started

    alive, graces, seconds = asyncio.run(drain())
    assert alive is False and graces == [serve.DRAIN_SECONDS, None] and seconds < 5


def test_serve_quantize_int8_answers_with_the_int8_engines_tokens_and_logprobs(default_llm):
    """`gemma-dist serve --quantize int8` end to end: the gRPC answer carries the in-process int8
    engine's greedy tokens and logprobs (tp=1; the int8 kernel is batch- and thread-invariant, so
    equal up to float printing), and those logprobs are not the exact model's (the flag reached
    the shard worker)."""
    from gemma_dist import SamplingParams
    from gemma_dist.client import Client
    from gemma_dist.model.layers import set_cpu_kernels

    prompt, tokens = "Count: one, two, three,", 12
    params = SamplingParams(temperature=0, max_tokens=tokens, logprobs=1, ignore_eos=True)
    exact = default_llm.generate([prompt], params)[0]
    try:
        set_cpu_kernels(default_llm.model, quantize="int8")
        local = default_llm.generate([prompt], params)[0]
    finally:
        set_cpu_kernels(default_llm.model)  # the session's other tests expect the exact prepacked model
    port = free_port()
    server = serve_process(port, "--quantize", "int8", "--metrics-port", str(free_port()), "--http-port", "0")
    try:
        wait_listening(server, port, timeout=180)
        with Client(f"127.0.0.1:{port}", timeout=120) as client:
            served = client.generate(prompt, temperature=0, max_tokens=tokens, logprobs=1, ignore_eos=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
    assert list(served.token_ids) == local.token_ids
    served_logprobs = [lp.chosen.logprob for lp in served.logprobs]
    assert max(abs(a - b.logprob) for a, b in zip(served_logprobs, local.logprobs)) < 1e-4
    assert max(abs(a.logprob - b.logprob) for a, b in zip(exact.logprobs, local.logprobs)) > 1e-3
