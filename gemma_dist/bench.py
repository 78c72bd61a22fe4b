"""`gemma-dist bench`: load a running server and measure it, over gRPC or the OpenAI HTTP API.

N requests (random prompts of a given length, or prompts from a JSONL file) go out with at most C
in flight at once, each streaming; the report gives output tok/s, requests/s, time to first token
(TTFT), time per output token after the first (TPOT) and end-to-end latency percentiles, and the
failures by status. Greedy with ignore_eos by default, so every request generates exactly its
max_tokens and runs compare. The benchmark scripts in bench/ drive servers through `run_grpc`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import sys
import time
from pathlib import Path
from typing import Awaitable, Callable

RANDOM_TOKEN_IDS = (1000, 30000)  # ordinary tokens in every Gemma vocabulary
BOS_ID = 2


@dataclasses.dataclass
class Workload:
    """The requests of a run: prompts (text or token ids) and max_tokens, request by request."""

    prompts: list[str | list[int]]
    max_tokens: list[int]

    @classmethod
    def random(cls, requests: int, prompt_len: int, output_len: int, seed: int = 0) -> "Workload":
        """`requests` prompts of `prompt_len` random ordinary token ids (BOS first)."""
        rng = random.Random(seed)
        prompts = [[BOS_ID] + [rng.randrange(*RANDOM_TOKEN_IDS) for _ in range(prompt_len - 1)]
                   for _ in range(requests)]
        return cls(prompts, [output_len] * requests)

    @classmethod
    def from_jsonl(cls, path: str | Path, output_len: int, requests: int | None = None) -> "Workload":
        """One request per line: {"prompt": text} or {"prompt_token_ids": [...]}, optional "max_tokens"."""
        prompts, max_tokens = [], []
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt = row["prompt_token_ids"] if "prompt_token_ids" in row else row["prompt"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{number}: expected a JSON object with prompt or prompt_token_ids ({e})")
            prompts.append(prompt)
            max_tokens.append(int(row.get("max_tokens", output_len)))
        if not prompts:
            raise ValueError(f"{path}: no prompts")
        if requests is not None:  # cycle through the file up to `requests`
            prompts = [prompts[i % len(prompts)] for i in range(requests)]
            max_tokens = [max_tokens[i % len(max_tokens)] for i in range(requests)]
        return cls(prompts, max_tokens)


@dataclasses.dataclass
class RequestResult:
    """One request as the client saw it."""

    start: float
    first: float | None  # first token's arrival (perf_counter), None if none came
    end: float
    tokens: int
    error: str | None = None  # status of a failed request


@dataclasses.dataclass
class Report:
    """A run's results and the figures derived from them."""

    results: list[RequestResult]
    wall: float
    concurrency: int
    protocol: str

    @property
    def ok(self) -> list[RequestResult]:
        """The requests that succeeded."""
        return [r for r in self.results if r.error is None]

    @property
    def output_tokens(self) -> int:
        """Tokens received, over every request."""
        return sum(r.tokens for r in self.results)

    @property
    def tok_s(self) -> float:
        """Output tokens per second of wall time (prefill included)."""
        return self.output_tokens / self.wall

    def ttfts(self) -> list[float]:
        """Seconds to each successful request's first token, ascending."""
        return sorted(r.first - r.start for r in self.ok if r.first is not None)

    def tpots(self) -> list[float]:
        """Seconds per output token after the first, per successful request, ascending."""
        return sorted((r.end - r.first) / (r.tokens - 1) for r in self.ok if r.first is not None and r.tokens > 1)

    def latencies(self) -> list[float]:
        """Seconds from send to last token, per successful request, ascending."""
        return sorted(r.end - r.start for r in self.ok)

    def failures(self) -> dict[str, int]:
        """Failed requests by status."""
        out: dict[str, int] = {}
        for r in self.results:
            if r.error is not None:
                out[r.error] = out.get(r.error, 0) + 1
        return out

    def table(self) -> str:
        """The report as a Markdown table."""
        rows = [("requests (ok / sent)", f"{len(self.ok)} / {len(self.results)}"),
                ("protocol, concurrency", f"{self.protocol}, {self.concurrency}"),
                ("wall time (s)", f"{self.wall:.2f}"),
                ("output tokens", f"{self.output_tokens}"),
                ("output tok/s", f"{self.tok_s:.1f}"),
                ("requests/s", f"{len(self.ok) / self.wall:.2f}")]
        for name, values, scale, unit in (("TTFT", self.ttfts(), 1e3, "ms"), ("TPOT", self.tpots(), 1e3, "ms"),
                                          ("latency", self.latencies(), 1.0, "s")):
            if values:
                rows.append((f"{name} p50 / p90 / p99 ({unit})", " / ".join(
                    f"{percentile(values, q) * scale:.1f}" for q in (50, 90, 99))))
        for status, count in sorted(self.failures().items()):
            rows.append((f"failed: {status}", str(count)))
        width = max(len(name) for name, _ in rows)
        lines = [f"| {'measure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
        lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
        return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))]


