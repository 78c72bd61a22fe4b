"""Bearer-token authentication (a server interceptor) and TLS credentials for the gateway."""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)  # health probes need no token
_DENIED = "authentication required: send metadata 'authorization: Bearer <token>'"


def read_secret(path: str, what: str) -> bytes:
    """The bytes of a secret file, or ValueError naming the flag's file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {path} ({e.strerror})") from e
    if not data.strip():
        raise ValueError(f"{what}: {path} is empty")
    return data


def server_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials:
    """TLS credentials from a PEM certificate chain and private key."""
    cert = read_secret(cert_file, "--tls-cert")
    key = read_secret(key_file, "--tls-key")
    return grpc.ssl_server_credentials([(key, cert)])


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` with UNAUTHENTICATED (health is open)."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("--auth-token-file: the token is empty")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        """Pass authorized calls (and health checks) on; answer the rest UNAUTHENTICATED."""
        if details.method.startswith(_OPEN_PREFIXES):
            return await continuation(details)
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        sent = sent.encode() if isinstance(sent, str) else sent
        if hmac.compare_digest(sent, self._expected):
            return await continuation(details)
        return _denial(details.method)


def _denial(method: str) -> grpc.RpcMethodHandler:
    """A handler of the right shape for `method` that fails with UNAUTHENTICATED."""
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
        yield  # pragma: no cover (makes this an async generator)

    if method.endswith("/GenerateStream"):
        return grpc.unary_stream_rpc_method_handler(streaming)
    if method.endswith("/ServerReflectionInfo"):
        return grpc.stream_stream_rpc_method_handler(streaming)
    return grpc.unary_unary_rpc_method_handler(unary)
