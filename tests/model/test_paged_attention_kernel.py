"""The fused Triton paged-attention kernel equals the gather path.

Without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set before the
kernel module is first imported), so its indexing, masking, softcap and online softmax are
checked on every CI run; with CUDA the compiled kernel is checked (tests marked gpu).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from gemma_dist.engine.model_runner import ModelRunner, StepInput  # noqa: E402
from gemma_dist.model.attention import build_attention_metadata, write_kv  # noqa: E402
from gemma_dist.model.layers import paged_attention  # noqa: E402
from gemma_dist.model.loading import load_model, open_checkpoint  # noqa: E402
from tests.helpers import make_tiny_hf_checkpoint, shuffled_block_tables, top1_margins  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _scattered_step(block_size: int, num_blocks: int, seed: int):
    """Three sequences (2 decoding, 1 prefilling a chunk after a cached prefix) over shuffled blocks."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_blocks, generator=g).tolist()
    query_lens, cached = [1, 7, 1], [13, 9, 30]
    return query_lens, cached, shuffled_block_tables(order, cached, query_lens, block_size)


@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (4, 2), (4, 4)])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("window", [None, 8])
def test_kernel_equals_gather_path(heads, kv_heads, softcap, window):
    block_size, num_blocks, head_dim = 4, 24, 16
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    query_lens, cached, tables = _scattered_step(block_size, num_blocks, seed=kv_heads)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(DEVICE)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(DEVICE)
    tokens = sum(query_lens)
    q = torch.randn(tokens, heads, head_dim, generator=g).to(DEVICE)
    k_new = torch.randn(tokens, kv_heads, head_dim, generator=g).to(DEVICE)
    v_new = torch.randn(tokens, kv_heads, head_dim, generator=g).to(DEVICE)
    gather_meta = build_attention_metadata(query_lens, cached, tables, block_size, window, DEVICE)
    kernel_meta = build_attention_metadata(query_lens, cached, tables, block_size, window, DEVICE, use_kernel=True)
    write_kv(k_cache, v_cache, k_new, v_new, gather_meta.slot_mapping[0])
    assert torch.equal(gather_meta.slot_mapping, kernel_meta.slot_mapping)
    for local in (False, True):
        expected = paged_attention(q, k_cache, v_cache, gather_meta, local, 0.25, softcap)
        got = paged_attention(q, k_cache, v_cache, kernel_meta, local, 0.25, softcap)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def _greedy(runner: ModelRunner, prompts: list[list[int]], steps: int, forced: list[list[int]] | None = None):
    """Prefill each prompt, then decode all of them together for `steps` tokens: greedy, or feeding
    the `forced` tokens instead (teacher forcing). Returns (tokens fed, logits (steps + 1, B, vocab))."""
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(len(prompts))]
    ids = [list(p) for p in prompts]
    rows = []
    with torch.inference_mode():
        rows.append(torch.cat([runner.logits([StepInput(p, 0, tables[i], None)]) for i, p in enumerate(prompts)]))
        for step in range(steps + 1):
            for i, (x, row) in enumerate(zip(ids, rows[-1])):
                x.append(forced[i][step] if forced else int(row.argmax()))
            if step < steps:
                rows.append(runner.logits([StepInput(x[-1:], len(x) - 1, t, None) for x, t in zip(ids, tables)]))
    return [x[len(p):] for x, p in zip(ids, prompts)], torch.stack(rows).cpu()


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_greedy_decoding_through_the_kernel_equals_the_gather_path(family, tmp_path):
    """Three sequences decoding together: gather path, kernel, and the decode-graph buffers
    (captured on CUDA; on CPU the same static buffers run uncaptured, 3 rows padded to 4).

    The kernel sums attention in another order than the gather path, so their logits differ in the
    last bits and a greedy near-tie could go either way: the kernel runs are fed the gather path's
    greedy tokens (teacher forcing), and must give logits within ATOL of it everywhere, and its
    argmax wherever the gather path's top-1 margin exceeds 2 * ATOL (bigger than the difference
    can bridge)."""
    make_tiny_hf_checkpoint(family, tmp_path)
    model = load_model(open_checkpoint(tmp_path), "float32", DEVICE)
    g = torch.Generator().manual_seed(1)
    prompts = [[2] + torch.randint(10, 500, (n,), generator=g).tolist() for n in (12, 3, 9)]
    atol = 1e-4  # measured: kernel vs gather logits differ by <= 2.3e-6 (tiny models, logits ~1)
    tokens, want = _greedy(ModelRunner(model, 24, 4, attention="gather"), prompts, 6)
    clear = top1_margins(want) > 2 * atol  # (7, 3) steps x sequences
    assert int(clear.sum()) >= 16, int(clear.sum())  # of 21: 20 for gemma2 (one near-tie, 0.00017), 21 for gemma3
    graphs_runner = ModelRunner(model, 24, 4, attention="kernel", decode_graphs=True, max_model_len=32)
    assert graphs_runner.decode_graphs is not None
    for runner in (ModelRunner(model, 24, 4, attention="kernel", decode_graphs=False), graphs_runner):
        fed, got = _greedy(runner, prompts, 6, forced=tokens)
        assert fed == tokens
        torch.testing.assert_close(got, want, atol=atol, rtol=0)
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_unknown_attention_backend_is_refused(tmp_path):
    make_tiny_hf_checkpoint("gemma3", tmp_path)
    model = load_model(open_checkpoint(tmp_path), "float32")
    with pytest.raises(ValueError, match="attention must be"):
        ModelRunner(model, 4, 4, attention="flash")
    with pytest.raises(ValueError, match="decode graphs need"):
        ModelRunner(model, 4, 4, attention="gather", decode_graphs=True)
    assert ModelRunner(model, 4, 4).attention == "gather"  # the CPU default
    with pytest.raises(ValueError, match="power-of-two block_size, got 6"):
        ModelRunner(model, 4, 6, attention="kernel")


