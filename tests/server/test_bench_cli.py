"""`gemma-dist bench` against a real gateway (gRPC and the OpenAI HTTP API, loopback) on the real
Gemma 3 270M: every request is counted, tokens add up, and bad input is one clear line."""

from __future__ import annotations

import json

import pytest

from gemma_dist.cli import main
from tests.server.harness import one_local_replica


@pytest.fixture(scope="module")
def served(default_llm):
    with one_local_replica(default_llm, 64 << 20) as server:
        yield server


def rows(text: str) -> dict[str, str]:
    return {cells[0]: cells[1] for line in text.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bench_counts_every_request_and_token(served, capsys, protocol):
    where = (["--target", f"127.0.0.1:{served.port}"] if protocol == "grpc"
             else ["--url", f"http://127.0.0.1:{served.http_port}/v1"])
    assert main(["bench", *where, "--requests", "6", "--concurrency", "3", "--prompt-len", "20",
                 "--output-len", "4"]) == 0
    table = rows(capsys.readouterr().out)
    assert table["requests (ok / sent)"] == "6 / 6" and table["output tokens"] == "24"
    assert table["protocol, concurrency"] == f"{protocol}, 3" and float(table["output tok/s"]) > 0
    ttft = [float(x) for x in table["TTFT p50 / p90 / p99 (ms)"].split(" / ")]
    assert 0 < ttft[0] <= ttft[1] <= ttft[2]


def test_bench_reads_prompts_from_jsonl(served, capsys, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "The sky is", "max_tokens": 3}) + "\n\n"
                    + json.dumps({"prompt_token_ids": [2, 651, 6246, 603], "max_tokens": 2}) + "\n")
    assert main(["bench", "--target", f"127.0.0.1:{served.port}", "--prompts-file", str(path),
                 "--requests", "4", "--concurrency", "2"]) == 0
    table = rows(capsys.readouterr().out)
    assert table["requests (ok / sent)"] == "4 / 4" and table["output tokens"] == str(3 + 2 + 3 + 2)


def test_bench_failures_are_reported_by_status(served, capsys, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "x", "max_tokens": 100000}) + "\n")
    assert main(["bench", "--target", f"127.0.0.1:{served.port}", "--prompts-file", str(path),
                 "--requests", "2"]) == 1
    assert rows(capsys.readouterr().out)["failed: INVALID_ARGUMENT"] == "2"
    path.write_text("not json\n")
    assert main(["bench", "--target", f"127.0.0.1:{served.port}", "--prompts-file", str(path)]) == 2
    assert "bad.jsonl:1: expected a JSON object" in capsys.readouterr().err
    assert main(["bench", "--requests", "0"]) == 2
    assert "--requests must be >= 1" in capsys.readouterr().err
