"""The server's TCA pipeline on freed memory, end to end on CPU (Triton kernels under the interpreter):
select_blocks -> compact_blocks -> kept_lists -> tca_sparse_attention over the compressed store and the dense pool,
forward by forward, against the reference (sglang_tca.algorithm). The dense slots of blocks that left the window are
freed as SGLang's hybrid-SWA rules free them, poisoned with NaN and handed to later tokens, so any read of a dropped
or freed key shows; the store's accounting settles after every forward and is checked."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sglang_tca.algorithm import masked_attention, prompt_mask, select, visible, with_observed
from sglang_tca.kernels.compaction import compact_blocks
from sglang_tca.kernels.kept_lists import kept_lists
from sglang_tca.kernels.selection import select_blocks
from sglang_tca.kernels.sparse_attention import tca_sparse_attention
from sglang_tca.params import TCAParams, dense_start
from sglang_tca.serving.observe import ObservingPrompt, observe_layer, rebuild
from sglang_tca.serving.selection import block_end_rows, unpack_bits
from sglang_tca.serving.sizing import MemoryPlan, ModelDims
from sglang_tca.serving.store import CompressedStore

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

B, W, LAYERS, HQ, HKV, D = 8, 32, 2, 4, 2, 16
PAGE_ROWS = 8                          # small store pages, so records span pages and reservations get refunds
SWA_WINDOW = W + B                     # what the server gives SGLang's hybrid-SWA machinery


def thresholds(seed=0):
    """[layers, Hkv, Kn-1] per-head thresholds on n_eff that keep different amounts per layer and head."""
    kn = int(math.log2(B)) + 1
    base = torch.linspace(1.5, 7.0, kn - 1)
    return torch.stack([torch.stack([base * (0.6 + 0.25 * h + 0.3 * l) for h in range(HKV)]) for l in range(LAYERS)])


def keep_all_thresholds():
    return torch.full((LAYERS, HKV, int(math.log2(B))), -math.inf)


def make_plan(logical_pages=80, dense_pages=40, heap_pages=200, reservation_rows=64):
    dims = ModelDims(LAYERS, HKV, D, D, 4)
    return MemoryPlan(dims, B, W, dense_pages * B, heap_pages, logical_pages * B,
                      max_pages_per_record=LAYERS * HKV * B // PAGE_ROWS,
                      block_reserve_pages=LAYERS * HKV * B // PAGE_ROWS, expected_share=0.5,
                      decode_kept_rows=0, reservation_rows=reservation_rows, budget_bytes=0, page_rows=PAGE_ROWS)


class FakeServer:
    """Logical pages, dense pages (one per block, as SGLang's paged hybrid-SWA allocator with page size = block),
    the logical->dense map, req_to_token and the arena, driven like the backend drives them."""

    def __init__(self, thr, policy="tca", rows=4, ctx=512, seed=0, **plan_kw):
        self.plan = make_plan(**plan_kw)
        self.store = CompressedStore(self.plan, "cpu", chunk_tokens=64)
        g = torch.Generator().manual_seed(seed)
        self.free_lp = (torch.randperm(self.plan.logical_pages, generator=g) + 1).tolist()
        self.free_dp = (torch.randperm(self.plan.dense_tokens // B, generator=g) + 1).tolist()
        self.arena_k = torch.full((self.plan.arena_rows, D), float("nan"))
        self.arena_v = torch.full((self.plan.arena_rows, D), float("nan"))
        self.l2d = torch.zeros(self.plan.logical_tokens + B + 1, dtype=torch.int64)
        self.r2t = torch.zeros(rows, ctx, dtype=torch.int32)
        self.len = [0] * rows
        self.dense_from = [0] * rows            # positions below this have their dense slots freed
        self.owned_from = [0] * rows            # positions below this belong to another request (shared prefix)
        self.thr, self.policy = thr, policy
        self.p = TCAParams(B, W, policy=policy)
        self.seqs = {}                          # row -> (q, k, v) of every layer, [layers, heads, ctx, D]
        self.hold_dense = set()                 # rows whose prompt observes: nothing freed until its last forward
        self.observed = {}                      # row -> per layer, its prompt's observed choice (the reference's)
        self.gen = torch.Generator().manual_seed(seed + 1)

    def dense_k(self, layer):
        b = self.plan.dense_base(layer)
        return self.arena_k[b:b + (self.plan.dense_tokens + B) * HKV].view(-1, HKV, D)

    def dense_v(self, layer):
        b = self.plan.dense_base(layer)
        return self.arena_v[b:b + (self.plan.dense_tokens + B) * HKV].view(-1, HKV, D)

    def new_sequence(self, row, n_max=400):
        g = self.gen
        self.seqs[row] = (torch.randn(LAYERS, HQ, n_max, D, generator=g), torch.randn(LAYERS, HKV, n_max, D, generator=g) * 2,
                          torch.randn(LAYERS, HKV, n_max, D, generator=g))

    def share_prefix(self, src, dst, m):
        """Request `dst` starts with the first m tokens (a multiple of the block) of `src`: a radix-cache hit."""
        assert m % B == 0
        q, k, v = self.seqs[src]
        self.seqs[dst] = tuple(x.clone() for x in (q, k, v))
        self.gen.manual_seed(dst + 99)
        for x, scale in zip(self.seqs[dst], (1, 2, 1)):                 # new tokens after the prefix
            x[:, :, m:] = torch.randn(x[:, :, m:].shape, generator=self.gen) * scale
        self.r2t[dst, :m] = self.r2t[src, :m]
        self.len[dst], self.dense_from[dst], self.owned_from[dst] = m, self.dense_from[src], m

    def _alloc(self, row, start, n):
        for t in range(start, start + n):
            if t % B == 0:
                lp, dp = self.free_lp.pop(), self.free_dp.pop()
                self._pages = getattr(self, "_pages", {})
                self._pages[(row, t // B)] = (lp, dp)
            lp, dp = self._pages[(row, t // B)]
            self.r2t[row, t] = lp * B + t % B
            self.l2d[lp * B + t % B] = dp * B + t % B

    def free_out_of_window(self, row):
        """SGLang's rule: a request keeps the last SWA_WINDOW tokens dense (at page granularity); an observing
        prompt keeps everything until its last forward."""
        if row in self.hold_dense:
            return
        upto = (max(self.len[row] - SWA_WINDOW, 0) // B) * B
        for t0 in range(max(self.dense_from[row], self.owned_from[row]), upto, B):
            lids = self.r2t[row, t0:t0 + B].long()
            slots = self.l2d[lids]
            for l in range(LAYERS):
                self.dense_k(l)[slots] = float("nan")
                self.dense_v(l)[slots] = float("nan")
            self.l2d[lids] = 0
            self.free_dp.insert(0, int(slots[0]) // B)
        self.dense_from[row] = max(self.dense_from[row], upto)

    def forward(self, batch, decode=False, observe=0):
        """Run one forward over [(row, n_new_tokens)]; returns the max abs error against the reference. With
        observe = N, the prompts of the rows in `hold_dense` end in this forward and observe (serving.observe)."""
        starts = [self.len[r] for r, _ in batch]
        for (r, n), s in zip(batch, starts):
            self._alloc(r, s, n)
        pos = torch.cat([torch.arange(s, s + n) for (r, n), s in zip(batch, starts)])
        rows_of = torch.cat([torch.full((n,), r) for r, n in batch])
        loc = torch.cat([self.r2t[r, s:s + n].long() for (r, n), s in zip(batch, starts)])
        ends, _ = block_end_rows(starts, [n for _, n in batch], B)
        if decode:                                      # every row runs; the kernels skip rows that end no block
            sel = torch.arange(len(batch))
            slots = [i for i in ends]
        else:
            sel = torch.tensor(ends, dtype=torch.long)
            slots = list(range(len(ends)))
        pending = self.store.begin_forward([bool(pos[i] < B) for i in ends], slots)
        rec_page = loc[sel] // B
        slot_of = torch.tensor(slots if not decode else list(range(len(batch))), dtype=torch.int64)
        if decode and pending is not None:
            keep_rows = set(slots)
            for i in range(len(batch)):                 # rows that end no block point at the trash page
                if i not in keep_rows:
                    self.store.res_pages[i] = 0
        qo = torch.tensor([0] + [n for _, n in batch]).cumsum(0).int()
        err = 0.0
        p_obs = TCAParams(B, W, policy=self.policy, observe=observe)
        prompts = [ObservingPrompt(r, s + n, int(qo[i + 1])) for i, ((r, n), s) in enumerate(zip(batch, starts))
                   if observe and r in self.hold_dense]
        rebuilt = None
        for l in range(LAYERS):
            q = torch.cat([self.seqs[r][0][l, :, s:s + n].transpose(0, 1) for (r, n), s in zip(batch, starts)])
            k = torch.cat([self.seqs[r][1][l, :, s:s + n].transpose(0, 1) for (r, n), s in zip(batch, starts)])
            v = torch.cat([self.seqs[r][2][l, :, s:s + n].transpose(0, 1) for (r, n), s in zip(batch, starts)])
            dloc = self.l2d[loc]
            self.dense_k(l)[dloc] = k
            self.dense_v(l)[dloc] = v
            select_blocks(q[sel].contiguous(), pos[sel], rec_page, self.l2d, self.dense_k(l), self.thr[l],
                          self.store.mask, B, l, D ** -0.5, self.policy, torch.arange(HKV),
                          check_pos=decode)
            compact_blocks(self.arena_k, self.arena_v, self.l2d, rec_page, slot_of, self.store, l,
                           self.plan.dense_base(l), B, positions=pos[sel] if decode else None)
            last = torch.tensor([s + n - 1 for (r, n), s in zip(batch, starts)])
            rows = torch.tensor([r for r, _ in batch])
            cap = sum(s + n for (r, n), s in zip(batch, starts)) * HKV + 1
            kept_row = torch.full((cap,), -1, dtype=torch.int32)
            kept_pos = None if decode else torch.full((cap,), -1, dtype=torch.int32)
            indptr = kept_lists(self.store, l, self.r2t, rows, last, W, kept_row, int(last.max()) + 1, kept_pos)
            out = tca_sparse_attention(q, self.arena_k, self.arena_v, self.plan.dense_base(l), HKV, self.l2d,
                                       self.r2t, rows, torch.tensor(starts), qo, indptr, kept_row, kept_pos, B, W,
                                       D ** -0.5)
            for prompt in prompts:
                observe_layer(q, out, l, prompt, store=self.store, arena_k=self.arena_k, arena_v=self.arena_v,
                              dense_base=self.plan.dense_base(l), l2d=self.l2d, req_to_token=self.r2t, p=p_obs,
                              scale=D ** -0.5)
            if prompts and l == LAYERS - 1:
                rebuilt = rebuild(prompts, store=self.store, arena_k=self.arena_k, arena_v=self.arena_v,
                                  dense_bases=[self.plan.dense_base(x) for x in range(LAYERS)], l2d=self.l2d,
                                  req_to_token=self.r2t, p=p_obs, first_slot=len(slots))
            for i, ((r, n), s) in enumerate(zip(batch, starts)):
                qf, kf, vf = (x[l, :, :s + n] for x in self.seqs[r])
                keep, _ = select(qf, kf, self.thr[l], self.p, layer=l)
                if any(pr.row == r for pr in prompts):
                    mask, observed = prompt_mask(qf, kf, keep, p_obs, D ** -0.5, q_start=s)
                    self.observed.setdefault(r, {})[l] = observed
                else:
                    if r in self.observed:                  # decode after an observed prompt
                        keep = with_observed(keep, self.observed[r][l], B)
                    mask = visible(keep, torch.arange(s, s + n), s + n, self.p)
                want = masked_attention(qf[:, s:], kf, vf, mask, D ** -0.5).transpose(0, 1)
                err = max(err, float((out[qo[i]:qo[i + 1]] - want).abs().max()))
        for pend in (pending, rebuilt):
            self.store.end_forward(pend)
        for pend in (pending, rebuilt):
            self.store.settle(pend)
        self.hold_dense -= {pr.row for pr in prompts}
        for (r, n) in batch:
            self.len[r] += n
            self.free_out_of_window(r)
        self.store.check()
        return err


@pytest.mark.parametrize("policy", ["tca", "random", "streaming"])
def test_chunked_prefill_then_decode_on_freed_memory(policy):
    srv = FakeServer(thresholds(), policy=policy)
    srv.new_sequence(0)
    srv.new_sequence(1)
    errs = [srv.forward([(0, 45), (1, 8)]), srv.forward([(0, 60), (1, 100)]), srv.forward([(0, 29), (1, 3)])]
    for _ in range(12):                                                  # decode steps, crossing block ends
        errs.append(srv.forward([(0, 1), (1, 1)], decode=True))
    assert max(errs) < 1e-4, errs
    assert srv.dense_from[0] > B and srv.dense_from[1] > B              # dense slots really were freed
    assert srv.store.n_records == sum(n // B for n in srv.len)          # one record per completed block
    kept = srv.store.record_pages
    assert kept < srv.store.n_records * srv.plan.max_pages_per_record   # reservations were refunded


@pytest.mark.parametrize("final_chunk", [40, 9])
def test_an_observing_prompt_rechooses_its_records_then_decode_reads_them(final_chunk):
    """--tca-observe on freed memory (serving.observe): a prompt kept dense until its last forward, in which its last
    N queries re-choose the compressed tokens (the same number per KV head) and attend again, and its records are
    rebuilt from the dense slots; then its out-of-window slots are freed and poisoned, and decode reads the choice
    from the store. Outputs equal `algorithm.prompt_mask` (prompt) and the reference decode after it; a request
    beside it in the same batches stays prefix-pure."""
    n_obs = 8
    srv = FakeServer(thresholds())
    srv.new_sequence(0)
    srv.new_sequence(1)
    srv.hold_dense.add(0)
    errs = [srv.forward([(0, 45), (1, 30)]), srv.forward([(0, 106 - 45 - final_chunk), (1, 50)])]
    assert srv.dense_from[0] == 0 and srv.dense_from[1] > 0              # only the observing prompt stays dense
    errs.append(srv.forward([(0, final_chunk), (1, 7)], observe=n_obs))
    for _ in range(12):
        errs.append(srv.forward([(0, 1), (1, 1)], decode=True))
    assert max(errs) < 1e-4, errs
    ds = int(dense_start(106, B, W))
    q, k, _ = srv.seqs[0]
    pure = [select(q[l, :, :106], k[l, :, :106], srv.thr[l], srv.p, layer=l)[0][:, B:ds] for l in range(LAYERS)]
    assert sum(int((pure[l] != srv.observed[0][l]).sum()) for l in range(LAYERS)) > 0   # other tokens were chosen
    assert srv.dense_from[0] > B                                          # and the prompt's dense slots were freed
    pages = (srv.r2t[0, B:ds:B] // B).long()
    bits = unpack_bits(srv.store.mask[pages], B)                          # [blocks, layers, Hkv, b]
    for l in range(LAYERS):                                               # per (layer, head): as many rows as before
        assert torch.equal(bits[:, l].sum((0, 2)), pure[l].sum(-1))
    for page, rows in zip(pages.tolist(), bits.sum((1, 2, 3)).tolist()):  # each record exact
        assert len(srv.store.rec_pages[page]) == math.ceil(rows / PAGE_ROWS)
    assert srv.store.n_records == sum(n // B for n in srv.len)
    srv.store.check()


def test_keep_all_equals_dense_attention():
    srv = FakeServer(keep_all_thresholds())
    srv.new_sequence(0)
    assert srv.forward([(0, 130)]) < 1e-4
    for _ in range(3):
        assert srv.forward([(0, 1)], decode=True) < 1e-4


def test_shared_prefix_reads_the_first_requests_records():
    """A request that starts with another's cached prefix (page-aligned, its window still dense) reads the records
    the first request compacted, and gets what a fresh computation of its own sequence gives."""
    srv = FakeServer(thresholds())
    srv.new_sequence(0)
    srv.forward([(0, 70)])
    srv.forward([(0, 50)])
    records = srv.store.n_records
    m = 120                                                              # page-aligned; [m - W - B, m) still dense
    assert srv.dense_from[0] == m - SWA_WINDOW
    srv.share_prefix(0, 2, m)
    assert srv.forward([(2, 50)]) < 1e-4
    assert srv.store.n_records == records + (m + 50) // B - m // B       # only its own new blocks got records
    for _ in range(8):
        assert srv.forward([(0, 1), (2, 1)], decode=True) < 1e-4


def test_released_records_return_their_pages():
    srv = FakeServer(thresholds())
    srv.new_sequence(0)
    srv.forward([(0, 90)])
    free0 = srv.store.free_pages
    pages = np.unique(srv.r2t[0, :88].numpy() // B)
    srv.store.release(pages)
    assert srv.store.n_records == 0 and srv.store.free_pages > free0
    srv.store.check(live_logical_pages=np.zeros(0, dtype=np.int64))


def _dense_prefill_case(length, q_start, hkv, g, d, b, w, dtype, device, seed):
    """One request whose every token is at a shuffled dense slot: (q, arena_k, arena_v, l2d, r2t, causal reference)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    slots_n, base, row = length + 3 * b, 5, 1
    l2d = torch.randperm(slots_n, generator=gen, device=device)[:length + b] + 1
    r2t = torch.zeros(3, length + b, dtype=torch.int32, device=device)
    r2t[row] = torch.randperm(length + b, generator=gen, device=device).int()
    arena_k = torch.randn(base + (slots_n + 2) * hkv, d, generator=gen, device=device).to(dtype)
    arena_v = torch.randn(base + (slots_n + 2) * hkv, d, generator=gen, device=device).to(dtype)
    q = torch.randn(length - q_start, hkv * g, d, generator=gen, device=device).to(dtype)
    rows = base + l2d[r2t[row, :length].long()][None, :] * hkv + torch.arange(hkv, device=device)[:, None]
    k, v = arena_k[rows].float().repeat_interleave(g, 0), arena_v[rows].float().repeat_interleave(g, 0)
    causal = torch.arange(length, device=device)[None, :] <= torch.arange(q_start, length, device=device)[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(q.float().transpose(0, 1), k, v, attn_mask=causal,
                                                            scale=d ** -0.5).transpose(0, 1)
    return q, arena_k, arena_v, l2d, r2t, row, base, want


def _dense_prefill_attention(q, arena_k, arena_v, l2d, r2t, row, base, length, q_start, hkv, b, w):
    from sglang_tca.serving.observe import DensePrefillLists

    lists = DensePrefillLists(l2d, r2t, row, length, hkv, TCAParams(b, w))
    dev = q.device
    return tca_sparse_attention(q, arena_k, arena_v, base, hkv, l2d, r2t, torch.tensor([row], device=dev),
                                torch.tensor([q_start], device=dev),
                                torch.tensor([0, q.shape[0]], dtype=torch.int32, device=dev),
                                *lists.lists(base), b, w, q.shape[-1] ** -0.5, max_q_len=q.shape[0])


@pytest.mark.parametrize("length,q_start", [(5, 0), (9, 3), (41, 40), (150, 0), (150, 100), (256, 190)])
def test_dense_prefill_lists_give_each_query_its_whole_causal_prefix(length, q_start):
    """--tca-observe-prefill dense: `observe.DensePrefillLists` under `tca_sparse_attention` (the kernel's per-query
    bounds, its dense range, the sink) is exact causal attention over the request's dense slots, for a chunk at any
    offset, a request shorter than a block included."""
    q, ak, av, l2d, r2t, row, base, want = _dense_prefill_case(length, q_start, HKV, HQ // HKV, D, B, W,
                                                               torch.float32, "cpu", seed=length + q_start)
    out = _dense_prefill_attention(q, ak, av, l2d, r2t, row, base, length, q_start, HKV, B, W)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_dense_prefill_lists_8k():
    """The same in bf16 at Llama-3.1-8B's heads: the last 2K-token chunk of an 8K observing prompt, and its first."""
    for length, q_start in ((8192, 6144), (2048, 0)):
        q, ak, av, l2d, r2t, row, base, want = _dense_prefill_case(length, q_start, 8, 4, 128, 64, 1024,
                                                                   torch.bfloat16, "cuda", seed=length)
        out = _dense_prefill_attention(q, ak, av, l2d, r2t, row, base, length, q_start, 8, 64, 1024)
        torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
