"""TCA Triton kernels (sglang_tca.kernels) against the reference semantics of sglang_tca.algorithm.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below before the kernels are
imported) on CPU tensors, in fp32 and fp16 only (bf16 is wrong under the interpreter). With a GPU the same small tests
run compiled on CUDA tensors, and the `gpu`-marked tests add bf16 at realistic sizes (Hq=32, Hkv=8, D=128, 32K).
"""
from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"       # must be set before triton is first imported in this process

import pytest
import triton.language as tl

from sglang_tca.kernels import selection as _sel_mod
from sglang_tca.kernels import sparse_attention as _attn_mod

# Triton decides interpreted vs compiled when a @triton.jit function is created, including its own tl.sum / tl.cdiv;
# if another module imported triton before the line above ran, the CPU tests cannot run here (see the fixture below).
_INTERPRETED = type(tl.cdiv).__name__ == "InterpretedFunction"

from sglang_tca.algorithm import (block_scores, masked_attention, neff, num_selectable_blocks, select, tca_attention,
                                  thresholds_for_shares, visible)
from sglang_tca.params import TCAParams, dense_start

tca_sparse_attention = _attn_mod.tca_sparse_attention
tca_sparse_attention_ref = _attn_mod.tca_sparse_attention_ref
select_blocks = _sel_mod.select_blocks

# the interpreter's range() over tensor bounds triggers a NumPy deprecation warning per loop
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _triton_mode():
    if DEV == "cpu" and not _INTERPRETED:
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set, so the kernels cannot run on CPU in this "
                    "process: set TRITON_INTERPRET=1 in the environment or at the top of tests/conftest.py "
                    "(when torch.cuda.is_available() is False), or run tests/test_kernels.py on its own")


def hetero_thresholds(p: TCAParams, hq: int, hkv: int, d: int, seed: int = 123) -> torch.Tensor:
    """Calibration-style thresholds [Hkv, Kn-1] that differ per head: even heads prune hard, odd heads keep more."""
    kn = int(math.log2(p.block)) + 1
    g = torch.Generator().manual_seed(seed)
    L = 40 * p.block
    q = torch.randn(hq, L, d, generator=g)
    k = torch.randn(hkv, L, d, generator=g) * 2.0
    m = neff(block_scores(q, k, p, num_selectable_blocks(L, p)))[:, 1:]
    hard = torch.linspace(1.0, 0.2, kn)
    soft = hard.flip(0)
    shares = torch.stack([hard if h % 2 == 0 else soft for h in range(hkv)])
    return thresholds_for_shares(m, shares / shares.sum(-1, keepdim=True))


def keep_all_thresholds(p: TCAParams, hkv: int) -> torch.Tensor:
    return torch.full((hkv, int(math.log2(p.block))), -math.inf)


def make_batch(reqs, p, hq, hkv, d, dtype, thresholds, seed=0, eager_lists=False, device=DEV):
    """A packed batch over a shuffled token pool. reqs: [(q_start, q_len)], the request's queries are positions
    q_start .. q_start + q_len - 1 (decode: q_len = 1). Kept lists come from algorithm.select on the full sequence
    (per KV head). Returns (kernel args dict, expected output [T, Hq, D], kept lengths [bs, Hkv])."""
    g = torch.Generator().manual_seed(seed)
    Ls = [s + n for s, n in reqs]
    n_slots = sum(Ls) + 9
    perm = torch.randperm(n_slots - 1, generator=g) + 1                     # slot 0 is the padding slot
    k_buf = (torch.randn(n_slots, hkv, d, generator=g) * 2.0).to(dtype)
    v_buf = torch.randn(n_slots, hkv, d, generator=g).to(dtype)
    rows = (torch.randperm(len(reqs) + 2, generator=g)[: len(reqs)] + 1).tolist()   # row 0 is padding
    r2t = torch.zeros(len(reqs) + 3, max(Ls) + 37, dtype=torch.int32)
    qs, outs, lists, lens = [], [], [], []
    off = 0
    scale = d ** -0.5
    for (s, n), L, row in zip(reqs, Ls, rows):
        slots = perm[off:off + L]
        off += L
        r2t[row, :L] = slots.int()
        q_full = torch.randn(hq, L, d, generator=g).to(dtype)
        k_full = k_buf[slots].transpose(0, 1)
        v_full = v_buf[slots].transpose(0, 1)
        keep, _ = select(q_full.float(), k_full.float(), thresholds, p)
        ds = dense_start(L, p.block, p.window)
        hi = L if eager_lists else ds
        for h in range(hkv):
            t = torch.nonzero(keep[h]).flatten()
            lists.append(t[(t >= p.block) & (t < hi)].int())
        lens.append([len(x) for x in lists[-hkv:]])
        pos = torch.arange(s, L)
        outs.append(masked_attention(q_full[:, s:], k_full, v_full, visible(keep, pos, L, p), scale).transpose(0, 1))
        qs.append(q_full[:, s:].transpose(0, 1))
    args = dict(
        q=torch.cat(qs).contiguous(), k_buffer=k_buf, v_buffer=v_buf, req_to_token=r2t,
        req_pool_indices=torch.tensor(rows, dtype=torch.int64),
        q_start_pos=torch.tensor([s for s, _ in reqs], dtype=torch.int32),
        qo_indptr=torch.tensor([0] + [n for _, n in reqs]).cumsum(0).int(),
        kept_indptr=torch.tensor([0] + [len(x) for x in lists]).cumsum(0).int(),
        kept_pos=torch.cat(lists).int(),
        block=p.block, window=p.window, sm_scale=scale,
    )
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    return args, torch.cat(outs).to(device), torch.tensor(lens)