def test_decode_graphs_read_a_persistent_batch_as_they_read_step_inputs(tmp_path):
    """The engine's path (a plan applied to a persistent batch, `run_prepared`) fills the graphs'
    static buffers exactly as the StepInput path does: the same logits, bit for bit."""
    from gemma_dist.engine.persistent_batch import PersistentBatch
    from gemma_dist.engine.step_plan import NewRequest, StepPlan
    from gemma_dist.sampling import SamplingParams

    make_tiny_hf_checkpoint("gemma3", tmp_path)
    model = load_model(open_checkpoint(tmp_path), "float32", DEVICE)
    runner = ModelRunner(model, 24, 4, attention="kernel", decode_graphs=True, max_model_len=32)
    g = torch.Generator().manual_seed(3)
    prompts = [[2] + torch.randint(10, 500, (n,), generator=g).tolist() for n in (12, 3, 9)]
    tables = [[5, 0, 7, 2], [9, 11], [3, 4, 14]]  # scattered blocks covering prompt + one token
    batch = PersistentBatch(block_size=4, groups=runner.kv_groups)  # int blocks b: pages b * G + g, as in StepInputs
    batch.apply(StepPlan(added=[NewRequest(i, f"r{i}", p, [], SamplingParams(temperature=0))
                                for i, p in enumerate(prompts)],
                         block_updates=[(i, 0, t) for i, t in enumerate(tables)]))
    with torch.inference_mode():
        for i, p in enumerate(prompts):  # prefill all but the last prompt token
            runner.logits([StepInput(p[:-1], 0, tables[i], None)])
        plan = StepPlan(slots=[2, 0, 1], num_cached=[len(prompts[i]) - 1 for i in (2, 0, 1)], num_tokens=[1, 1, 1],
                        samples=[True, True, True])
        prepared = runner.prepare(batch, plan)
        assert runner.decode_graphs.fits_prepared(prepared)
        from_batch = runner.decode_graphs.run_prepared(prepared).clone()
        from_steps = runner.decode_graphs.run(batch.step_inputs(plan)).clone()
    assert torch.equal(from_batch, from_steps)
