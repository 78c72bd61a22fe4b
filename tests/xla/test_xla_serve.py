"""`gemma-dist serve --device xla` as users run it, on XLA:CPU: the real Gemma 3 270M sharded by
SPMD over 4 virtual devices in one Ray actor, warmed up before the port opens, answering
gRPC Generate (unary and streaming) with the eager path's greedy tokens, then draining on
SIGTERM. Runs in the XLA test environment (see test_xla.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch_xla", reason="torch_xla is installed only in the XLA test environment")
pytest.importorskip("grpc")
pytest.importorskip("ray")

from tests.helpers import free_port, stable_prefix  # noqa: E402

pytestmark = pytest.mark.xla
ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests" / "data" / "gemma3_270m_greedy.json").read_text())
CASE = next(c for c in GOLDEN["cases"] if c["kind"] == "prose")
TOKENS = 12


def test_serve_on_xla_answers_grpc_with_the_reference_tokens():
    from gemma_dist.client import Client

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "gemma_dist.cli", "serve", "--device", "xla", "--dtype", "float32",
           "--max-model-len", "128", "--kv-cache-memory", str(64 << 20), "--port", str(port),
           "--metrics-port", str(free_port()), "--http-port", "0"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    log = []
    try:
        deadline = time.time() + 600
        for line in server.stdout:
            log.append(line)
            if f"on 127.0.0.1:{port}" in line or time.time() > deadline:
                break
        assert any("device xla" in line for line in log), "".join(log[-20:])
        assert any(f"on 127.0.0.1:{port}" in line for line in log), "".join(log[-20:])
        with Client(f"127.0.0.1:{port}", timeout=300) as client:
            unary = client.generate(CASE["prompt_token_ids"], temperature=0, max_tokens=TOKENS)
            streamed = [t for piece in client.generate_stream(CASE["prompt_token_ids"], temperature=0,
                                                              max_tokens=TOKENS) for t in piece.token_ids]
            too_long = None
            try:
                client.generate([2] * 200, temperature=0, max_tokens=4)
            except Exception as e:  # grpc.RpcError
                too_long = e
        assert list(unary.token_ids) == stable_prefix(CASE)[:TOKENS] and len(stable_prefix(CASE)) >= TOKENS
        assert streamed == list(unary.token_ids)
        assert too_long is not None and too_long.code().name == "INVALID_ARGUMENT"  # over --max-model-len
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0
    finally:
        if server.poll() is None:
            server.kill()
