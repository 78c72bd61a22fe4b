"""`gemma-dist serve`: start (or join) Ray, start the replicas and the gRPC gateway, drain on SIGTERM.

Each replica is `--tp` ShardWorker actors plus a Coordinator actor in one placement group
(gemma_dist.runtime.replica); the gateway runs in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time

log = logging.getLogger("gemma_dist.serve")
DRAIN_SECONDS = 30.0  # SIGTERM: finish in-flight requests for up to this long
RAY_POLL_SECONDS = 0.25  # while draining, how often to look whether the Ray cluster still lives


class _RayGone(Exception):
    """The Ray cluster died with us (a signal to the whole process group): leave without Ray."""


def serve(args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from gemma_dist.cli import check_serve_args

    check_serve_args(args)
    try:
        return asyncio.run(_serve(args))
    except _RayGone:
        # Ray's own exit hooks would wait for the dead GCS, and its core worker aborts the process
        # after 60 s without one: exit now, the gateway's work done.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)


async def _drain(server, http, alive: bool) -> bool:
    """Stop the gRPC and HTTP fronts (no new requests). While the Ray cluster lives, requests in
    flight get up to DRAIN_SECONDS to finish, and the cluster is looked at every RAY_POLL_SECONDS:
    if it dies meanwhile (a signal to the whole process group whose Ray processes die slower than
    the first look saw), nothing in flight can finish, and the rest end at once. Returns whether
    the cluster still lives."""
    if alive:
        log.info("draining: no new requests; finishing in-flight ones for up to %.0fs", DRAIN_SECONDS)
    else:
        _log_ray_gone()
    loop = asyncio.get_running_loop()
    stopping = asyncio.ensure_future(asyncio.gather(server.stop(grace=DRAIN_SECONDS if alive else None),
                                                    *([http.stop()] if http is not None else [])))
    while alive and not stopping.done():
        await asyncio.wait([stopping], timeout=RAY_POLL_SECONDS)
        if not stopping.done() and not await loop.run_in_executor(None, ray_reachable):
            alive = False
            _log_ray_gone()
            await server.stop(grace=None)  # the most restrictive grace wins: in-flight calls end now
    await stopping
    return alive


def _log_ray_gone() -> None:
    log.warning("the Ray cluster is gone (the signal reached its processes too): ending in-flight requests")


def ray_reachable(timeout: float = 1.0) -> bool:
    """Whether the Ray cluster's GCS still accepts connections. A SIGTERM sent to the whole process
    group (systemd's default stop, `kill -TERM -PGID`) also kills the local cluster `ray.init()`
    started under this process, and its actors."""
    import ray

    try:
        host, port = ray.get_runtime_context().gcs_address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError, AttributeError):
        return False


def cluster_device(device: str, resources: dict) -> str:
    """Resolve --device on the cluster: "auto" is cuda when any node has a GPU, else cpu."""
    if device == "auto":
        return "cuda" if resources.get("GPU") else "cpu"
    return device


async def _serve(args: argparse.Namespace) -> int:
    import ray

    from gemma_dist.config import default_dtype
    from gemma_dist.engine.llm_engine import EngineConfig
    from gemma_dist.engine.xla_runner import DEFAULT_MAX_MODEL_LEN
    from gemma_dist.model.loading import open_checkpoint
    from gemma_dist.cli import autoscale_config
    from gemma_dist.runtime.replica import RayReplica, default_step_timeout, request_capacity
    from gemma_dist.server.gateway import GemmaServicer, start_server
    from gemma_dist.server.validation import ServedModel

    from gemma_dist.server.security import BearerTokenInterceptor, read_secret, server_credentials

    # Secrets first: a bad file fails in a second, not after the replicas have loaded.
    credentials = server_credentials(args.tls_cert, args.tls_key) if args.tls_cert else None
    auth_token = read_secret(args.auth_token_file, "--auth-token-file").decode().strip() if args.auth_token_file else None
    interceptors = [BearerTokenInterceptor(auth_token)] if auth_token else []
    http_socket = None
    if args.http_port:  # bound first, like the secrets: a taken port fails before the model loads
        from gemma_dist.server.openai_http import bind_http_socket

        http_socket = bind_http_socket(args.host, args.http_port)
    started = time.perf_counter()
    checkpoint = open_checkpoint(args.model, args.variant)  # converts the default model once, here
    config, tokenizer = checkpoint.config, checkpoint.load_tokenizer()
    checkpoint.source.close()
    ray.init(address=args.address, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"GEMMA_DIST_BATCH_INVARIANT": "1" if args.batch_invariant else "0",
                                       "GEMMA_DIST_SHM_COLLECTIVES": "1" if args.tp_collectives == "auto" else "0"}})
    device = cluster_device(args.device, ray.cluster_resources())
    dtype = args.dtype or default_dtype(device)
    max_model_len = min(args.max_model_len or (DEFAULT_MAX_MODEL_LEN if device == "xla" else
                                               config.max_position_embeddings), config.max_position_embeddings)
    engine_config = EngineConfig(kv_cache_memory=args.kv_cache_memory, max_model_len=max_model_len,
                                 max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                 prefix_caching=args.prefix_caching, kv_window_pool=args.kv_window_pool,
                                 quantize=args.quantize)
    # Each shard worker uses its share of this host's cores (Ray would pin it to one thread).
    threads = args.threads_per_worker or max(1, (os.cpu_count() or 1) // (args.tp * args.replicas))
    step_timeout = args.step_timeout or default_step_timeout(config, engine_config, device, args.tp)
    log.info("device %s, dtype %s, max_model_len %d, step watchdog %.0fs", device, dtype, max_model_len, step_timeout)

    def make_replica(name: str) -> RayReplica:
        return RayReplica(args.model, dtype, args.variant, args.tp, engine_config,
                          threads_per_worker=threads, name=name, device=device, step_timeout=step_timeout,
                          placement_timeout=args.placement_timeout, dispatch=args.step_dispatch,
                          placement_strategy=args.placement_strategy)

    autoscale = autoscale_config(args)
    count = args.replicas if autoscale is None else autoscale.bounded(args.replicas)
    loop = asyncio.get_running_loop()
    replicas = await asyncio.gather(*(loop.run_in_executor(None, make_replica, f"replica-{i}")
                                      for i in range(count)))
    served = ServedModel(args.model if args.model == "default" else config.name, config.vocab_size,
                         max_model_len, args.max_tokens_limit)
    servicer = GemmaServicer(replicas, served, tokenizer, config.name, tp=args.tp,
                             max_queued_requests=args.max_queued_requests, queue_timeout=args.queue_timeout,
                             routing=args.routing if args.prefix_caching else "least-loaded")

    from gemma_dist.engine.llm_engine import tune_gc_for_serving

    tune_gc_for_serving()  # the gateway handles thousands of short-lived messages a second
    server, port = await start_server(servicer, args.host, args.port, credentials, interceptors, make_replica,
                                      autoscale, lambda n: request_capacity(n, args.tp, device))
    metrics_port = servicer.metrics.serve(args.host, args.metrics_port)
    log.info("metrics on http://%s:%d/metrics", args.host, metrics_port)
    http = None
    if http_socket is not None:
        from gemma_dist.server.openai_http import start_http

        http = await start_http(servicer, args.host, args.http_port, auth_token, args.tls_cert, args.tls_key,
                                sock=http_socket)
        log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", "https" if args.tls_cert else "http", args.host,
                 http.port)
    log.info("serving %s (%s) on %s:%d: %d replica(s) x tp=%d, ready in %.1fs", served.name, config.name,
             args.host, port, len(replicas), args.tp, time.perf_counter() - started)
    print(f"gemma-dist: serving {served.name} ({config.name}) on {args.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await asyncio.sleep(0.2)  # a signal to the whole group: let the local Ray processes finish dying first
    server.metrics_task.cancel()
    if not await _drain(server, http, ray_reachable()):
        raise _RayGone()
    for replica in replicas:
        replica.shutdown()
    ray.shutdown()
    return 0
