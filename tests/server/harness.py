"""A gRPC gateway on its own event loop in a background thread, for tests."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

from gemma_dist.server.gateway import GemmaServicer, start_server
from gemma_dist.server.validation import ServedModel


class ServerThread:
    """A grpc.aio gateway running on its own event loop in a background thread."""

    def __init__(self, servicer: GemmaServicer, credentials=None, interceptors=(), make_replica=None,
                 http_token: str | None = None, http: bool = False, autoscale=None):
        self.loop = asyncio.new_event_loop()
        self.servicer = servicer
        self.http = None  # the OpenAI HTTP front, when asked for (`http_port`)
        started = threading.Event()

        async def start():
            self.server, self.port = await start_server(servicer, "127.0.0.1", 0, credentials, interceptors,
                                                        make_replica, autoscale)
            if http:
                from gemma_dist.server.openai_http import start_http

                self.http = await start_http(servicer, "127.0.0.1", 0, http_token)

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(60)

    @property
    def http_port(self) -> int:
        return self.http.port

    def stop(self):
        if self.http is not None:
            asyncio.run_coroutine_threadsafe(self.http.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.server.metrics_task.cancel)
        asyncio.run_coroutine_threadsafe(self.server.stop(grace=None), self.loop).result(30)
        asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), self.loop).result(30)  # e.g. replicas' pollers
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


async def _cancel_other_tasks() -> None:
    """Cancel every task of the running loop but this one, and wait for them to end."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.contextmanager
def running_gateway(replicas, llm, max_tokens_limit: int = 4096, credentials=None, interceptors=(),
                    make_replica=None, http: bool = False, http_token: str | None = None, autoscale=None,
                    **limits):
    """Serve `replicas` (shut down afterwards) as the default model described by the offline `llm`;
    with `http`, the OpenAI front too (on `server.http_port`)."""
    model = ServedModel("default", llm.config.vocab_size, llm.config.max_position_embeddings, max_tokens_limit)
    server = ServerThread(GemmaServicer(replicas, model, llm.tokenizer, llm.config.name, **limits), credentials,
                          interceptors, make_replica, http_token=http_token, http=http, autoscale=autoscale)
    try:
        yield server
    finally:
        server.stop()
        for replica in server.servicer.replicas:  # after scaling, the current set
            replica.shutdown()


def wait_until(condition, seconds: float = 60.0, interval: float = 0.1):
    """Poll `condition()` until it returns something truthy (returned) or `seconds` pass (its last
    value is returned). For state that settles asynchronously (gauges refreshed every second,
    requests reaching a replica), instead of a fixed sleep that a loaded machine can outlast."""
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@contextlib.contextmanager
def one_local_replica(llm, kv_cache_memory: int, http: bool = True):
    """A gateway over one in-process replica of the offline `llm`'s model (OpenAI front on `http`)."""
    from gemma_dist.engine.llm_engine import EngineConfig, LLMEngine
    from gemma_dist.runtime.local import LocalReplica

    replica = LocalReplica("r0", LLMEngine(llm.model, llm.tokenizer, EngineConfig(kv_cache_memory=kv_cache_memory)))
    with running_gateway([replica], llm, http=http) as server:
        yield server
