"""`gemma-dist` command line: serve (gRPC gateway), generate (via a server, or --local), scale, bench."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from gemma_dist.config import default_dtype
from gemma_dist.runtime import ReplicaFailure

DEVICES = ["auto", "cpu", "cuda", "xla"]


def add_model_arguments(parser: argparse.ArgumentParser, device_help: str) -> None:
    """--model, --variant, --dtype, --quantize and --device: which checkpoint runs, in what precision, where."""
    parser.add_argument("--model", default="default",
                        help="'default' (Gemma 3 270M), an HF directory, a .gguf or a gemma_pytorch .ckpt")
    parser.add_argument("--variant", default=None, help="registry variant name (needed for .ckpt files)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weights and activations (default: bfloat16 on cuda/xla, float32 on cpu)")
    parser.add_argument("--quantize", default=None, choices=["int8"],
                        help="int8: on CPU, every linear layer and the LM head computes with int8 weights and "
                             "int8 activations, one scale per 16 values (32 for the LM head's weights; not exact: "
                             "97%% top-1 agreement; faster single-stream decode, slower batches; default: the "
                             "exact --dtype weights)")
    parser.add_argument("--device", default="auto", choices=DEVICES, help=device_help)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="gemma-dist", description="Serve and run Google's Gemma models.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC server on a model")
    add_model_arguments(serve, device_help="where shard workers run: cpu, cuda (nccl), xla (TPU via torch_xla "
                                           "SPMD); auto = cuda when available, else cpu")
    serve.add_argument("--tp", type=int, default=1,
                       help="tensor-parallel ranks per replica; with --device xla, TPU hosts per replica "
                            "(one actor per host shards the model over all its chips)")
    serve.add_argument("--step-timeout", type=float, default=None,
                       help="seconds after which a replica's step counts as hung (a stuck collective) and the "
                            "replica is rebuilt (default: 3x the longest legitimate step, a full prefill chunk at "
                            "the longest context, at a pessimistic speed for the device; at least 30)")
    serve.add_argument("--placement-timeout", type=float, default=600.0,
                       help="seconds to wait for the cluster to fit a replica (its GPUs / TPU hosts) before failing")
    serve.add_argument("--placement-strategy", choices=("pack", "spread"), default=None,
                       help="where a replica's shards go: pack (as few nodes as fit them) or spread (each on its "
                            "own node, as TPU hosts or one-GPU nodes need); default: spread for a multi-host XLA "
                            "slice, else pack")
    serve.add_argument("--max-model-len", type=int, default=None,
                       help="longest prompt + output per request (default: the model's context; 4096 on xla, "
                            "where each doubling adds compiled graphs)")
    serve.add_argument("--replicas", type=int, default=1,
                       help="model replicas (with --min/--max-replicas: how many to start with, kept in bounds)")
    serve.add_argument("--min-replicas", type=int, default=None,
                       help="autoscale: fewest replicas (with --max-replicas; default: fixed --replicas)")
    serve.add_argument("--max-replicas", type=int, default=None, help="autoscale: most replicas")
    serve.add_argument("--scale-up-queue", type=float, default=2.0,
                       help="autoscale: requests waiting per ready replica that ask for one more (KV-cache use "
                            "over 90%% does too; nothing waiting, under 50%% and the others' slots half free ask "
                            "for one fewer)")
    serve.add_argument("--scale-window", type=float, default=10.0,
                       help="autoscale: seconds a signal must hold before a replica is added or drained")
    serve.add_argument("--scale-cooldown", type=float, default=30.0,
                       help="autoscale: seconds after a change before the next")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1 = this machine only)")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--metrics-port", type=int, default=8000)
    serve.add_argument("--http-port", type=int, default=8080,
                       help="OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, "
                            "/health) on this port; 0 turns it off")
    serve.add_argument("--address", default=None, help="Ray cluster to join: auto or HOST:PORT")
    serve.add_argument("--kv-cache-memory", type=float, default=2 * 2**30,
                       help="KV cache budget per replica: bytes (> 1) or a fraction of memory (<= 1)")
    serve.add_argument("--max-tokens-limit", type=int, default=8192, help="largest max_tokens a request may ask")
    serve.add_argument("--max-num-seqs", type=int, default=64,
                       help="sequences per engine step, per replica (decoding + prefilling)")
    serve.add_argument("--max-num-batched-tokens", type=int, default=2048,
                       help="new tokens per engine step, per replica (prompt chunks + decodes; >= --max-num-seqs)")
    serve.add_argument("--max-queued-requests", type=int, default=None,
                       help="requests waiting for their first token, over all replicas; more fail at once "
                            "with RESOURCE_EXHAUSTED (default: unbounded)")
    serve.add_argument("--queue-timeout", type=float, default=None,
                       help="seconds a request may wait for its first token before failing with UNAVAILABLE")
    serve.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve over TLS")
    serve.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    serve.add_argument("--auth-token-file", default=None,
                       help="file holding a bearer token that every call must send (health stays open)")
    serve.add_argument("--step-dispatch", default="auto", choices=["auto", "compiled-graph", "actor-calls"],
                       help="how a replica's coordinator sends each step to its shard workers: a Ray Compiled "
                            "Graph (shared-memory channels, ~0.25 ms, but its reader spins a core while a step "
                            "runs) or one actor call per worker (~1 ms+); auto = the graph on GPU/TPU, actor "
                            "calls on CPU")
    serve.add_argument("--tp-collectives", default="auto", choices=["auto", "torch"],
                       help="how CPU shard workers of one host sum their partial results: auto = through a shared "
                            "memory segment (microseconds a call; gloo over loopback TCP measured ~1 ms), else and "
                            "on GPU torch.distributed; torch = always torch.distributed (gloo / nccl)")
    serve.add_argument("--threads-per-worker", type=int, default=0,
                       help="torch threads per shard worker (0 = this host's cores / (tp x replicas))")
    serve.add_argument("--routing", default="prefix", choices=["prefix", "least-loaded"],
                       help="how the gateway picks a replica: prefix = the one most likely to cache the prompt's "
                            "prefix unless it is much busier than the least-loaded; least-loaded = fewest "
                            "requests in flight (always, with --no-prefix-caching)")
    serve.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                       help="compute every prompt in full (by default, prompts that start like an earlier one "
                            "reuse its cached K/V blocks)")
    serve.add_argument("--no-window-pool", dest="kv_window_pool", action="store_false",
                       help="keep every layer's K/V for the whole context (by default sliding-window layers of "
                            "Gemma 2/3 give back the KV blocks their window has left, so long contexts fit "
                            "several times more sequences in the same --kv-cache-memory)")
    serve.add_argument("--batch-invariant", action="store_true",
                       help="make outputs bitwise independent of batching (slower for lone requests)")
    serve.add_argument("--dry-run", action="store_true",
                       help="validate the flags, print the resolved settings as JSON and exit "
                            "(starts no Ray, loads no model)")
    scale = sub.add_parser("scale", help="add or remove replicas of a running server")
    scale.add_argument("--replicas", type=int, required=True, help="replicas wanted (>= 1)")
    scale.add_argument("--target", default="127.0.0.1:50051", help="server address")
    scale.add_argument("--auth-token-file", default=None, help="file holding the server's bearer token")
    bench = sub.add_parser("bench", help="load a running server and report throughput and latency")
    bench.add_argument("--target", default="127.0.0.1:50051", help="gRPC server address")
    bench.add_argument("--url", default=None,
                       help="use the OpenAI HTTP API at this base URL instead (e.g. http://127.0.0.1:8080/v1)")
    bench.add_argument("--requests", type=int, default=64, help="requests to send")
    bench.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    bench.add_argument("--prompt-len", type=int, default=128, help="tokens per random prompt")
    bench.add_argument("--output-len", type=int, default=128, help="max_tokens per request (default for the file)")
    bench.add_argument("--prompts-file", default=None,
                       help='JSONL, one request per line: {"prompt": text} or {"prompt_token_ids": [...]}, '
                            'optional "max_tokens"; cycled up to --requests')
    bench.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    bench.add_argument("--stop-at-eos", action="store_true",
                       help="let requests end at the end-of-sequence token (default: exactly max_tokens each)")
    bench.add_argument("--seed", type=int, default=None,
                       help="seed of the random prompts (default: new prompts every run, so a server's prefix "
                            "cache cannot answer them from an earlier run)")
    bench.add_argument("--auth-token-file", default=None, help="file holding the server's bearer token")
    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--local", action="store_true",
                     help="run the model in this process (no server)")
    gen.add_argument("--target", default="127.0.0.1:50051", help="server address (without --local)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they arrive (with a server)")
    gen.add_argument("--tls-ca", default=None, help="PEM CA certificate: connect over TLS")
    gen.add_argument("--auth-token-file", default=None, help="file holding the server's bearer token")
    add_model_arguments(gen, device_help="where --local runs the model: cpu, cuda, xla; auto = cuda when available")
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


def check_serve_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag when a `serve` setting is out of range."""
    at_least_one = (("--replicas", args.replicas), ("--tp", args.tp), ("--max-tokens-limit", args.max_tokens_limit))
    for flag, value in at_least_one:
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    for flag, port in (("--port", args.port), ("--metrics-port", args.metrics_port), ("--http-port", args.http_port)):
        if not 0 <= port <= 65535:
            raise ValueError(f"{flag} must be in 0..65535, got {port}")
    if args.device not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {args.device!r}")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if not args.kv_cache_memory > 0:
        raise ValueError(f"--kv-cache-memory must be > 0, got {args.kv_cache_memory:g}")
    if args.max_queued_requests is not None and args.max_queued_requests < 1:
        raise ValueError(f"--max-queued-requests must be >= 1, got {args.max_queued_requests}")
    if args.queue_timeout is not None and not args.queue_timeout > 0:
        raise ValueError(f"--queue-timeout must be > 0, got {args.queue_timeout:g}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise ValueError(f"--max-model-len must be >= 2, got {args.max_model_len}")
    if args.step_timeout is not None and not args.step_timeout > 0:
        raise ValueError(f"--step-timeout must be > 0, got {args.step_timeout:g}")
    if not args.placement_timeout > 0:
        raise ValueError(f"--placement-timeout must be > 0, got {args.placement_timeout:g}")
    if args.quantize is not None and args.device in ("cuda", "xla"):
        raise ValueError(f"--quantize {args.quantize} is a CPU mode, not for --device {args.device}")
    if args.threads_per_worker < 0:
        raise ValueError(f"--threads-per-worker must be >= 0, got {args.threads_per_worker}")
    if args.max_num_seqs < 1:
        raise ValueError(f"--max-num-seqs must be >= 1, got {args.max_num_seqs}")
    if (args.min_replicas is None) != (args.max_replicas is None):
        raise ValueError("--min-replicas and --max-replicas go together")
    if args.min_replicas is not None:
        try:
            autoscale_config(args)
        except ValueError as e:
            raise ValueError(f"autoscale: {e} (--min-replicas, --max-replicas, --scale-*)") from None
    if args.max_num_batched_tokens < args.max_num_seqs:
        raise ValueError(f"--max-num-batched-tokens ({args.max_num_batched_tokens}) must be >= --max-num-seqs "
                         f"({args.max_num_seqs})")


def autoscale_config(args: argparse.Namespace):
    """The AutoscaleConfig of `serve`'s flags, or None with a fixed --replicas."""
    if args.min_replicas is None:
        return None
    from gemma_dist.server.autoscale import AutoscaleConfig

    return AutoscaleConfig(args.min_replicas, args.max_replicas, up_queue=args.scale_up_queue,
                           window=args.scale_window, cooldown=args.scale_cooldown)


def serve_settings(args: argparse.Namespace) -> dict:
    """The `serve` settings as plain values, with the default dtype resolved where the device is known."""
    settings = {k: v for k, v in vars(args).items() if k not in ("command", "dry_run")}
    if settings["dtype"] is None and args.device != "auto":  # auto: decided once the device is found
        settings["dtype"] = default_dtype(args.device)
    return settings


def _generate_local(args: argparse.Namespace) -> int:
    from gemma_dist import LLM, SamplingParams

    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=args.seed, stop=tuple(args.stop))
    start = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, variant=args.variant, kv_cache_memory=args.kv_cache_memory,
              device=args.device, quantize=args.quantize)
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


