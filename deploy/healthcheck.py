"""Container health check: exit 0 when the gemma-dist server reports SERVING over grpc.health.v1.

Usage: python healthcheck.py [HOST:PORT] (default 127.0.0.1:50051). Exit 1 otherwise (not
serving, unreachable, or no answer within --timeout seconds). Plaintext only: with --tls-cert use
Kubernetes' grpc probe or grpc_health_probe -tls instead.
"""

from __future__ import annotations

import argparse
import sys


def check(target: str, timeout: float) -> bool:
    """True when the server at `target` answers SERVING for the overall ("") service."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                              timeout=timeout)
        except grpc.RpcError as e:
            print(f"healthcheck: {target}: {e.code().name}", file=sys.stderr)
            return False
    print(f"healthcheck: {target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    """Exit code 0 when serving, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", nargs="?", default="127.0.0.1:50051")
    parser.add_argument("--timeout", type=float, default=4.0)
    args = parser.parse_args(argv)
    return 0 if check(args.target, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