async def _run(workload: Workload, concurrency: int, one: Callable[[int], Awaitable[RequestResult]],
               progress: bool) -> tuple[list[RequestResult], float]:
    """Every request of `workload` through `one`, at most `concurrency` at a time; (results, wall)."""
    from tqdm import tqdm

    bar = tqdm(total=len(workload.prompts), unit="req", file=sys.stderr, disable=not progress, leave=False)
    next_index, results = iter(range(len(workload.prompts))), [None] * len(workload.prompts)

    async def worker() -> None:
        for i in next_index:
            results[i] = await one(i)
            bar.update(1)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(workload.prompts)))))
    wall = time.perf_counter() - start
    bar.close()
    return results, wall


async def run_grpc(target: str, workload: Workload, concurrency: int, token: str | None = None,
                   temperature: float = 0.0, ignore_eos: bool = True, progress: bool = False,
                   channels: int = 4) -> Report:
    """The workload as GenerateStream calls over `channels` gRPC connections."""
    import grpc

    from gemma_dist.v1 import gemma_pb2, gemma_pb2_grpc

    opened = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    stubs = [gemma_pb2_grpc.GemmaServiceStub(c) for c in opened]
    metadata = (("authorization", f"Bearer {token}"),) if token else None

    async def one(i: int) -> RequestResult:
        prompt = workload.prompts[i]
        request = gemma_pb2.GenerateRequest(sampling=gemma_pb2.SamplingParams(
            temperature=temperature, max_tokens=workload.max_tokens[i], ignore_eos=ignore_eos))
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            request.prompt_token_ids.ids.extend(prompt)
        start, first, tokens = time.perf_counter(), None, 0
        try:
            async for response in stubs[i % channels].GenerateStream(request, metadata=metadata):
                if first is None and response.token_ids:
                    first = time.perf_counter()
                tokens += len(response.token_ids)
        except grpc.aio.AioRpcError as e:
            return RequestResult(start, first, time.perf_counter(), tokens, e.code().name)
        return RequestResult(start, first, time.perf_counter(), tokens)

    try:
        results, wall = await _run(workload, concurrency, one, progress)
    finally:
        for channel in opened:
            await channel.close()
    return Report(results, wall, concurrency, "grpc")


async def run_http(url: str, workload: Workload, concurrency: int, token: str | None = None,
                   temperature: float = 0.0, ignore_eos: bool = True, progress: bool = False) -> Report:
    """The workload as streaming POST /v1/completions calls to the OpenAI front at `url`
    (http://host:port, with or without /v1)."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    base = url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"  # http://host:port or http://host:port/v1
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=None, limits=limits) as client:
        async def one(i: int) -> RequestResult:
            body = {"prompt": workload.prompts[i], "max_tokens": workload.max_tokens[i], "temperature": temperature,
                    "ignore_eos": ignore_eos, "stream": True, "stream_options": {"include_usage": True}}
            start, first, tokens = time.perf_counter(), None, 0
            async with client.stream("POST", "completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    return RequestResult(start, None, time.perf_counter(), 0, f"HTTP {response.status_code}")
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return RequestResult(start, first, time.perf_counter(), tokens, chunk["error"].get("type"))
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    elif first is None and any(c.get("text") for c in chunk.get("choices", [])):
                        first = time.perf_counter()
            return RequestResult(start, first, time.perf_counter(), tokens)

        results, wall = await _run(workload, concurrency, one, progress)
    return Report(results, wall, concurrency, "http")
