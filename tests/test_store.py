"""The compressed store's host accounting (sglang_tca.serving.store) and the memory split (serving.sizing): page
reservation, settlement and refunds, release by logical page (also before a forward settles), the conservation
check, admission capacity, and tensor-parallel ranks that keep identical host state while using different rows."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from sglang_tca.serving.sizing import MemoryPlan, ModelDims, SizingError, block_reserve_pages, plan_memory
from sglang_tca.serving.store import CompressedStore, StoreExhausted

B, PAGE_ROWS = 8, 8
DIMS = ModelDims(layers=2, kv_heads=2, head_dim=16, v_head_dim=16, dtype_bytes=2)   # 32 rows per full block


def plan(heap_pages=100, logical_pages=60, reservation_rows=32, share=0.5):
    return MemoryPlan(DIMS, B, 32, 40 * B, heap_pages, logical_pages * B, max_pages_per_record=4,
                      block_reserve_pages=4, expected_share=share, decode_kept_rows=0,
                      reservation_rows=reservation_rows, budget_bytes=0, page_rows=PAGE_ROWS)


def run_forward(store, pages, rows, sinks=None):
    """One forward that completes the blocks at logical pages `pages`, using `rows` rows each (what the last layer
    of the compaction kernel reports)."""
    sinks = sinks or [False] * len(pages)
    pending = store.begin_forward(sinks, list(range(len(pages))))
    store.out_page[:len(pages)] = torch.tensor(pages)
    store.out_rows[:len(pages)] = torch.tensor(rows, dtype=torch.int32)
    store.end_forward(pending)
    return pending


def test_reserve_settle_refund_release():
    s = CompressedStore(plan(), "cpu", chunk_tokens=64)
    total = s.free_pages
    p = run_forward(s, [5, 6, 7], [9, 32, 0], sinks=[True, False, False])
    assert s.reserved_pages == 4 + 4 + 4 and s.free_pages == total - 12
    s.check()
    s.settle(p)
    assert s.reserved_pages == 0 and s.record_pages == 2 + 4 + 0            # ceil(rows / 8) kept
    assert s.n_records == 3 and s.alive[[5, 6, 7]].all()
    assert len(s.res_pages.unique()) > 1                                   # the device table got real page ids
    s.check(live_logical_pages=np.array([5, 6, 7]))
    with pytest.raises(AssertionError):
        s.check(live_logical_pages=np.array([5, 6]))                      # a live record the tree does not hold
    with pytest.raises(AssertionError):
        s.check(live_logical_pages=np.array([5, 6, 7, 9]))                # a held page without a record
    s.release(np.array([6, 7, 11]))                                       # 11 never had a record
    assert s.n_records == 1 and s.record_pages == 2 and s.free_pages == total - 2
    s.check(live_logical_pages=np.array([5]))


def test_a_record_freed_before_its_forward_settles_returns_everything():
    """A request retracted right after its forward was launched: SGLang frees its logical pages before the result is
    processed. The settlement must recognise the record as dead (launch epoch), also when the page was reused
    by the next forward."""
    s = CompressedStore(plan(), "cpu", chunk_tokens=64)
    total = s.free_pages
    p1 = run_forward(s, [3, 4], [20, 20])
    s.release(np.array([3]))                                              # freed while forward 1 is in flight
    p2 = run_forward(s, [3], [8])                                         # page 3 reused by the next forward
    s.settle(p1)
    assert not s.alive[3]                                                  # the dead record left nothing
    assert s.alive[4] and s.rec_pages[4].size == 3
    s.settle(p2)
    assert s.alive[3] and s.rec_pages[3].size == 1                       # the new record, not the dead one
    assert s.free_pages == total - 4 and s.n_records == 2
    s.check(live_logical_pages=np.array([3, 4]))


def test_replaced_records_are_exact_and_the_old_ones_give_their_pages_back():
    """The question-aware end of prompt (serving.observe) replaces a prompt's records inside the forward it launched
    last: settled old records return their pages at once, the ones that forward launched at its settlement; the new
    records keep exactly their pages and nothing is lost or counted twice at any point."""
    s = CompressedStore(plan(), "cpu", chunk_tokens=64)
    total = s.free_pages
    s.settle(run_forward(s, [3, 4], [20, 9]))                              # 3 + 2 pages, settled
    p1 = run_forward(s, [5, 6], [1, 30])                                  # the last forward: 5 and 6 in flight
    new = s.replace_records([3, 4, 5], np.array([8, 17, 25]), [2, 3, 4])  # 1 + 3 + 4 pages
    assert s.n_records == 2 + 3 and not s.alive[[3, 4]].any()          # p1's two, the three new
    s.check()
    s.out_page[2:5] = torch.tensor([3, 4, 5])
    s.out_rows[2:5] = torch.tensor([8, 17, 25], dtype=torch.int32)
    s.end_forward(new)
    s.settle(p1)
    assert s.alive[6] and not s.alive[5]                                   # 5's first record left nothing
    s.settle(new)
    assert [s.rec_pages[p].size for p in (3, 4, 5, 6)] == [1, 3, 4, 4]
    assert s.n_records == 4 and s.free_pages == total - 12
    s.check(live_logical_pages=np.array([3, 4, 5, 6]))
    before = (s.free_pages, s.n_records, s.alive.copy(), s.launches)
    with pytest.raises(StoreExhausted):                                   # 30 full records: 120 pages
        s.replace_records(np.arange(3, 33), np.full(30, 32), list(range(30)))
    assert before[:2] == (s.free_pages, s.n_records) and (before[2] == s.alive).all() and before[3] == s.launches
    s.check(live_logical_pages=np.array([3, 4, 5, 6]))                    # refused before anything changed


def test_settle_checks_order_and_bounds():
    s = CompressedStore(plan(), "cpu", chunk_tokens=64)
    p1 = run_forward(s, [1], [8])
    p2 = run_forward(s, [2], [8])
    with pytest.raises(AssertionError):
        s.settle(p2)                                                      # forwards settle in launch order
    s.settle(p1)
    s.settle(p2)
    p3 = run_forward(s, [9], [33])                                        # 5 pages > the 4 reserved
    with pytest.raises(RuntimeError, match="reserved"):
        s.settle(p3)


def test_exhaustion_is_loud():
    s = CompressedStore(plan(heap_pages=9), "cpu", chunk_tokens=64)        # 8 usable pages
    run_forward(s, [1, 2], [8, 8])
    with pytest.raises(StoreExhausted):
        s.begin_forward([False], [0])


def test_token_capacity_counts_open_blocks_and_next_forward():
    s = CompressedStore(plan(), "cpu", chunk_tokens=64)
    nominal = s.plan.nominal_pages_per_block                              # 2 layers x 2 heads x 8 x 0.5 / 8 + 0.5
    assert nominal == pytest.approx(2.5)
    idle = s.token_capacity(0, 0)
    one_req = s.token_capacity(0, 1)
    assert one_req < idle                                                 # a running request holds its worst case
    open_10 = s.token_capacity(10, 1)
    assert open_10 == max(int((s.free_pages - 10 * nominal - (1 + s.chunk_blocks) * (4 - nominal)) / nominal), 0) * B
    s.settle(run_forward(s, list(range(1, 11)), [32] * 10))               # the 10 blocks complete at 4 pages each
    assert s.token_capacity(10, 1) < open_10                              # more than their expected 2.5 pages
    assert s.token_capacity(10 ** 6, 0) == 0                              # never negative


def prefill_and_decode_alone(store, prompt, output, chunk):
    """One sequence on an otherwise empty store, the way SGLang's scheduler feeds it: prompt chunks cut to what
    `token_capacity` admits (PrefillAdder: tokens), then one token per decode step (check_decode_mem: a page when
    the token starts one); every block keeps its worst case (the sink all of its rows, the others
    `block_reserve_pages` full pages). A request is admitted first only when its input, its clipped max_new_tokens
    and a page are below what is free (PrefillAdder.add_one_req). Returns the tokens it got through before it stalled
    (0: never admitted)."""
    p, done = store.plan, 0
    if prompt + min(output, 4096) + B >= store.token_capacity(0, 0):
        return 0
    worst = p.block_reserve_pages * p.page_rows
    while done < prompt + output:
        cap = store.token_capacity(-(-done // B), 1)
        if done < prompt:
            admit = min(chunk, prompt - done, cap)
        else:
            admit = 1 if done % B or cap >= B else 0
        if admit <= 0:
            return done
        blocks = range(done // B, (done + admit) // B)                  # the blocks this forward completes
        pending = run_forward(store, [k + 1 for k in blocks],
                              [p.dims.rows_per_block * B if k == 0 else worst for k in blocks], [k == 0 for k in blocks])
        store.settle(pending)
        done += admit
    return done


@pytest.mark.parametrize("share,reserve,chunk", [(0.3, 2, 64), (0.5, 3, 16), (0.2, 4, 128), (0.25, 1, 64),
                                                 (0.45, 2, 32)])
def test_the_longest_sequence_fits_alone_at_its_worst_case(share, reserve, chunk):
    mk = lambda: CompressedStore(MemoryPlan(DIMS, B, 32, 40 * B, 400, 4000 * B, max_pages_per_record=4,  # noqa: E731
                                            block_reserve_pages=reserve, expected_share=share, decode_kept_rows=0,
                                            reservation_rows=64, budget_bytes=0, page_rows=PAGE_ROWS),
                                 "cpu", chunk_tokens=chunk)
    s = mk()
    longest = s.longest_sequence()
    assert longest > 0 and longest % B == 0
    reach = longest - 2          # SGLang: max_req_len = longest - 1, max_new_tokens clipped to max_req_len - input - 1
    assert prefill_and_decode_alone(s, reach - 40, 40, chunk) == reach          # never stalls, never exhausts
    s.check()
    assert s.longest_sequence() == longest                                       # a property of the plan, not the state
    assert prefill_and_decode_alone(mk(), reach, 0, chunk) == reach
    twice = mk()
    assert prefill_and_decode_alone(twice, 2 * longest, 0, chunk) < 2 * longest  # the bound is not vacuous
    # streaming keeps nothing: only the logical ids bound a sequence
    none = CompressedStore(MemoryPlan(DIMS, B, 32, 40 * B, 400, 4000 * B, 4, 0, 0.0, 0, 64, 0, PAGE_ROWS), "cpu",
                           chunk_tokens=chunk)
    assert none.longest_sequence() == 4000 * B


def test_sglang_accepts_no_request_longer_than_the_store_holds_alone():
    """patches/tp_worker_get_worker_info: max_req_len / max_req_input_len (get_worker_info's 5th and 6th fields) come
    down to the store's longest sequence, never up; without TCA's store nothing changes."""
    from types import SimpleNamespace

    from patches.tp_worker_get_worker_info import hook

    store = CompressedStore(plan(heap_pages=200), "cpu", chunk_tokens=64)
    worker = SimpleNamespace(model_runner=SimpleNamespace(token_to_kv_pool_allocator=SimpleNamespace(store=store)))
    info = (1000, 8192, 32, None, 8191, 8186, 0, "cpu", None, 32, 8192, 1000)
    longest = store.longest_sequence()
    assert 0 < longest < 8192
    got = hook(info, worker)
    assert got[4] == longest - 1 and got[5] == longest - 6 and got[:4] == info[:4] and got[6:] == info[6:]
    # the failure path of a request the store cannot hold: SGLang's own input check refuses it with one message (the
    # tokenizer manager answers it as an error) while the scheduler goes on; one token shorter passes
    from sglang.srt.managers.utils import validate_input_length

    def prompt(n):
        return SimpleNamespace(origin_input_ids=list(range(n)))
    assert validate_input_length(prompt(got[5] - 1), got[5], allow_auto_truncate=False) is None
    refused = validate_input_length(prompt(got[5]), got[5], allow_auto_truncate=False)
    assert "exceeds the maximum allowed length" in refused
    short = info[:4] + (100, 95) + info[6:]
    assert hook(short, worker) == short                                          # already shorter: untouched
    dense = SimpleNamespace(model_runner=SimpleNamespace(token_to_kv_pool_allocator=SimpleNamespace()))
    assert hook(info, dense) == info


def test_tensor_parallel_ranks_keep_identical_host_state():
    """Two ranks own different KV heads, so their records use different row counts; the max over ranks decides what
    both keep, so free lists, records and admission stay identical while each rank's rows fit its pages."""
    rng = random.Random(0)
    both = {}
    stores = [CompressedStore(plan(heap_pages=400, logical_pages=200), "cpu", chunk_tokens=64,
                              reduce_max=lambda x, r=r: np.maximum(x, both[1 - r])) for r in (0, 1)]
    live = []
    for step in range(60):
        pages = rng.sample([p for p in range(1, 201) if p not in live], 3)
        rows = [[rng.randint(0, 32) for _ in pages] for _ in stores]
        pend = []
        for r, s in enumerate(stores):
            pend.append(run_forward(s, pages, rows[r]))
            both[r] = np.array(rows[r])
        for r, (s, p) in enumerate(zip(stores, pend)):
            s.settle(p)
            used = np.array([len(s.rec_pages[q]) for q in pages])
            assert (used * PAGE_ROWS >= np.array(rows[r])).all()                # each rank's rows fit
        live += pages
        if step % 3 == 2:
            gone = rng.sample(live, 4)
            live = [p for p in live if p not in gone]
            for s in stores:
                s.release(np.array(gone))
        a, b = stores
        assert np.array_equal(a.free, b.free) and a.n_records == b.n_records
        assert all((x is None and y is None) or np.array_equal(x, y) for x, y in zip(a.rec_pages, b.rec_pages))
        assert a.token_capacity(len(live) + 5, 3) == b.token_capacity(len(live) + 5, 3)
        for s in stores:
            s.check(live_logical_pages=np.array(live))


def llama_plan(**kw):
    dims = ModelDims(layers=32, kv_heads=8, head_dim=128, v_head_dim=128, dtype_bytes=2)
    args = dict(budget_bytes=100 * 2 ** 30, block=64, window=1024, expected_share=0.30,
                block_reserve=block_reserve_pages(dims, 64, None), context_len=131072, graph_max_bs=32,
                chunk_tokens=8192, max_requests=256)
    args.update(kw)
    return plan_memory(dims, **args)


def test_plan_fits_the_budget_and_saves_memory_at_long_context():
    p = llama_plan()
    assert p.total_bytes <= p.budget_bytes and p.total_bytes > 0.99 * p.budget_bytes
    assert p.dense_tokens % 64 == 0 and p.logical_tokens % 64 == 0
    dense_equivalent = p.budget_bytes // p.dims.cell
    assert p.logical_tokens > 2 * dense_equivalent                        # logical ids are not what runs out
    # one 128K request at the expected share: window and sink dense, the rest in the store, plus its tables
    n = 128 * 1024
    per_request = (p.window + 2 * p.block) * p.dims.cell + \
        (n / p.block) * p.nominal_pages_per_block * p.page_bytes + (n / p.block) * p.table_bytes_per_logical_page
    assert per_request / (n * p.dims.cell) < 0.33
    assert p.expected_store_tokens > 2.5 * dense_equivalent * (1 - 0.2)


def test_decode_lists_hold_every_running_request_when_cheap():
    """The decode kept-row list holds a CUDA graph's batch; and every running request's lists at once when that
    takes at most DECODE_LIST_SHARE of the budget (eager decode of large batches then runs one group per layer)."""
    from sglang_tca.serving.sizing import DECODE_LIST_SHARE

    long_ctx = llama_plan(max_requests=2048)                               # 128K x 8 heads: 4 MiB per request
    assert long_ctx.decode_kept_rows == 128 * 131072 * 8                   # 0.5% of 100 GiB holds 128 of them
    assert llama_plan(graph_max_bs=160, max_requests=2048).decode_kept_rows == 160 * 131072 * 8
    short_ctx = llama_plan(context_len=8192, max_requests=300)
    assert short_ctx.decode_kept_rows == 300 * 8192 * 8                    # all 300 (75 MiB)
    assert 4 * short_ctx.decode_kept_rows <= DECODE_LIST_SHARE * short_ctx.budget_bytes
    assert llama_plan(context_len=8192, max_requests=2, graph_max_bs=0).decode_kept_rows == 4 * 8192 * 8
    assert short_ctx.total_bytes <= short_ctx.budget_bytes


def test_plan_dense_pool_choices_and_errors():
    by_share = llama_plan()
    assert by_share.dense_tokens == pytest.approx(0.2 * by_share.budget_bytes / by_share.dims.cell, rel=0.01)
    by_requests = llama_plan(dense_requests=16)
    assert by_requests.dense_tokens == 2 * 8192 + 16 * (3 * (1024 + 64) // 2 + 128)   # 1.5 windows each
    explicit = llama_plan(dense_tokens=10 ** 5)
    assert explicit.dense_tokens == math.ceil(10 ** 5 / 64) * 64 and explicit.heap_pages > by_share.heap_pages
    assert llama_plan(dense_tokens=10).dense_tokens >= 2 * 8192   # never below two chunks + four requests at peak
    streaming = llama_plan(expected_share=0.0)
    assert llama_plan().logical_tokens < streaming.logical_tokens <= 8 * streaming.budget_bytes // streaming.dims.cell
    with pytest.raises(SizingError, match="mem-fraction-static"):
        llama_plan(budget_bytes=2 * 2 ** 30)
    with pytest.raises(SizingError):
        llama_plan(expected_share=1.5)


def test_the_dense_pool_under_max_running_requests_holds_no_more_windows_than_the_store_holds_requests():
    """--max-running-requests 128 on an H100's budget (423,494 dense tokens): 128 requests' windows would take 57% of
    it while the store holds ~30 requests of 16K tokens; the pool is cut to as many windows as the store holds such
    requests. On an H200's budget the two are about equal, and a small R keeps its windows."""
    from sglang_tca.serving.sizing import BALANCE_TOKENS

    def windows_and_requests(p):
        mean_request = 3 * (p.window + p.block) // 2 + 2 * p.block
        per_request = (BALANCE_TOKENS - p.window - p.block) / p.block * p.nominal_pages_per_block * p.page_bytes + \
            BALANCE_TOKENS / p.block * p.table_bytes_per_logical_page
        return (p.dense_tokens - 2 * 8192) / mean_request, p.heap_pages * p.page_bytes / per_request

    h100 = llama_plan(budget_bytes=423494 * 131072, dense_requests=128, max_requests=128)
    windows, held = windows_and_requests(h100)
    assert h100.dense_tokens < 0.31 * 423494 and 40 < windows < 128 and held == pytest.approx(windows, rel=0.1)
    h200 = llama_plan(budget_bytes=845617 * 131072, dense_requests=128, max_requests=128)
    assert windows_and_requests(h200)[0] > 125
    assert llama_plan(budget_bytes=423494 * 131072, dense_requests=8).dense_tokens == 2 * 8192 + 8 * 1760


def test_block_reserve_from_reachable_counts():
    dims = ModelDims(layers=2, kv_heads=2, head_dim=16, v_head_dim=16, dtype_bytes=2)
    assert block_reserve_pages(dims, 64, None) == 2 * 2 * 64 // 64
    assert block_reserve_pages(dims, 64, [[8, 16], [1, 64]]) == math.ceil(89 / 64)
    assert block_reserve_pages(dims, 64, [[0, 0], [0, 0]]) == 0


def test_a_store_that_holds_no_request_is_refused_at_start():
    from types import SimpleNamespace

    from sglang_tca.serving import memory

    conf = SimpleNamespace(device="cpu", server_args=SimpleNamespace(chunked_prefill_size=64))
    memory.remember_plan(conf, plan(heap_pages=30))                       # 29 pages: a few dozen tokens at most
    from sglang.srt.runtime_context import get_parallel

    with get_parallel().override(attn_tp_size=1, attn_tp_rank=0, tp_size=1, tp_rank=0), \
            pytest.raises(SizingError, match="holds no request of 256 tokens"):
        memory.build_allocator(conf, None, None)


def test_a_decode_step_the_store_cannot_reserve_retracts_and_aborts_instead_of_failing():
    """patches/schedule_batch_check_decode_mem inside SGLang's own ScheduleBatch.check_decode_mem / retract_decode:
    when the store cannot reserve the worst case of the blocks the next decode completes (a shortfall the admission
    accounting did not foresee), SGLang's decode check fails, so it retracts requests until the rest fit, and aborts
    the last one with an error when even that one does not; the forward never sees StoreExhausted."""
    from http import HTTPStatus
    from types import SimpleNamespace

    from sglang.srt.managers.schedule_batch import FINISH_ABORT, ScheduleBatch
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from sglang_tca import plugin

    plugin.register()                                  # installs and applies the patches
    store = CompressedStore(plan(heap_pages=100), "cpu", chunk_tokens=64)
    reserve = store.plan.block_reserve_pages

    class Batch:                                      # what SGLang's decode check and retraction read of a batch
        check_decode_mem = ScheduleBatch.check_decode_mem
        retract_decode = ScheduleBatch.retract_decode
        _get_decode_retraction_order = staticmethod(ScheduleBatch._get_decode_retraction_order)
        new_tokens_required_next_decode = ScheduleBatch.new_tokens_required_next_decode

        def __init__(self, lens):
            self.reqs = [SimpleNamespace(rid=i, kv_committed_len=n, output_ids=[0] * (i + 1), origin_input_ids=[0] * n,
                                         to_finish=None, sampling_params=SimpleNamespace(max_new_tokens=100))
                         for i, n in enumerate(lens)]
            self.token_to_kv_pool_allocator = SimpleNamespace(store=store, page_size=B, available_size=lambda: 10 ** 6)
            self.tree_cache = None
            self.spec_algorithm = SpeculativeAlgorithm.NONE
            self.released = []

        def release_req(self, idx, remaining, server_args):
            self.released.append(self.reqs[idx].rid)

        def filter_batch(self, keep_indices):
            self.reqs = [self.reqs[i] for i in keep_indices]

    args = SimpleNamespace(retraction_policy="length", enable_priority_scheduling=False,
                           schedule_low_priority_values_first=False)
    ends = [5 * B - 1, 3 * B - 1, 7 * B - 1]          # each request's next token completes a block
    assert Batch(ends).check_decode_mem()              # the store holds every row's worst case: nothing changes
    store._pop(store.free_pages - 2 * reserve)         # a shortfall: room for two of the three blocks
    batch = Batch(ends)
    assert not batch.check_decode_mem()
    retracted, _, aborted = batch.retract_decode(args)
    assert len(retracted) == 1 and not aborted and len(batch.reqs) == 2 and batch.check_decode_mem()
    assert Batch([4 * B, 6 * B + 2]).check_decode_mem()           # rows that complete no block need nothing
    store._pop(store.free_pages - (reserve - 1))       # not even one block's worst case
    batch = Batch(ends)
    retracted, _, aborted = batch.retract_decode(args)
    assert len(retracted) == 2 and len(aborted) == 1 and batch.reqs == []
    reason = aborted[0].to_finish
    assert isinstance(reason, FINISH_ABORT) and reason.status_code == HTTPStatus.INTERNAL_SERVER_ERROR
    assert "Out of memory" in reason.message


def test_observe_sizes_its_reservation_rows_and_holds_back_what_a_rebuild_takes_at_once():
    """--tca-observe: prefills up to the dense pool above its minimum observe; the reservation table gets a row per
    block of such a prompt and a chunk's more (whole prompts beside it); the store holds back, beside the usual worst
    case, the new records of two prefill chunks (taken while their reservations are still held: this forward's and,
    under the overlap scheduler, the previous one's) and a page of fragmentation per rebuilt record."""
    kw = dict(budget_bytes=400 * DIMS.cell * B, block=B, window=32, expected_share=0.3, block_reserve=4,
              context_len=1024, graph_max_bs=4, chunk_tokens=64, max_requests=4, dense_tokens=1024)
    off, on = plan_memory(DIMS, **kw), plan_memory(DIMS, **kw, observe=8)
    min_dense = 2 * 64 + 4 * (2 * (32 + B) + 2 * B)
    assert (off.observe, off.observe_tokens) == (0, 0) and (on.observe, on.observe_tokens) == (8, 1024 - min_dense)
    assert on.reservation_rows == off.reservation_rows + math.ceil(on.observe_tokens / B) + 64 // B
    s_off, s_on = (CompressedStore(p, "cpu", chunk_tokens=64) for p in (off, on))
    worst = max(on.block_reserve_pages, on.sink_pages)
    assert s_on._hold_back(3) - s_off._hold_back(3) == \
        2 * s_on.chunk_blocks * worst + math.ceil(on.observe_tokens / B) + s_on.chunk_blocks
    assert "prefills of up to 512 tokens observe" in on.summary(0) and "observe" not in off.summary(0)
