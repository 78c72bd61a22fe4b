"""`gemma-dist` command line: serve (gRPC gateway), generate (via a server, or --local)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="gemma-dist", description="Serve and run Google's Gemma models.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC server on a model")
    serve.add_argument("--model", default="default",
                       help="'default' (Gemma 3 270M), an HF directory, a .gguf or a gemma_pytorch .ckpt")
    serve.add_argument("--variant", default=None, help="registry variant name (needed for .ckpt files)")
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    serve.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per replica")
    serve.add_argument("--replicas", type=int, default=1, help="model replicas")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1 = this machine only)")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--metrics-port", type=int, default=8000)
    serve.add_argument("--address", default=None, help="Ray cluster to join: auto or HOST:PORT")
    serve.add_argument("--kv-cache-memory", type=float, default=2 * 2**30,
                       help="KV cache budget per replica: bytes (> 1) or a fraction of memory (<= 1)")
    serve.add_argument("--max-tokens-limit", type=int, default=8192, help="largest max_tokens a request may ask")
    serve.add_argument("--max-queued-requests", type=int, default=None,
                       help="requests waiting for their first token, over all replicas; more fail at once "
                            "with RESOURCE_EXHAUSTED (default: unbounded)")
    serve.add_argument("--queue-timeout", type=float, default=None,
                       help="seconds a request may wait for its first token before failing with UNAVAILABLE")
    serve.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve over TLS")
    serve.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    serve.add_argument("--auth-token-file", default=None,
                       help="file holding a bearer token that every call must send (health stays open)")
    serve.add_argument("--threads-per-worker", type=int, default=0,
                       help="torch threads per shard worker (0 = this host's cores / (tp x replicas))")
    serve.add_argument("--batch-invariant", action="store_true",
                       help="make outputs bitwise independent of batching (slower for lone requests)")
    scale = sub.add_parser("scale", help="add or remove replicas of a running server")
    scale.add_argument("--replicas", type=int, required=True, help="replicas wanted (>= 1)")
    scale.add_argument("--target", default="127.0.0.1:50051", help="server address")
    scale.add_argument("--auth-token-file", default=None, help="file holding the server's bearer token")
    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--local", action="store_true",
                     help="run the model in this process (no server)")
    gen.add_argument("--target", default="127.0.0.1:50051", help="server address (without --local)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they arrive (with a server)")
    gen.add_argument("--tls-ca", default=None, help="PEM CA certificate: connect over TLS")
    gen.add_argument("--auth-token-file", default=None, help="file holding the server's bearer token")
    gen.add_argument("--model", default="default",
                     help="'default' (Gemma 3 270M), an HF directory, a .gguf or a gemma_pytorch .ckpt")
    gen.add_argument("--variant", default=None, help="registry variant name (needed for .ckpt files)")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the Gemma chat template")
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=64)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--kv-cache-memory", type=float, default=2 * 2**30,
                     help="KV cache budget: bytes (> 1) or a fraction of the machine's memory (<= 1)")
    return parser


def _generate_local(args: argparse.Namespace) -> int:
    from gemma_dist import LLM, SamplingParams

    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=args.seed, stop=tuple(args.stop))
    start = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, variant=args.variant, kv_cache_memory=args.kv_cache_memory)
    loaded = time.perf_counter()
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        out = llm.generate([args.prompt], params)[0]
    done = time.perf_counter()
    print(out.text)
    n = len(out.token_ids)
    print(f"[{llm.config.name}: loaded in {loaded - start:.1f}s; {n} tokens in {done - loaded:.1f}s "
          f"({n / max(done - loaded, 1e-9):.1f} tok/s); finish_reason={out.finish_reason}]", file=sys.stderr)
    return 0


def _generate_remote(args: argparse.Namespace) -> int:
    import grpc

    from gemma_dist.client import Client

    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, max_tokens=args.max_tokens,
                    seed=args.seed, stop=args.stop)
    chat = [{"role": "user", "content": args.prompt}] if args.chat else None
    prompt = None if args.chat else args.prompt
    try:
        credentials = grpc.ssl_channel_credentials(open(args.tls_ca, "rb").read()) if args.tls_ca else None
        token = open(args.auth_token_file).read().strip() if args.auth_token_file else None
        with Client(args.target, credentials=credentials, token=token) as client:
            if args.stream:
                for piece in client.generate_stream(prompt, chat=chat, **sampling):
                    print(piece.text, end="", flush=True)
                print()
            else:
                print(client.generate(prompt, chat=chat, **sampling).text)
    except grpc.RpcError as e:
        print(f"gemma-dist: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


def _scale(args: argparse.Namespace) -> int:
    import grpc

    from gemma_dist.client import Client

    token = open(args.auth_token_file).read().strip() if args.auth_token_file else None
    try:
        with Client(args.target, token=token) as client:
            print(f"replicas: {client.scale(args.replicas)}")
    except grpc.RpcError as e:
        print(f"gemma-dist: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gemma-dist` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            from gemma_dist.server.serve import serve

            return serve(args)
        if args.command == "generate":
            return _generate_local(args) if args.local else _generate_remote(args)
        if args.command == "scale":
            return _scale(args)
    except ValueError as e:  # bad sampling values, bad model path: one clear line
        print(f"gemma-dist: error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