def _bench(args: argparse.Namespace) -> int:
    import asyncio
    import random

    from gemma_dist.bench import Workload, run_grpc, run_http

    for flag, value in (("--requests", args.requests), ("--concurrency", args.concurrency),
                        ("--prompt-len", args.prompt_len), ("--output-len", args.output_len)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    workload = (Workload.from_jsonl(args.prompts_file, args.output_len, args.requests) if args.prompts_file
                else Workload.random(args.requests, args.prompt_len, args.output_len, seed))
    if not args.prompts_file:
        print(f"random prompts: --seed {seed}", file=sys.stderr)
    token = open(args.auth_token_file).read().strip() if args.auth_token_file else None
    options = dict(token=token, temperature=args.temperature, ignore_eos=not args.stop_at_eos, progress=True)
    run = (run_http(args.url, workload, args.concurrency, **options) if args.url
           else run_grpc(args.target, workload, args.concurrency, **options))
    report = asyncio.run(run)
    print(report.table())
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gemma-dist` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            check_serve_args(args)
            if args.dry_run:
                print(json.dumps(serve_settings(args), sort_keys=True))
                return 0
            from gemma_dist.server.serve import serve

            return serve(args)
        if args.command == "generate":
            return _generate_local(args) if args.local else _generate_remote(args)
        if args.command == "scale":
            return _scale(args)
        if args.command == "bench":
            return _bench(args)
    except ValueError as e:  # bad sampling values, bad model path: one clear line
        print(f"gemma-dist: error: {e}", file=sys.stderr)
        return 2
    except (ReplicaFailure, OSError) as e:  # e.g. --device cuda on a cluster without GPUs; a port in use
        print(f"gemma-dist: error: {e}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