# b=16, w=64: nothing is compressed below w + 2b = 96 tokens.
P = TCAParams(block=16, window=64)
MIXED = [(0, 70),      # shorter than w + 2b: all dense
         (299, 1),     # decode-style single query at position 299
         (150, 90),    # chunk starting mid-block (150 = 9*16 + 6) after a 150-token prefix
         (0, 200)]     # full prefill: compressed blocks appear inside the chunk


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mixed_batch_matches_reference(dtype):
    hq, hkv, d = 6, 2, 32                                      # G = 3: rows of a tile are not a power of two
    thr = hetero_thresholds(P, hq, hkv, d)
    args, expected, lens = make_batch(MIXED, P, hq, hkv, d, dtype, thr, seed=1)
    assert lens[0].sum() == 0 and (lens[1:, 0] != lens[1:, 1]).all()   # heads keep different amounts
    out = tca_sparse_attention(**args)
    torch.testing.assert_close(out, expected, atol=TOL[dtype], rtol=TOL[dtype])
    ref = tca_sparse_attention_ref(**args)
    torch.testing.assert_close(ref, expected, atol=TOL[dtype], rtol=TOL[dtype])
    # sparse really differs from dense somewhere (so the test can fail)
    _, dense, _ = make_batch(MIXED, P, hq, hkv, d, dtype, keep_all_thresholds(P, hkv), seed=1)
    assert (dense - expected).abs().max() > 1e-2


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (128, 32)])
def test_tile_shapes_and_gqa4(block_m, block_n):
    hq, hkv, d = 8, 2, 16                                      # G = 4
    thr = hetero_thresholds(P, hq, hkv, d, seed=7)
    args, expected, _ = make_batch([(0, 130), (211, 1), (97, 45)], P, hq, hkv, d, torch.float32, thr, seed=2)
    out = tca_sparse_attention(**args, block_m=block_m, block_n=block_n)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_keep_all_equals_dense_causal():
    hq, hkv, d = 4, 2, 32
    args, _, lens = make_batch(MIXED, P, hq, hkv, d, torch.float32, keep_all_thresholds(P, hkv), seed=3)
    out = tca_sparse_attention(**args)
    qo = args["qo_indptr"].tolist()
    for r, (s, n) in enumerate(MIXED):
        L = s + n
        slots = args["req_to_token"][args["req_pool_indices"][r], :L].long()
        k = args["k_buffer"][slots].transpose(0, 1).repeat_interleave(hq // hkv, 0)
        v = args["v_buffer"][slots].transpose(0, 1).repeat_interleave(hq // hkv, 0)
        q = args["q"][qo[r]:qo[r + 1]].transpose(0, 1)
        causal = torch.arange(L, device=q.device)[None, :] <= torch.arange(s, L, device=q.device)[:, None]
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=d ** -0.5)
        torch.testing.assert_close(out[qo[r]:qo[r + 1]], ref.transpose(0, 1), atol=2e-5, rtol=2e-5)
    assert lens[3].tolist() == [dense_start(200, 16, 64) - 16] * hkv


def test_kv_splits_and_eager_lists():
    """Split-KV decode (+ merge kernel) equals the unsplit kernel; lists that already hold not-yet-compressed
    blocks (entries >= dense_start of the last query) give the same output, the dense pass covers those."""
    hq, hkv, d = 4, 2, 32
    thr = hetero_thresholds(P, hq, hkv, d, seed=5)
    reqs = [(299, 1), (40, 1), (180, 3)]
    args, expected, _ = make_batch(reqs, P, hq, hkv, d, torch.float32, thr, seed=4)
    for splits in (1, 3):
        out = tca_sparse_attention(**args, num_kv_splits=splits)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    args_e, expected_e, lens_e = make_batch(reqs, P, hq, hkv, d, torch.float32, thr, seed=4, eager_lists=True)
    torch.testing.assert_close(expected_e, expected)
    assert lens_e.sum() > args["kept_pos"].numel()
    torch.testing.assert_close(tca_sparse_attention(**args_e), expected, atol=2e-5, rtol=2e-5)


def test_long_kept_list_search():
    """A kept list longer than the search's 1024-entry sample (both search levels) and a multi-tile chunk whose
    earlier tiles see fewer compressed blocks than the last one."""
    p = TCAParams(block=16, window=64)
    hq, hkv, d = 2, 1, 16
    args, expected, lens = make_batch([(2470, 40)], p, hq, hkv, d, torch.float32,
                                      keep_all_thresholds(p, hkv), seed=6)
    assert lens.max() > 1024
    out = tca_sparse_attention(**args, block_m=16)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def _pool_for(q_full, k_full, seed, device=DEV):
    """Put one sequence's keys into a shuffled pool; returns k_buf, req_to_token, row."""
    g = torch.Generator().manual_seed(seed)
    hkv, L, d = k_full.shape
    perm = torch.randperm(L + 4, generator=g)[:L] + 1
    k_buf = torch.zeros(L + 6, hkv, d, dtype=k_full.dtype)
    k_buf[perm] = k_full.transpose(0, 1)
    r2t = torch.zeros(4, L + 8, dtype=torch.int32)
    r2t[2, :L] = perm.int()
    return k_buf.to(device), r2t.to(device), 2


@pytest.mark.parametrize("scoring", ["block_last", "window"])
def test_select_blocks_matches_algorithm(scoring):
    p = TCAParams(block=16, window=64, scoring=scoring)
    hq, hkv, d = 6, 2, 32
    g = torch.Generator().manual_seed(11)
    L = 330
    q_full = torch.randn(hq, L, d, generator=g)
    k_full = torch.randn(hkv, L, d, generator=g) * 2.0
    thr = hetero_thresholds(p, hq, hkv, d)
    keep, counts = select(q_full, k_full, thr, p)
    nb = num_selectable_blocks(L, p)
    k_buf, r2t, row = _pool_for(q_full, k_full, seed=12)
    js = torch.arange(0, nb)                                               # block 0 (the sink) keeps everything
    obs = (js[:, None] + torch.arange(p.n_obs)) * p.block + p.block - 1
    q_obs = q_full[:, obs].permute(1, 2, 0, 3).contiguous().to(DEV)        # [n, n_obs, Hq, D]
    rows = torch.full((nb,), row, device=DEV)
    want_keep = keep[:, : nb * p.block].view(hkv, nb, p.block).transpose(0, 1)
    for fn in (select_blocks,):
        res = fn(q_obs, k_buf, r2t, rows, js.to(DEV), thr, p.block)
        assert torch.equal(res.keep.cpu(), want_keep), fn.__name__
        assert torch.equal(res.counts.cpu().long(), counts.t().long()), fn.__name__
        for i in range(nb):
            for h in range(hkv):
                c = int(res.counts[i, h])
                want = (torch.nonzero(want_keep[i, h]).flatten() + js[i] * p.block).int()
                assert torch.equal(res.kept_pos[i, h, :c].cpu(), want)
                assert (res.kept_pos[i, h, c:] == -1).all()
    assert (counts[0, 1:] != counts[1, 1:]).any()                          # heads differ


def test_selection_feeds_attention_end_to_end():
    """select_blocks over a prompt's compressed blocks -> kept lists -> tca_sparse_attention == algorithm.tca_attention
    (prefill of the whole prompt, then a decode step)."""
    p = TCAParams(block=16, window=64)
    hq, hkv, d = 4, 2, 32
    g = torch.Generator().manual_seed(21)
    L = 260
    q_full = torch.randn(hq, L, d, generator=g)
    k_full = torch.randn(hkv, L, d, generator=g) * 2.0
    v_full = torch.randn(hkv, L, d, generator=g)
    thr = hetero_thresholds(p, hq, hkv, d)
    k_buf, r2t, row = _pool_for(q_full, k_full, seed=22)
    v_buf = torch.zeros_like(k_buf)
    v_buf[r2t[row, :L].long()] = v_full.transpose(0, 1).to(DEV)
    n_comp = dense_start(L, p.block, p.window) // p.block                  # blocks 1 .. n_comp - 1 are compressed
    js = torch.arange(1, n_comp)
    q_obs = q_full[:, js * p.block + p.block - 1].permute(1, 0, 2).contiguous().to(DEV)
    res = select_blocks(q_obs, k_buf, r2t, torch.full((len(js),), row, device=DEV), js.to(DEV), thr, p.block)
    lists = [res.kept_pos[:, h][res.kept_pos[:, h] >= 0] for h in range(hkv)]   # block order = ascending
    args = dict(k_buffer=k_buf, v_buffer=v_buf, req_to_token=r2t,
                req_pool_indices=torch.tensor([row], device=DEV), block=p.block, window=p.window,
                sm_scale=d ** -0.5,
                kept_indptr=torch.tensor([0] + [len(x) for x in lists]).cumsum(0).int().to(DEV),
                kept_pos=torch.cat(lists).int())
    want = tca_attention(q_full, k_full, v_full, thr, p)                   # [Hq, L, D]
    out = tca_sparse_attention(q=q_full.transpose(0, 1).contiguous().to(DEV), q_start_pos=torch.tensor([0], device=DEV),
                               qo_indptr=torch.tensor([0, L], device=DEV), **args)
    torch.testing.assert_close(out.cpu(), want.transpose(0, 1), atol=2e-5, rtol=2e-5)
    out1 = tca_sparse_attention(q=q_full[:, -1:].transpose(0, 1).contiguous().to(DEV),
                                q_start_pos=torch.tensor([L - 1], device=DEV),
                                qo_indptr=torch.tensor([0, 1], device=DEV), **args)
    torch.testing.assert_close(out1.cpu(), want[:, -1:].transpose(0, 1), atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------------------------------
# GPU: bf16 at realistic sizes (Llama-3.1-8B-like heads, 32K context). Kept lists are random (~30% of each
# compressed block) so that building them is cheap; the semantics do not depend on how they were chosen.

def _random_batch_gpu(reqs, hq=32, hkv=8, d=128, b=64, w=1024, dtype=torch.bfloat16, seed=0, keep_share=0.3):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(seed)
    Ls = [s + n for s, n in reqs]
    n_slots = sum(Ls) + 64
    perm = torch.randperm(n_slots - 1, generator=g, device=dev) + 1
    k_buf = torch.randn(n_slots, hkv, d, generator=g, device=dev).to(dtype)
    v_buf = torch.randn(n_slots, hkv, d, generator=g, device=dev).to(dtype)
    r2t = torch.zeros(len(reqs) + 1, max(Ls) + 64, dtype=torch.int32, device=dev)
    lists, off = [], 0
    for r, ((s, n), L) in enumerate(zip(reqs, Ls)):
        r2t[r + 1, :L] = perm[off:off + L].int()
        off += L
        ds = dense_start(L, b, w)
        for h in range(hkv):
            t = torch.arange(b, ds, device=dev)
            keep = torch.rand(t.numel(), generator=g, device=dev) < keep_share * (0.5 + h / hkv)   # heads differ
            lists.append(t[keep].int())
    q = torch.randn(sum(n for _, n in reqs), hq, d, generator=g, device=dev).to(dtype)
    return dict(q=q, k_buffer=k_buf, v_buffer=v_buf, req_to_token=r2t,
                req_pool_indices=torch.arange(1, len(reqs) + 1, device=dev),
                q_start_pos=torch.tensor([s for s, _ in reqs], device=dev, dtype=torch.int32),
                qo_indptr=torch.tensor([0] + [n for _, n in reqs], device=dev).cumsum(0).int(),
                kept_indptr=torch.tensor([0] + [len(x) for x in lists], device=dev).cumsum(0).int(),
                kept_pos=torch.cat(lists), block=b, window=w, sm_scale=d ** -0.5)


@pytest.mark.gpu
@needs_gpu
def test_gpu_bf16_decode_32k():
    reqs = [(32767, 1), (8191, 1), (1000, 1), (20000, 1), (2100, 1)]
    args = _random_batch_gpu(reqs, seed=1)
    ref = tca_sparse_attention_ref(**args)
    for splits in (None, 1):
        out = tca_sparse_attention(**args, max_q_len=1, num_kv_splits=splits)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_gpu
def test_gpu_bf16_extend_32k():
    reqs = [(32768 - 512, 512), (0, 4096), (5000, 300), (700, 1)]
    args = _random_batch_gpu(reqs, seed=2)
    ref = tca_sparse_attention_ref(**args)
    out = tca_sparse_attention(**args, max_q_len=4096)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_gpu
def test_gpu_select_blocks_32k():
    p = TCAParams(block=64, window=1024)
    hq, hkv, d, L = 32, 8, 128, 32768
    g = torch.Generator(device="cuda").manual_seed(3)
    q_full = torch.randn(hq, L, d, generator=g, device="cuda")
    k_full = torch.randn(hkv, L, d, generator=g, device="cuda") * 2.0
    m = neff(block_scores(q_full, k_full, p, num_selectable_blocks(L, p)))[:, 1:]
    kn = int(math.log2(p.block)) + 1
    shares = torch.softmax(torch.randn(hkv, kn, generator=g, device="cuda"), -1).double()
    thr = thresholds_for_shares(m.double(), shares).float()
    keep, counts = select(q_full, k_full, thr, p)
    nb = num_selectable_blocks(L, p)
    k_buf, r2t, row = _pool_for(q_full.cpu(), k_full.cpu(), seed=4)
    js = torch.arange(1, nb, device="cuda")
    q_obs = q_full[:, js * p.block + p.block - 1].permute(1, 0, 2).contiguous()
    res = select_blocks(q_obs, k_buf, r2t, torch.full_like(js, row), js, thr, p.block)
    want = keep[:, p.block: nb * p.block].view(hkv, nb - 1, p.block).transpose(0, 1)
    mismatch = (res.keep != want).any(-1).float().mean().item()
    assert mismatch < 1e-3, f"{mismatch:.2%} of (block, head) selections differ"        # near-ties only
    assert (res.counts != counts[:, 1:].t()).float().mean().item() < 1e-3


def test_observed_end_of_prompt_feeds_attention_end_to_end():
    """The server's question-aware end of prompt, composed as in sglang_tca.serving.backend: slot masks (select_at_slots) ->
    kept lists -> sparse attention for the prompt; observe_request for its last N queries (padded list) -> attention
    for those rows; then a decode step whose kept lists read the observed row. Equals the reference
    (algorithm.prompt_mask / with_observed) row by row, and the observed rows really differ from plain TCA."""
    from sglang_tca.algorithm import prompt_mask, with_observed
    from sglang_tca.kernels.kept_lists import kept_lists_from_bits
    from sglang_tca.serving.selection import observe_request, select_at_slots

    p = TCAParams(block=16, window=64, observe=12)
    hq, hkv, d, L = 4, 2, 32, 303                  # the decode at L compresses one more block (from its slot)
    g = torch.Generator().manual_seed(31)
    q_full = torch.randn(hq, L + 1, d, generator=g)
    k_full = torch.randn(hkv, L + 1, d, generator=g) * 2.0
    v_full = torch.randn(hkv, L + 1, d, generator=g)
    thr = hetero_thresholds(p, hq, hkv, d)
    scale = d ** -0.5
    k_buf, r2t, row = _pool_for(q_full, k_full, seed=32)
    v_buf = torch.zeros_like(k_buf)
    v_buf[r2t[row, :L + 1].long()] = v_full.transpose(0, 1).to(DEV)
    rows = torch.tensor([row], device=DEV)
    bits = torch.zeros(k_buf.shape[0], hkv, dtype=torch.int64, device=DEV)
    select_at_slots(q_full[:, :L].transpose(0, 1).to(DEV), torch.arange(L, device=DEV), r2t[row, :L].long(),
                    torch.full((L,), row, device=DEV), r2t, k_buf, thr.to(DEV), bits, p.block, scale)
    kept_pos = torch.empty((L + 1) * hkv, dtype=torch.int32, device=DEV)
    kept_indptr = kept_lists_from_bits(bits, r2t, rows, torch.tensor([L - 1], device=DEV), p.block, p.window,
                                       kept_pos, L)
    q = q_full[:, :L].transpose(0, 1).contiguous().to(DEV)
    args = dict(k_buffer=k_buf, v_buffer=v_buf, req_to_token=r2t, req_pool_indices=rows, block=p.block,
                window=p.window, sm_scale=scale)
    out = tca_sparse_attention(q=q, q_start_pos=torch.tensor([0], device=DEV),
                               qo_indptr=torch.tensor([0, L], device=DEV), kept_indptr=kept_indptr, kept_pos=kept_pos,
                               **args)
    obs_bits = torch.zeros(r2t.shape[0], r2t.shape[1] // p.block + 1, hkv, dtype=torch.int64, device=DEV)
    kept = observe_request(q[L - p.observe:], k_buf, r2t, rows, L, kept_indptr.diff(), p, scale, obs_bits)
    width = kept.shape[1]
    out[L - p.observe:] = tca_sparse_attention(
        q=q[L - p.observe:], q_start_pos=torch.tensor([L - p.observe], device=DEV),
        qo_indptr=torch.tensor([0, p.observe], device=DEV),
        kept_indptr=torch.arange(hkv + 1, device=DEV, dtype=torch.int32) * width, kept_pos=kept.flatten(), **args)

    keep, _ = select(q_full[:, :L], k_full[:, :L], thr, p)
    mask, observed = prompt_mask(q_full[:, :L], k_full[:, :L], keep, p, scale)
    want = masked_attention(q_full[:, :L], k_full[:, :L], v_full[:, :L], mask, scale)
    torch.testing.assert_close(out.cpu(), want.transpose(0, 1), atol=2e-5, rtol=2e-5)
    plain = masked_attention(q_full[:, :L], k_full[:, :L], v_full[:, :L],
                             visible(keep, torch.arange(L), L, p), scale)
    assert not torch.allclose(plain[:, -1], want[:, -1], atol=1e-3)     # the observed rows see other tokens
    assert torch.equal(observed.sum(-1), keep[:, p.block:dense_start(L, p.block, p.window)].sum(-1))

    # decode step at position L: blocks of the prompt from obs_bits (obs_nb), the rest from the slots
    assert dense_start(L + 1, p.block, p.window) > dense_start(L, p.block, p.window)
    select_at_slots(q_full[:, L:].transpose(0, 1).to(DEV), torch.tensor([L], device=DEV), r2t[row, L:L + 1].long(),
                    rows, r2t, k_buf, thr.to(DEV), bits, p.block, scale)
    obs_nb = torch.zeros(r2t.shape[0], dtype=torch.int32, device=DEV)
    obs_nb[row] = observed.shape[1] // p.block
    kept_indptr = kept_lists_from_bits(bits, r2t, rows, torch.tensor([L], device=DEV), p.block, p.window, kept_pos,
                                       L + 1, observed=(obs_bits, obs_nb))
    out1 = tca_sparse_attention(q=q_full[:, L:].transpose(0, 1).contiguous().to(DEV),
                                q_start_pos=torch.tensor([L], device=DEV), qo_indptr=torch.tensor([0, 1], device=DEV),
                                kept_indptr=kept_indptr, kept_pos=kept_pos, **args)
    keep1 = with_observed(select(q_full, k_full, thr, p)[0], observed, p.block)
    want1 = masked_attention(q_full[:, L:], k_full, v_full, visible(keep1, torch.tensor([L]), L + 1, p), scale)
    torch.testing.assert_close(out1.cpu(), want1.transpose(0, 1), atol=2e-5, rtol=2e-5)
