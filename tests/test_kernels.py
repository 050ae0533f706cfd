"""TCA Triton kernels (sglang_tca.kernels) against the reference semantics of sglang_tca.algorithm, on the server's
memory layout (sglang_tca.serving.sizing.MemoryPlan): one K and one V arena of [rows, D], the compressed store's
pages first, then every layer's dense buffer of [dense slots + one padding page, KV heads] rows.

Each batch puts the sink and the kept tokens of compressed blocks at shuffled store rows (the kept lists), the dense
window at shuffled dense slots of the tested layer's dense buffer (reached through req_to_token and the
logical -> dense map l2d), and NaN in every arena row nothing should read: the dense slots of positions the store
holds or dropped (freed memory, still mapped by l2d), unused store rows, the other layer's dense buffer and the
padding page. Any read of the wrong row shows as NaN.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below before the kernels are
imported) on CPU tensors, in fp32 and fp16 only (bf16 is wrong under the interpreter). With a GPU the same small tests
run compiled on CUDA tensors, and the `gpu`-marked tests add bf16 at realistic sizes (Hq=32, Hkv=8, D=128, 32K).
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

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

from sglang_tca.algorithm import (block_scores, masked_attention, neff, num_selectable_blocks, select,  # noqa: E402
                                  tca_attention, thresholds_for_shares, visible)
from sglang_tca.kernels.compaction import compact_blocks  # noqa: E402
from sglang_tca.kernels.kept_lists import kept_lists  # noqa: E402
from sglang_tca.params import TCAParams, dense_start  # noqa: E402
from sglang_tca.serving.selection import block_end_rows, pack_bits  # noqa: E402
from sglang_tca.serving.sizing import MemoryPlan, ModelDims  # noqa: E402
from sglang_tca.serving.store import CompressedStore  # noqa: E402

tca_sparse_attention = _attn_mod.tca_sparse_attention
tca_sparse_attention_ref = _attn_mod.tca_sparse_attention_ref
select_blocks = _sel_mod.select_blocks

# the interpreter's range() over tensor bounds triggers a NumPy deprecation warning per loop
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PAGE_ROWS = 16                 # rows of a store page in these tests
LAYER = 1                      # the tested layer: layer 0's dense buffer (all NaN) lies between the store and it


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


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def make_plan(block, window, hkv, d, dense_tokens, heap_pages, logical_tokens, layers=2, reservation_rows=1,
              dtype_bytes=4):
    rec = -(-layers * hkv * block // PAGE_ROWS)
    return MemoryPlan(ModelDims(layers, hkv, d, d, dtype_bytes), block, window, dense_tokens, heap_pages,
                      logical_tokens, max_pages_per_record=rec, block_reserve_pages=rec, expected_share=0.5,
                      decode_kept_rows=0, reservation_rows=reservation_rows, budget_bytes=0, page_rows=PAGE_ROWS)


class Batch(NamedTuple):
    args: dict              # tca_sparse_attention's arguments
    expected: torch.Tensor  # [T, Hq, D] from algorithm.select / visible / masked_attention
    lens: torch.Tensor      # [bs, Hkv] kept tokens of compressed blocks (the sink not counted)
    seqs: list              # per request (q_full [Hq, L, D], k_full, v_full [Hkv, L, D]) on the host


def make_batch(reqs, p, hq, hkv, d, dtype, thresholds, seed=0, device=DEV) -> Batch:
    """A packed batch on the server's layout. reqs: [(q_start, q_len)], the request's queries are positions
    q_start .. q_start + q_len - 1 (decode: q_len = 1). Selection is algorithm.select on the full sequence (per KV
    head). Each request's kept list (the sink, then the kept tokens of its compressed blocks, ascending) sits at
    shuffled store rows; positions from dense_start(q_start + 1) on sit at shuffled dense slots of layer LAYER; the
    dense slots below (freed: the store holds or dropped those tokens) and every other row are NaN. A request shorter
    than one block has nothing in the store: all its keys are dense."""
    g = torch.Generator().manual_seed(seed)
    b, w = p.block, p.window
    Ls = [s + n for s, n in reqs]
    n_lp = sum(-(-L // b) for L in Ls) + 2
    dense_tokens = _round_up(sum(Ls), b)
    heap_pages = 2 * _round_up(2 * sum(Ls) * hkv, PAGE_ROWS) // PAGE_ROWS + 2       # room to spread rows out
    plan = make_plan(b, w, hkv, d, dense_tokens, heap_pages, n_lp * b)
    base = plan.dense_base(LAYER)
    arena_k = torch.full((plan.arena_rows, d), float("nan"), dtype=dtype)
    arena_v = torch.full((plan.arena_rows, d), float("nan"), dtype=dtype)
    store_free = (torch.randperm((heap_pages - 1) * PAGE_ROWS, generator=g) + PAGE_ROWS).tolist()  # page 0: trash
    dense_free = (torch.randperm(dense_tokens, generator=g) + b).tolist()           # dense page 0: padding
    lpages = (torch.randperm(n_lp - 1, generator=g) + 1).tolist()                    # logical page 0: padding
    l2d = torch.zeros((n_lp + 1) * b, dtype=torch.int64)
    rows = (torch.randperm(len(reqs) + 2, generator=g)[: len(reqs)] + 1).tolist()   # row 0 is padding
    r2t = torch.zeros(len(reqs) + 3, max(Ls) + 37, dtype=torch.int32)
    scale = d ** -0.5
    qs, outs, kept_row, kept_pos, lens, seqs = [], [], [], [], [], []
    for (s, n), L, row in zip(reqs, Ls, rows):
        t = torch.arange(L)
        pages = torch.tensor([lpages.pop() for _ in range(-(-L // b))])
        lid = pages[t // b] * b + t % b                                               # a block is a logical page
        r2t[row, :L] = lid.int()
        slots = torch.tensor([dense_free.pop() for _ in range(L)])
        l2d[lid] = slots
        q_full = torch.randn(hq, L, d, generator=g).to(dtype)
        k_full = (torch.randn(hkv, L, d, generator=g) * 2.0).to(dtype)
        v_full = torch.randn(hkv, L, d, generator=g).to(dtype)
        lo = 0 if L < b else dense_start(s + 1, b, w)                                # the chunk's dense range
        dense_rows = base + slots[lo:, None] * hkv + torch.arange(hkv)
        arena_k[dense_rows] = k_full[:, lo:].transpose(0, 1)
        arena_v[dense_rows] = v_full[:, lo:].transpose(0, 1)
        keep, _ = select(q_full.float(), k_full.float(), thresholds, p)
        ds = dense_start(L, b, w)
        lens.append([])
        for h in range(hkv):
            kp = torch.nonzero(keep[h]).flatten()
            comp = kp[(kp >= b) & (kp < ds)]
            lens[-1].append(comp.numel())
            pos = torch.zeros(0, dtype=torch.long)
            if L >= b:
                pos = torch.cat([torch.arange(b), comp])
            rws = torch.tensor([store_free.pop() for _ in range(pos.numel())], dtype=torch.long)
            arena_k[rws] = k_full[h, pos]
            arena_v[rws] = v_full[h, pos]
            kept_row.append(rws.int())
            kept_pos.append(pos.int())
        qpos = torch.arange(s, L)
        outs.append(masked_attention(q_full[:, s:], k_full, v_full, visible(keep, qpos, L, p), scale).transpose(0, 1))
        qs.append(q_full[:, s:].transpose(0, 1))
        seqs.append((q_full, k_full, v_full))
    args = dict(
        q=torch.cat(qs).contiguous(), arena_k=arena_k, arena_v=arena_v, dense_base=base, num_kv_heads=hkv, l2d=l2d,
        req_to_token=r2t, req_pool_indices=torch.tensor(rows, dtype=torch.int64),
        q_start_pos=torch.tensor([s for s, _ in reqs], dtype=torch.int32),
        qo_indptr=torch.tensor([0] + [n for _, n in reqs]).cumsum(0).int(),
        kept_indptr=torch.tensor([0] + [len(x) for x in kept_row]).cumsum(0).int(),
        kept_row=torch.cat(kept_row).int(), kept_pos=torch.cat(kept_pos).int(),
        block=b, window=w, sm_scale=scale,
    )
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    return Batch(args, torch.cat(outs).to(device), torch.tensor(lens), seqs)


def decode_args(args):
    """The same batch as decode runs it: no positions, every kept key visible."""
    return {**args, "kept_pos": None}


# b=16, w=64: nothing is compressed below w + 2b = 96 tokens.
P = TCAParams(block=16, window=64)
MIXED = [(0, 70),      # shorter than w + 2b: the sink from the store, the rest dense
         (299, 1),     # decode-style single query at position 299
         (150, 90),    # chunk starting mid-block (150 = 9*16 + 6) after a 150-token prefix
         (0, 200),     # full prefill: compressed blocks appear inside the chunk
         (0, 11),      # shorter than one block: everything dense, nothing in the store
         (3, 20)]      # the sink completes inside the chunk: its earlier queries read it from the store too


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mixed_batch_matches_reference(dtype):
    hq, hkv, d = 6, 2, 32                                      # G = 3: rows of a tile are not a power of two
    thr = hetero_thresholds(P, hq, hkv, d)
    batch = make_batch(MIXED, P, hq, hkv, d, dtype, thr, seed=1)
    args, expected, lens = batch.args, batch.expected, batch.lens
    assert lens[[0, 4, 5]].sum() == 0 and (lens[1:4, 0] != lens[1:4, 1]).all()   # heads keep different amounts
    assert args["kept_indptr"].diff().view(-1, hkv)[4].sum() == 0                  # the short request: no list
    assert torch.isnan(args["arena_k"]).float().mean() > 0.5                       # most rows are poison
    out = tca_sparse_attention(**args)
    torch.testing.assert_close(out, expected, atol=TOL[dtype], rtol=TOL[dtype])
    ref = tca_sparse_attention_ref(**args)
    torch.testing.assert_close(ref, expected, atol=TOL[dtype], rtol=TOL[dtype])
    # sparse really differs from dense somewhere (so the test can fail)
    dense = make_batch(MIXED, P, hq, hkv, d, dtype, keep_all_thresholds(P, hkv), seed=1).expected
    assert (dense - expected).abs().max() > 1e-2


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (128, 32)])
def test_tile_shapes_and_gqa4(block_m, block_n):
    hq, hkv, d = 8, 2, 16                                      # G = 4
    thr = hetero_thresholds(P, hq, hkv, d, seed=7)
    batch = make_batch([(0, 130), (211, 1), (97, 45), (2, 9)], P, hq, hkv, d, torch.float32, thr, seed=2)
    out = tca_sparse_attention(**batch.args, block_m=block_m, block_n=block_n)
    torch.testing.assert_close(out, batch.expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("block_m,splits", [(16, 1), (16, 3), (64, 2)])
def test_dense_keys_every_row_sees_run_unmasked(block_m, splits):
    """block_n 16 < the window: each tile's dense keys that all its rows see (ds_last .. first query) fill whole
    unmasked steps between masked ones, also when KV splits cut the list anywhere; poisoned rows stay unread."""
    hq, hkv, d = 6, 2, 32
    thr = hetero_thresholds(P, hq, hkv, d, seed=9)
    batch = make_batch(MIXED, P, hq, hkv, d, torch.float32, thr, seed=9)
    out = tca_sparse_attention(**batch.args, block_m=block_m, block_n=16, num_kv_splits=splits)
    torch.testing.assert_close(out, batch.expected, atol=2e-5, rtol=2e-5)


def test_keep_all_equals_dense_causal():
    hq, hkv, d = 4, 2, 32
    batch = make_batch(MIXED, P, hq, hkv, d, torch.float32, keep_all_thresholds(P, hkv), seed=3)
    args = batch.args
    out = tca_sparse_attention(**args)
    qo = args["qo_indptr"].tolist()
    for r, ((s, n), (q_full, k_full, v_full)) in enumerate(zip(MIXED, batch.seqs)):
        L = s + n
        k = k_full.repeat_interleave(hq // hkv, 0).to(DEV)
        v = v_full.repeat_interleave(hq // hkv, 0).to(DEV)
        q = args["q"][qo[r]:qo[r + 1]].transpose(0, 1)
        causal = torch.arange(L, device=q.device)[None, :] <= torch.arange(s, L, device=q.device)[:, None]
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=d ** -0.5)
        torch.testing.assert_close(out[qo[r]:qo[r + 1]], ref.transpose(0, 1), atol=2e-5, rtol=2e-5)
    assert batch.lens[3].tolist() == [dense_start(200, 16, 64) - 16] * hkv


def test_kv_splits_and_decode_without_positions():
    """Split-KV (+ merge kernel) equals the unsplit kernel, with positions and, for a decode batch, without them
    (kept_pos None: every kept key visible), including a request of exactly one block (all keys in the store) and one
    shorter than a block (all dense)."""
    hq, hkv, d = 4, 2, 32
    thr = hetero_thresholds(P, hq, hkv, d, seed=5)
    batch = make_batch([(299, 1), (40, 1), (180, 3)], P, hq, hkv, d, torch.float32, thr, seed=4)
    for splits in (1, 3):
        out = tca_sparse_attention(**batch.args, num_kv_splits=splits)
        torch.testing.assert_close(out, batch.expected, atol=2e-5, rtol=2e-5)
    dec = make_batch([(299, 1), (40, 1), (15, 1), (5, 1), (130, 1)], P, hq, hkv, d, torch.float32, thr, seed=8)
    assert dec.args["kept_indptr"].diff().view(-1, hkv)[3].sum() == 0
    for splits in (1, 3):
        out = tca_sparse_attention(**decode_args(dec.args), num_kv_splits=splits, max_q_len=1)
        torch.testing.assert_close(out, dec.expected, atol=2e-5, rtol=2e-5)


def dense_table(args, window_cols):
    """The per-batch table of the backend's decode (TCAAttnBackend._set_decode_metadata): per request the dense
    slots of positions dense_first .. dense_first + window_cols - 1 (dense_first = dense_start(n), 0 below a
    block), through req_to_token and l2d, positions clamped to req_to_token's width."""
    b, w, r2t, l2d = args["block"], args["window"], args["req_to_token"], args["l2d"]
    n = args["q_start_pos"].long() + 1
    first = torch.where(n >= b, dense_start(n, b, w), 0)
    pos = (first[:, None] + torch.arange(window_cols, device=n.device)).clamp(max=r2t.shape[1] - 1)
    return l2d[r2t[args["req_pool_indices"][:, None], pos].long()], first.int()


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_decode_reads_the_dense_slot_table():
    """With dense_slots / dense_first (decode under CUDA graphs: SGLang may rewrite req_to_token and l2d while a
    graph replays) the window's keys come from the table alone: the shared tables zeroed, the output is unchanged."""
    hq, hkv, d = 4, 2, 32
    thr = hetero_thresholds(P, hq, hkv, d, seed=5)
    dec = make_batch([(299, 1), (40, 1), (15, 1), (5, 1), (130, 1)], P, hq, hkv, d, torch.float32, thr, seed=8)
    slots, first = dense_table(dec.args, P.window + P.block)
    args = {**decode_args(dec.args), "req_to_token": torch.zeros_like(dec.args["req_to_token"]),
            "l2d": torch.zeros_like(dec.args["l2d"])}                 # slot 0: the (NaN) padding page
    assert tca_sparse_attention(**args, max_q_len=1).isnan().any()   # without the table: garbage
    for splits in (1, 3):
        out = tca_sparse_attention(**args, dense_slots=slots, dense_first=first, max_q_len=1, num_kv_splits=splits)
        torch.testing.assert_close(out, dec.expected, atol=2e-5, rtol=2e-5)


