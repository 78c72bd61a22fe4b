"""The offline LLM API on the real Gemma 3 270M: stop rules, logprobs, seeds, chat, bad input, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemma_dist import SamplingParams
from gemma_dist.model import layers
from gemma_dist.sampling import SamplingParamsError
from tests.helpers import assert_greedy_agrees, stable_prefix, teacher_forced_logits, top1_margins

GOLDEN = {c["kind"]: c for c in json.loads(
    (Path(__file__).parent.parent / "data" / "gemma3_270m_greedy.json").read_text())["cases"]}
PROSE = GOLDEN["prose"]
# The reference tokens every correct fp32 implementation reproduces (up to the first near-tie).
STABLE = {kind: stable_prefix(case) for kind, case in GOLDEN.items()}


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, **kw)


def test_output_fields(default_llm):
    out = default_llm.generate(PROSE["prompt"], greedy(max_tokens=6))[0]
    assert out.prompt == PROSE["prompt"]
    assert out.prompt_token_ids == PROSE["prompt_token_ids"]
    assert out.token_ids == STABLE["prose"][:6] and len(STABLE["prose"]) >= 6
    assert out.finish_reason == "length"
    assert out.text == default_llm.tokenizer.decode(out.token_ids)
    assert out.logprobs is None


def test_stop_string_truncates_text(default_llm):
    full = default_llm.tokenizer.decode(STABLE["prose"])
    stop = "loud noise"  # appears in the reference continuation (before any near-tie)
    assert stop in full
    out = default_llm.generate(PROSE["prompt"], greedy(max_tokens=40, stop=[stop, "never-there"]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full[: full.index(stop)]
    assert stop not in out.text


def test_stop_token_id(default_llm):
    stop_id = STABLE["prose"][4]
    out = default_llm.generate(PROSE["prompt"], greedy(max_tokens=40, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == STABLE["prose"][: STABLE["prose"].index(stop_id) + 1]


def test_logprobs_report_the_greedy_choice(default_llm):
    out = default_llm.generate(PROSE["prompt"], greedy(max_tokens=4, logprobs=3))[0]
    assert len(out.logprobs) == 4
    for token, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == token
        assert len(lp.top) == 3
        assert lp.top[0][0] == token  # greedy picks the most likely token
        assert lp.logprob == pytest.approx(lp.top[0][1]) and lp.logprob <= 0
        assert [p for _, p in lp.top] == sorted((p for _, p in lp.top), reverse=True)


@pytest.fixture
def batch_invariant_mode():
    layers.set_batch_invariant(True)
    yield
    layers.set_batch_invariant(False)


def test_seed_reproduces_whatever_shares_the_batch(default_llm, batch_invariant_mode):
    # In batch-invariant mode the logits of a row are bitwise the same alone or in a batch, so the
    # seed alone decides every draw. (In fast mode a lone row's last bits may differ, and a draw
    # landing within that of a boundary between two tokens' probabilities could go either way.)
    seeded = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_tokens=12, seed=1234)
    alone = default_llm.generate(PROSE["prompt"], seeded)[0].token_ids
    others = [GOLDEN["code"]["prompt"], GOLDEN["digits"]["prompt"]]
    batch = default_llm.generate([others[0], PROSE["prompt"], others[1]],
                                 [SamplingParams(max_tokens=5), seeded, SamplingParams(max_tokens=20, seed=7)])
    assert batch[1].token_ids == alone
    other_seed = default_llm.generate(PROSE["prompt"], SamplingParams(
        temperature=1.0, top_k=0, top_p=1.0, max_tokens=12, seed=4321))[0].token_ids
    assert other_seed != alone


def test_batch_of_different_lengths_equals_each_alone(default_llm):
    kinds = ["prose", "code", "digits", "cjk"]
    params = [greedy(max_tokens=n) for n in (3, 9, 5, 12)]
    together = default_llm.generate([GOLDEN[k]["prompt"] for k in kinds], params)
    for kind, p, out in zip(kinds, params, together):
        assert len(STABLE[kind]) >= p.max_tokens, kind
        assert out.token_ids == STABLE[kind][: p.max_tokens], kind


def test_text_of_multibyte_output_is_whole(default_llm):
    out = default_llm.generate(GOLDEN["cjk"]["prompt"], greedy(max_tokens=20))[0]
    assert out.text == default_llm.tokenizer.decode(out.token_ids)
    assert "\ufffd" not in out.text


def test_chat_uses_the_template_and_stops_at_end_of_turn(default_llm):
    tok = default_llm.tokenizer
    out = default_llm.chat([{"role": "user", "content": "Say hello."}], greedy(max_tokens=24))[0]
    assert out.prompt_token_ids[:2] == [tok.bos_id, tok.start_of_turn_id]
    assert out.prompt_token_ids[-3:] == tok.encode("<start_of_turn>model\n", add_bos=False)
    assert tok.end_of_turn_id in tok.stop_token_ids(chat=True)
    if tok.end_of_turn_id in out.token_ids:
        assert out.token_ids[-1] == tok.end_of_turn_id and out.finish_reason == "stop"


def test_ignore_eos_runs_to_max_tokens(default_llm):
    eos = default_llm.tokenizer.eos_id
    # Force eos to be likely: stop on eos normally, but ignore_eos keeps going to max_tokens.
    out = default_llm.generate([[default_llm.tokenizer.bos_id, eos]], greedy(max_tokens=8, ignore_eos=True))[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


@pytest.mark.parametrize("prompt, message", [
    ("", "prompt must not be empty"),
    ([], "prompt_token_ids must not be empty"),
    ([2, 10**7], "prompt_token_ids: id 10000000 is outside the vocabulary"),
    ([2, -1], "prompt_token_ids: id -1 is outside the vocabulary"),
])
def test_bad_prompts_raise_clear_errors(default_llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        default_llm.generate([prompt], greedy(max_tokens=2))


def test_vllm_style_prompt_dicts_give_the_same_outputs(default_llm):
    ids = default_llm.tokenizer.encode("The capital of France is")
    plain = default_llm.generate(["The capital of France is", ids], greedy(max_tokens=4))
    dicts = default_llm.generate([{"prompt": "The capital of France is"}, {"prompt_token_ids": ids}],
                                 greedy(max_tokens=4))
    assert [o.token_ids for o in dicts] == [o.token_ids for o in plain] and plain[0].token_ids == plain[1].token_ids
    assert default_llm.generate({"prompt": "The capital of France is"}, greedy(max_tokens=4))[0].token_ids == \
        plain[0].token_ids
    with pytest.raises(ValueError, match="'prompt' or 'prompt_token_ids'"):
        default_llm.generate([{"text": "hi"}], greedy(max_tokens=1))


def test_bad_sampling_values_raise_naming_the_parameter():
    with pytest.raises(SamplingParamsError, match="^top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(SamplingParamsError, match="^temperature"):
        SamplingParams(temperature=float("nan"))


def test_params_list_must_match_prompts(default_llm):
    with pytest.raises(ValueError, match="sampling_params has 2 entries for 1 prompts"):
        default_llm.generate(["a"], [greedy(), greedy()])


def test_kv_capacity_is_reported(default_llm):
    assert default_llm.max_cached_tokens >= 32 * 1024


def test_cli_generate_local_matches_the_api(default_llm):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "gemma_dist.cli", "generate", "--local", "--temperature", "0",
         "--max-tokens", "6", PROSE["prompt"]], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = default_llm.tokenizer.decode(STABLE["prose"][:6])
    assert result.stdout == expected + "\n"
    assert "gemma-3-270m" in result.stderr


def test_cli_reports_bad_values_in_one_line():
    result = subprocess.run([sys.executable, "-m", "gemma_dist.cli", "generate", "--local", "--top-p", "7", "x"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "top_p" in result.stderr and "Traceback" not in result.stderr


# bf16 against fp32 by teacher forcing: both models read the same tokens (the fp32 model's greedy
# continuation, computed in the same run), so every position compares like with like. Measured on
# the 7 golden prompts x 40 positions (AVX-512 CPU with native bf16 dot products): bf16 rounding
# moved a logit by at most 1.35 (mean 0.05..0.13 per prompt; at most 3.0% of the position's largest
# |logit|), and moved the top-1 logit relative to any token within 3 of it by at most 0.53. Where
# the fp32 top-1 margin exceeds BF16_MARGIN (~3x that) bf16 rounding cannot bridge it, so bf16 must
# pick the same token there. Below it bf16 did pick another token, at fp32 margins 0.14, 0.12, 0.02
# and 0.0; the old test asked for prose's first token, where fp32 prefers 691 over 506 by only 0.08
# (they tie in bf16 on some CPUs): no test may ask there.
BF16_MARGIN = 1.5
BF16_MAX_REL_ERROR = 0.06  # per position: max |bf16 - fp32| over the vocabulary / max |fp32 logit|
BF16_MAX_MEAN_ERROR = 0.25  # mean |bf16 - fp32| over a prompt's positions and the vocabulary


def test_bfloat16_model_agrees_with_fp32_where_the_choice_is_clear(default_llm):
    from gemma_dist import LLM

    llm = LLM(model="default", dtype="bfloat16", kv_cache_memory=64 << 20)
    assert next(llm.model.parameters()).dtype == torch.bfloat16
    kinds = ["code", "chat", "digits"]
    fp32 = default_llm.generate([GOLDEN[k]["prompt"] for k in kinds], greedy(max_tokens=16))
    clear, margins = 0, {}
    for kind, out in zip(kinds, fp32):
        want = teacher_forced_logits(default_llm.model, out.prompt_token_ids, out.token_ids)
        got = teacher_forced_logits(llm.model, out.prompt_token_ids, out.token_ids)
        error = (got - want).abs()
        assert (error.amax(-1) <= BF16_MAX_REL_ERROR * want.abs().amax(-1)).all(), kind
        assert error.mean() < BF16_MAX_MEAN_ERROR, kind
        margins[kind] = top1_margins(want)
        sure = margins[kind] > BF16_MARGIN
        assert torch.equal(got.argmax(-1)[sure], want.argmax(-1)[sure]), kind
        clear += int(sure.sum())
    assert clear >= 24, clear  # of 48 positions (41 here): the comparison is not vacuous
    # Generation itself runs in bf16 and gives fp32's tokens up to fp32's first unclear step.
    out = llm.generate(GOLDEN["digits"]["prompt"], greedy(max_tokens=8))[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"
    compared = assert_greedy_agrees(out.token_ids, fp32[2].token_ids[:8], margins["digits"].tolist(), BF16_MARGIN)
    assert compared == 8  # every step of digits is clear (fp32 margins > 3.4)
