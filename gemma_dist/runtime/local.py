"""An in-process replica: one AsyncLLMEngine in the gateway's process (tests, single-host use).

It implements the interface the gateway routes over (`name`, `is_ready`, `load`, `generate`,
`abort`, `stats`); Ray-backed replicas implement the same.
"""

from __future__ import annotations

from typing import AsyncIterator

from gemma_dist.engine.llm_engine import AsyncLLMEngine, EngineStats, EngineStoppedError, LLMEngine, RequestDelta
from gemma_dist.runtime import ReplicaFailure
from gemma_dist.sampling import SamplingParams


class LocalReplica:
    """A replica running its engine in a background thread of this process."""

    def __init__(self, name: str, engine: LLMEngine):
        self.name = name
        self.engine = AsyncLLMEngine(engine)
        self._in_flight = 0
        self.draining = False  # no new requests (being removed)

    def is_ready(self) -> bool:
        """True while the engine accepts requests."""
        return not self.draining and not self.engine._stopped and self.engine._failure is None

    def load(self) -> int:
        """Requests in flight here (the router picks the smallest)."""
        return self._in_flight

    async def generate(self, request_id: str, params: SamplingParams, **engine_input) -> AsyncIterator[RequestDelta]:
        """Stream one request's deltas (engine_input: prompt= or chat=)."""
        self._in_flight += 1
        try:
            async for delta in self.engine.generate(request_id, params=params, **engine_input):
                yield delta
        except EngineStoppedError as e:
            raise ReplicaFailure(f"{self.name}: {e}") from e
        finally:
            self._in_flight -= 1

    def abort(self, request_id: str) -> None:
        """Stop a request."""
        self.engine.abort(request_id)

    def stats(self) -> EngineStats:
        """Engine counters."""
        return self.engine.stats()

    def shutdown(self) -> None:
        """Stop the engine thread."""
        self.engine.shutdown()
