"""Bearer-token auth and TLS on the gateway (in-process replica, real gRPC on loopback)."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest

from gemma_dist.client import Client
from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine
from gemma_dist.runtime.local import LocalReplica
from gemma_dist.server.security import BearerTokenInterceptor, server_credentials
from tests.server.harness import running_gateway, wait_until


def replica(llm):
    return LocalReplica("r0", LLMEngine(llm.model, llm.tokenizer, EngineConfig(kv_cache_memory=64 << 20)))


def test_bearer_token_required_and_health_open(default_llm):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with running_gateway([replica(default_llm)], default_llm,
                         interceptors=[BearerTokenInterceptor("s3cret")]) as server:
        target = f"127.0.0.1:{server.port}"
        for token in (None, "wrong"):
            with Client(target, timeout=60, token=token) as client:
                for call in (lambda: client.generate("Hi", max_tokens=1),
                             lambda: list(client.generate_stream("Hi", max_tokens=1)),
                             lambda: client.model_info()):
                    with pytest.raises(grpc.RpcError) as info:
                        call()
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(target, timeout=60, token="s3cret") as client:
            assert client.generate("Hi", temperature=0, max_tokens=2).usage.completion_tokens == 2
        with grpc.insecure_channel(target) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_tls_client_succeeds(default_llm, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    with running_gateway([replica(default_llm)], default_llm,
                         credentials=server_credentials(str(cert), str(key))) as server:
        credentials = grpc.ssl_channel_credentials(cert.read_bytes())
        with Client(f"localhost:{server.port}", timeout=60, credentials=credentials) as client:
            assert client.generate("Hi", temperature=0, max_tokens=2).usage.completion_tokens == 2
        with Client(f"127.0.0.1:{server.port}", timeout=10) as plaintext:  # a plaintext client cannot talk to it
            with pytest.raises(grpc.RpcError):
                plaintext.generate("Hi", max_tokens=1)


def test_bad_secret_files_fail_fast(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(ValueError, match="--tls-cert: cannot read"):
        server_credentials(str(tmp_path / "missing.pem"), str(empty))
    with pytest.raises(ValueError, match="--tls-cert: .* is empty"):
        server_credentials(str(empty), str(empty))


def test_health_is_not_serving_only_while_no_replica_is_ready(default_llm):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    rep = replica(default_llm)
    with running_gateway([rep], default_llm) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def status():
                return health.Check(health_pb2.HealthCheckRequest(service="gemma_dist.v1.GemmaService"),
                                    timeout=10).status

            assert status() == health_pb2.HealthCheckResponse.SERVING
            rep.draining = True  # health refreshes every second (later on a loaded machine)
            assert wait_until(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING)
            rep.draining = False
            assert wait_until(lambda: status() == health_pb2.HealthCheckResponse.SERVING)