def test_long_kept_list_search():
    """A kept list longer than the search's 1024-entry sample (both search levels) and a multi-tile chunk whose
    earlier tiles see fewer compressed blocks than the last one."""
    p = TCAParams(block=16, window=64)
    hq, hkv, d = 2, 1, 16
    batch = make_batch([(2470, 40)], p, hq, hkv, d, torch.float32, keep_all_thresholds(p, hkv), seed=6)
    assert batch.args["kept_row"].numel() > 1024
    out = tca_sparse_attention(**batch.args, block_m=16)
    torch.testing.assert_close(out, batch.expected, atol=2e-5, rtol=2e-5)


def test_selection_feeds_attention_end_to_end():
    """The Triton selection on the store: a prompt's prefill in one chunk, then a decode step that ends a block, two
    layers. Per layer: select_blocks (kernels.selection) on every block-end token -> masks in the store's
    records -> compact_blocks -> kept_lists -> tca_sparse_attention == algorithm.tca_attention. Before the decode
    step the dense slots of every position below its dense start are freed (NaN, l2d -> 0): it reads the compressed
    blocks, one of them compressed only now, from the store alone."""
    p = TCAParams(block=16, window=64)
    b, w = p.block, p.window
    hq, hkv, d, layers = 4, 2, 32, 2
    L = 271                                                                # the decode at 271 ends block 16
    assert (L + 1) % b == 0 and dense_start(L + 1, b, w) > dense_start(L, b, w)
    g = torch.Generator().manual_seed(21)
    q_full = torch.randn(layers, hq, L + 1, d, generator=g)
    k_full = torch.randn(layers, hkv, L + 1, d, generator=g) * 2.0
    v_full = torch.randn(layers, hkv, L + 1, d, generator=g)
    thr = [hetero_thresholds(p, hq, hkv, d, seed=40 + l) for l in range(layers)]
    n_blk = (L + 1) // b
    plan = make_plan(b, w, hkv, d, dense_tokens=_round_up(L + 1, b) + 2 * b, heap_pages=4 * (n_blk + 2) + 1,
                     logical_tokens=(n_blk + 4) * b, layers=layers, reservation_rows=n_blk + 1)
    store = CompressedStore(plan, DEV, chunk_tokens=L)
    arena_k = torch.full((plan.arena_rows, d), float("nan"), device=DEV)
    arena_v = torch.full((plan.arena_rows, d), float("nan"), device=DEV)
    pages = torch.randperm(plan.logical_pages, generator=g)[:n_blk] + 1
    t = torch.arange(L + 1)
    lid = pages[t // b] * b + t % b
    row = 2
    r2t = torch.zeros(4, L + 9, dtype=torch.int32)
    r2t[row, :L + 1] = lid.int()
    l2d = torch.zeros(plan.logical_tokens + b, dtype=torch.int64)
    l2d[lid] = torch.randperm(plan.dense_tokens, generator=g)[:L + 1] + b
    r2t, l2d = r2t.to(DEV), l2d.to(DEV)
    rows = torch.tensor([row], device=DEV)

    def dense(arena, l):
        base = plan.dense_base(l)
        return arena[base: base + (plan.dense_tokens + b) * hkv].view(-1, hkv, d)

    def forward(start, n, decode):
        pos = torch.arange(start, start + n)
        dl = l2d[lid[pos].to(DEV)]
        ends, end_pos = block_end_rows([start], [n], b)
        pending = store.begin_forward([e < b for e in end_pos], list(range(len(ends))))
        rec_page = (lid[end_pos] // b).to(DEV)
        slot_of = torch.arange(len(ends), device=DEV)
        outs = []
        for l in range(layers):
            dense(arena_k, l)[dl] = k_full[l, :, start:start + n].transpose(0, 1).to(DEV)
            dense(arena_v, l)[dl] = v_full[l, :, start:start + n].transpose(0, 1).to(DEV)
            q_end = q_full[l][:, end_pos].transpose(0, 1).contiguous().to(DEV)
            select_blocks(q_end, torch.tensor(end_pos, device=DEV), rec_page, l2d, dense(arena_k, l), thr[l],
                          store.mask, b, l, d ** -0.5, check_pos=decode)
            compact_blocks(arena_k, arena_v, l2d, rec_page, slot_of, store, l, plan.dense_base(l), b,
                           positions=torch.tensor(end_pos, device=DEV) if decode else None)
            kept_row = torch.full(((start + n) * hkv,), -1, dtype=torch.int32, device=DEV)
            kept_pos = None if decode else torch.full_like(kept_row, -1)
            last = torch.tensor([start + n - 1], device=DEV)
            indptr = kept_lists(store, l, r2t, rows, last, w, kept_row, start + n, kept_pos)
            outs.append(tca_sparse_attention(q_full[l][:, start:start + n].transpose(0, 1).contiguous().to(DEV),
                                             arena_k, arena_v, plan.dense_base(l), hkv, l2d, r2t, rows,
                                             torch.tensor([start], device=DEV), torch.tensor([0, n], device=DEV),
                                             indptr, kept_row, kept_pos, b, w, d ** -0.5, max_q_len=n))
        store.end_forward(pending)
        store.settle(pending)
        store.check()
        return outs

    outs = forward(0, L, decode=False)
    assert store.n_records == L // b
    for l in range(layers):
        want = tca_attention(q_full[l, :, :L], k_full[l, :, :L], v_full[l, :, :L], thr[l], p)     # [Hq, L, D]
        torch.testing.assert_close(outs[l].cpu(), want.transpose(0, 1), atol=2e-5, rtol=2e-5)
    freed = lid[:dense_start(L + 1, b, w)].to(DEV)                         # out of the decode's window
    for l in range(layers):
        for arena in (arena_k, arena_v):
            dense(arena, l)[l2d[freed]] = float("nan")
    l2d[freed] = 0
    outs = forward(L, 1, decode=True)
    assert store.n_records == (L + 1) // b
    for l in range(layers):
        want = tca_attention(q_full[l], k_full[l], v_full[l], thr[l], p, q_start=L)
        torch.testing.assert_close(outs[l].cpu(), want.transpose(0, 1), atol=2e-5, rtol=2e-5)
        assert not torch.allclose(want, masked_attention(q_full[l, :, L:], k_full[l], v_full[l], torch.ones(
            hkv, 1, L + 1, dtype=torch.bool), d ** -0.5), atol=1e-3)       # the dropped tokens mattered


# ---------------------------------------------------------------------------------------------------------------
# GPU: bf16 at realistic sizes (Llama-3.1-8B-like heads, 32K context) on the server's layout. Kept lists are random
# (~30% of each compressed block, heads differ) so that building them is cheap; the semantics do not depend on how
# they were chosen. As in make_batch: the sink and kept tokens at shuffled store rows, the dense range at shuffled
# dense slots of layer LAYER, NaN in every other row (freed dense slots of stored or dropped positions included).

def _random_batch_gpu(reqs, hq=32, hkv=8, d=128, b=64, w=1024, dtype=torch.bfloat16, seed=0, keep_share=0.3):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(seed)
    Ls = [s + n for s, n in reqs]
    n_lp = sum(-(-L // b) for L in Ls) + 2
    dense_tokens = _round_up(sum(Ls), b)
    lists = []                                                                       # (request, head) positions
    for (s, n), L in zip(reqs, Ls):
        ds = dense_start(L, b, w)
        for h in range(hkv):
            if L < b:
                lists.append(torch.zeros(0, dtype=torch.long, device=dev))
                continue
            t = torch.arange(b, ds, device=dev)
            keep = torch.rand(t.numel(), generator=g, device=dev) < keep_share * (0.5 + h / hkv)   # heads differ
            lists.append(torch.cat([torch.arange(b, device=dev), t[keep]]))
    n_kept = sum(x.numel() for x in lists)
    heap_pages = _round_up(2 * n_kept, PAGE_ROWS) // PAGE_ROWS + 2
    plan = make_plan(b, w, hkv, d, dense_tokens, heap_pages, n_lp * b, dtype_bytes=2)
    base = plan.dense_base(LAYER)
    arena_k = torch.full((plan.arena_rows, d), float("nan"), dtype=dtype, device=dev)
    arena_v = torch.full_like(arena_k, float("nan"))
    store_rows = torch.randperm((heap_pages - 1) * PAGE_ROWS, generator=g, device=dev)[:n_kept] + PAGE_ROWS
    dense_slots = torch.randperm(dense_tokens, generator=g, device=dev) + b
    lpages = torch.randperm(n_lp - 1, generator=g, device=dev) + 1
    l2d = torch.zeros((n_lp + 1) * b, dtype=torch.int64, device=dev)
    r2t = torch.zeros(len(reqs) + 1, max(Ls) + 64, dtype=torch.int32, device=dev)
    kept_row, off_rows, off_slots, off_pages = [], 0, 0, 0
    for r, ((s, n), L) in enumerate(zip(reqs, Ls)):
        nblk = -(-L // b)
        t = torch.arange(L, device=dev)
        lid = lpages[off_pages:off_pages + nblk][t // b] * b + t % b
        off_pages += nblk
        r2t[r + 1, :L] = lid.int()
        slots = dense_slots[off_slots:off_slots + L]
        off_slots += L
        l2d[lid] = slots
        k_full = torch.randn(hkv, L, d, generator=g, device=dev).to(dtype)
        v_full = torch.randn(hkv, L, d, generator=g, device=dev).to(dtype)
        lo = 0 if L < b else dense_start(s + 1, b, w)
        dense_rows = base + slots[lo:, None] * hkv + torch.arange(hkv, device=dev)
        arena_k[dense_rows] = k_full[:, lo:].transpose(0, 1)
        arena_v[dense_rows] = v_full[:, lo:].transpose(0, 1)
        for h in range(hkv):
            pos = lists[r * hkv + h]
            rws = store_rows[off_rows:off_rows + pos.numel()]
            off_rows += pos.numel()
            arena_k[rws] = k_full[h, pos]
            arena_v[rws] = v_full[h, pos]
            kept_row.append(rws)
    q = torch.randn(sum(n for _, n in reqs), hq, d, generator=g, device=dev).to(dtype)
    return dict(q=q, arena_k=arena_k, arena_v=arena_v, dense_base=base, num_kv_heads=hkv, l2d=l2d,
                req_to_token=r2t, req_pool_indices=torch.arange(1, len(reqs) + 1, device=dev),
                q_start_pos=torch.tensor([s for s, _ in reqs], device=dev, dtype=torch.int32),
                qo_indptr=torch.tensor([0] + [n for _, n in reqs], device=dev).cumsum(0).int(),
                kept_indptr=torch.tensor([0] + [len(x) for x in lists], device=dev).cumsum(0).int(),
                kept_row=torch.cat(kept_row).int(), kept_pos=torch.cat(lists).int(), block=b, window=w,
                sm_scale=d ** -0.5)


@pytest.mark.gpu
@needs_gpu
def test_gpu_bf16_decode_32k():
    reqs = [(32767, 1), (8191, 1), (1000, 1), (20000, 1), (2100, 1), (40, 1)]
    args = _random_batch_gpu(reqs, seed=1)
    ref = tca_sparse_attention_ref(**args)
    assert not ref.isnan().any()
    slots, first = dense_table(args, args["window"] + args["block"])
    for splits in (None, 1):
        for kept_pos in (args["kept_pos"], None):                  # decode: every kept key visible
            out = tca_sparse_attention(**{**args, "kept_pos": kept_pos}, max_q_len=1, num_kv_splits=splits)
            torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
        out = tca_sparse_attention(**{**args, "kept_pos": None}, dense_slots=slots, dense_first=first, max_q_len=1,
                                   num_kv_splits=splits)          # the backend's decode, its per-batch table
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_gpu
def test_gpu_bf16_extend_32k():
    reqs = [(32768 - 512, 512), (0, 4096), (5000, 300), (700, 1), (0, 50)]
    args = _random_batch_gpu(reqs, seed=2)
    ref = tca_sparse_attention_ref(**args)
    assert not ref.isnan().any()
    out = tca_sparse_attention(**args, max_q_len=4096)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_gpu
def test_gpu_select_blocks_32k():
    """The selection kernel in bf16 at Llama-3.1-8B's heads over 32K: every block-end token of a prompt (shuffled
    logical pages and dense slots) against algorithm.select on the same bf16 values in fp32; then a decode-shaped
    launch (every row runs, check_pos) writes exactly the rows that end a block."""
    p = TCAParams(block=64, window=1024)
    hq, hkv, d, L, layer, layers = 32, 8, 128, 32768, 3, 4
    b = p.block
    g = torch.Generator(device="cuda").manual_seed(3)
    q_full = torch.randn(hq, L, d, generator=g, device="cuda").bfloat16()
    k_full = (torch.randn(hkv, L, d, generator=g, device="cuda") * 2.0).bfloat16()
    m = neff(block_scores(q_full.float(), k_full.float(), p, num_selectable_blocks(L, p)))[:, 1:]
    kn = int(math.log2(b)) + 1
    shares = torch.softmax(torch.randn(hkv, kn, generator=g, device="cuda"), -1).double()
    thr = thresholds_for_shares(m.double(), shares).float()
    keep, counts = select(q_full.float(), k_full.float(), thr, p)
    nb = L // b
    pages = torch.randperm(2 * nb, generator=g, device="cuda")[:nb] + 1
    l2d = torch.zeros((2 * nb + 1) * b, dtype=torch.int64, device="cuda")
    t = torch.arange(L, device="cuda")
    lid = pages[t // b] * b + t % b
    l2d[lid] = torch.randperm(L + 2 * b, generator=g, device="cuda")[:L] + b
    k_dense = torch.full((L + 3 * b, hkv, d), float("nan"), dtype=torch.bfloat16, device="cuda")
    k_dense[l2d[lid]] = k_full.transpose(0, 1)
    mask = torch.zeros(2 * nb + 1, layers, hkv, dtype=torch.int64, device="cuda")
    ends = t[b - 1::b]
    select_blocks(q_full[:, ends].transpose(0, 1).contiguous(), ends, pages, l2d, k_dense, thr, mask, b, layer,
                  d ** -0.5)
    want = pack_bits(keep.view(hkv, nb, b)).t()                                            # [nb, Hkv]
    differ = (mask[pages, layer] != want).float().mean().item()
    assert differ < 1e-3, f"{differ:.2%} of (block, head) selections differ"                # near-ties only
    assert (mask[pages[0], layer] == -1).all() and (counts[:, 1:] < b).any()                # sink; some pruning
    assert not mask[:, [x for x in range(layers) if x != layer]].any()
    # decode shape: the last 64 positions in one launch; only the one that ends a block writes
    mask.zero_()
    rows = t[L - 64:]
    select_blocks(q_full[:, rows].transpose(0, 1).contiguous(), rows, lid[rows] // b, l2d, k_dense, thr, mask, b,
                  layer, d ** -0.5, check_pos=True)
    written = mask.ne(0).any(-1).any(-1).nonzero().flatten().tolist()
    assert written == [int(pages[-1])] and torch.equal(mask[pages[-1], layer], want[-1])
