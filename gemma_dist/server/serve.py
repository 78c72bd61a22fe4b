"""`gemma-dist serve`: load the model, start the replicas and the gRPC gateway, drain on SIGTERM.

Replicas run in this process for now (LocalReplica: one engine thread each, sharing the
model's weights); Ray-backed tensor-parallel replicas (--tp, --address) are being built.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time

log = logging.getLogger("gemma_dist.serve")
DRAIN_SECONDS = 30.0  # SIGTERM: finish in-flight requests for up to this long


def serve(args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.tp != 1 or args.address:
        print("gemma-dist serve: Ray-backed replicas (--tp > 1, --address) are not available yet; "
              "this build serves in-process replicas (--tp 1, no --address)", file=sys.stderr)
        return 2
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine
    from gemma_dist.model.layers import set_batch_invariant
    from gemma_dist.runtime.local import LocalReplica
    from gemma_dist.server.gateway import GemmaServicer, start_server
    from gemma_dist.server.validation import ServedModel

    started = time.perf_counter()
    set_batch_invariant(args.batch_invariant)
    first = LLMEngine.from_model(args.model, args.dtype, args.variant,
                                 config=EngineConfig(kv_cache_memory=args.kv_cache_memory))
    engines = [first] + [LLMEngine(first.model, first.tokenizer, first.config) for _ in range(args.replicas - 1)]
    replicas = [LocalReplica(f"replica-{i}", e) for i, e in enumerate(engines)]
    config = first.model_config
    served = ServedModel(args.model if args.model == "default" else config.name, config.vocab_size,
                         config.max_position_embeddings, args.max_tokens_limit)
    servicer = GemmaServicer(replicas, served, first.tokenizer, config.name, tp=1)
    server, port = await start_server(servicer, args.host, args.port)
    log.info("serving %s (%s) on %s:%d with %d replica(s), ready in %.1fs", served.name, config.name, args.host,
             port, len(replicas), time.perf_counter() - started)
    print(f"gemma-dist: serving {served.name} ({config.name}) on {args.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining: no new requests; finishing in-flight ones for up to %.0fs", DRAIN_SECONDS)
    await server.stop(grace=DRAIN_SECONDS)
    for replica in replicas:
        replica.shutdown()
    return 0
