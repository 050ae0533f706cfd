"""The compressed store: where the kept K/V rows of completed blocks live, and its host-side accounting.

A block of `block` tokens is one logical page (SGLang's "full" pool runs with page size = block), so a block is
named by its logical page id P. When the forward pass processes a block's last token it selects the block (one
keep mask per layer and KV head) and compacts it (kernels/compaction.py): the kept rows of every (layer, KV head) are
copied, in order, to consecutive "virtual rows" of record P, which live in store pages of `plan.page_rows` rows listed in
page_table[P]. The block's dense slots are freed later by SGLang's hybrid-SWA rules once the block has left the
window. The sink (block 0) is a record that keeps everything.

The host decides everything that the scheduler sees (rank-uniform by construction):
  * Before a forward (`begin_forward`), each block that will complete in it gets the worst case of pages from the
    host free list (`reserve_pages`), so the forward never runs out of pages; the pages go to the device.
  * After the forward (`settle`, from SGLang's result processing, after the forward finished), the host reads how
    many rows each new record used, reduced with max over tensor-parallel ranks (`reduce_max`), keeps that many pages
    for the record and returns the rest.
  * When SGLang frees logical pages (`release`, from the logical allocator), their records' pages return. A record
    freed before its forward settled (a request retracted right after its launch) is recognised by the launch epoch.
  * The question-aware end of prompt (`serving.observe`) re-chooses a prompt's blocks inside its last forward
    (`replace_records`): the old records give their pages back and the new ones get exactly the pages they need.
  * `token_capacity` converts free pages into the logical tokens the scheduler may still admit: pages in use are
    counted exactly, pages of blocks not yet completed at the expected share, and the worst case of the next
    forwards is held back.
Invariants (`check`): free + held by records + reserved == all pages; at idle the live records are exactly the
logical pages the radix cache holds. The host state is numpy arrays and running counters, so what the scheduler asks
between forwards is O(1) and a full check is a few vectorised passes; `version` changes with every change of state
(the radix cache's idle check skips a state it has already checked).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from sglang_tca.serving.sizing import MemoryPlan


def record_kept(mask, off, page_table, page: int, layer: int, head: int, block: int, page_rows: int
                ) -> list[tuple[int, int]]:
    """Plain-Python reading of one record from host copies of the store's tables, the layout the kernels read: the
    tokens t the record of logical page `page` keeps for (layer, head), in order, each with its arena row. For checks
    and benchmarks."""
    bits, v, out = int(mask[page, layer, head]), int(off[page, layer, head]), []
    for t in range(block):
        if (bits >> t) & 1:
            out.append((t, int(page_table[page, v // page_rows]) * page_rows + v % page_rows))
            v += 1
    return out


class StoreExhausted(RuntimeError):
    """The store has fewer free pages than a forward's worst case: the admission accounting failed to hold them."""


@dataclass
class Pending:
    """One launched forward's new records: their reserved pages, and the device rows they used (read back)."""
    epoch: int
    reserved: list[np.ndarray]                 # per new record, its reserved page ids
    readback: tuple | None = None              # (event, pinned pages [n] int64, pinned rows [n] int32)
    slots: list[int] = field(default_factory=list)   # reservation-table rows of the new records


class CompressedStore:
    def __init__(self, plan: MemoryPlan, device: str | torch.device, *, chunk_tokens: int,
                 reduce_max: Callable[[np.ndarray], np.ndarray] | None = None, sink_always: bool = True):
        self.plan = plan
        self.device = torch.device(device)
        self.block = plan.block
        self.reduce_max = reduce_max or (lambda x: x)
        self.chunk_blocks = max(chunk_tokens, plan.block) // plan.block + 1
        n_lp = plan.logical_pages + 1                      # logical page 0 is SGLang's padding page
        d = plan.dims
        # device tables, indexed by logical page
        self.mask = torch.zeros(n_lp, d.layers, d.kv_heads, dtype=torch.int64, device=self.device)
        self.off = torch.zeros(n_lp, d.layers, d.kv_heads, dtype=torch.int32, device=self.device)
        self.cursor = torch.zeros(n_lp, dtype=torch.int32, device=self.device)
        self.page_table = torch.zeros(n_lp, plan.max_pages_per_record, dtype=torch.int32, device=self.device)
        # per-forward reservation table (static, so decode CUDA graphs read it) and what the last layer reports
        self.res_pages = torch.zeros(plan.reservation_rows, plan.max_pages_per_record, dtype=torch.int32,
                                     device=self.device)
        self.out_page = torch.zeros(plan.reservation_rows, dtype=torch.int64, device=self.device)
        self.out_rows = torch.zeros(plan.reservation_rows, dtype=torch.int32, device=self.device)
        self.version = 0
        self.clear()

    # -- host state -------------------------------------------------------------------------------------------------
    def clear(self) -> None:
        n_lp = self.plan.logical_pages + 1
        self._stack = np.arange(self.plan.heap_pages - 1, 0, -1, dtype=np.int32)   # free pages; page 0 is the trash
        self._top = len(self._stack)                                 # the free pages are _stack[:_top], top last
        self.rec_pages = [None] * n_lp                              # host page list of each settled live record
        self.alive = np.zeros(n_lp, dtype=bool)                      # settled live records (0 pages allowed)
        self.freed_epoch = np.full(n_lp, -1, dtype=np.int64)
        self.launches = 0
        self.n_records = 0                                           # live records, pending ones included
        self._record_pages = 0                                       # pages held by settled live records
        self._reserved_pages = 0                                     # pages reserved by forwards not yet settled
        self.pending: deque[Pending] = deque()
        self.version += 1

    @property
    def free(self) -> np.ndarray:
        """The free pages (a read-only view; the next one handed out is the last)."""
        view = self._stack[:self._top]
        view.flags.writeable = False
        return view

    @property
    def free_pages(self) -> int:
        return self._top

    @property
    def reserved_pages(self) -> int:
        return self._reserved_pages

    @property
    def record_pages(self) -> int:
        return self._record_pages

    def _pop(self, n: int) -> np.ndarray:
        """The top n free pages, the topmost first."""
        out = self._stack[self._top - n:self._top][::-1].copy()
        self._top -= n
        return out

    def _push(self, pages: np.ndarray) -> None:
        """Return pages to the free stack (the last one on top)."""
        n = len(pages)
        self._stack[self._top:self._top + n] = pages
        self._top += n

    def pages_for(self, first_block: Sequence[bool]) -> list[int]:
        """Worst-case pages of new records: the sink keeps everything, other blocks their heads' largest counts."""
        return [self.plan.sink_pages if is_sink else self.plan.block_reserve_pages for is_sink in first_block]

    def can_reserve(self, first_block: Sequence[bool]) -> bool:
        """Whether `begin_forward` can reserve these new records' worst case now (SGLang's decode memory check asks
        this, through patches/schedule_batch_check_decode_mem, so a shortfall retracts requests instead of failing
        the forward)."""
        return sum(self.pages_for(first_block)) <= self._top

    # -- a forward's life -------------------------------------------------------------------------------------------
    def begin_forward(self, first_block: Sequence[bool], slots: Sequence[int]) -> Pending | None:
        """Reserve pages for the records that complete in the next forward (one per block; `first_block` marks
        sinks) and write them to rows `slots` of the device reservation table. None when there are none."""
        if not first_block:
            return None
        need = self.pages_for(first_block)
        if sum(need) > self._top:
            raise StoreExhausted(f"TCA compressed store: a forward needs up to {sum(need)} pages, {self._top} are "
                                 f"free; the admission accounting should have held them back (a bug; please report)")
        return self._reserve(need, slots)

    def _reserve(self, need: Sequence[int], slots: Sequence[int]) -> Pending:
        """A new launch: need[i] pages for new record i, written to row slots[i] of the device reservation table."""
        self.launches += 1
        self.version += 1
        reserved = [self._pop(int(n)) for n in need]
        self.n_records += len(reserved)
        self._reserved_pages += int(sum(need))
        table = np.zeros((len(reserved), self.plan.max_pages_per_record), dtype=np.int32)
        for i, r in enumerate(reserved):
            table[i, :len(r)] = r
        idx = torch.as_tensor(np.asarray(slots, dtype=np.int64))
        if self.device.type == "cuda":
            self.res_pages.index_copy_(0, idx.pin_memory().to(self.device, non_blocking=True),
                                       torch.from_numpy(table).pin_memory().to(self.device, non_blocking=True))
        else:
            self.res_pages.index_copy_(0, idx, torch.from_numpy(table))
        pending = Pending(self.launches, reserved, slots=list(slots))
        self.pending.append(pending)
        return pending

    def end_forward(self, pending: Pending | None) -> None:
        """After the forward's kernels were enqueued: copy what the last layer reported to the host, asynchronously
        (on the current stream; `settle` waits for it)."""
        if pending is None:
            return
        idx = torch.as_tensor(pending.slots, dtype=torch.int64)
        if self.device.type == "cuda":
            # pinned and non-blocking: a blocking host->device copy would wait for the whole forward here, so the
            # host could not prepare the next batch while the GPU runs this one
            idx = idx.pin_memory().to(self.device, non_blocking=True)
        pages, rows = self.out_page.index_select(0, idx), self.out_rows.index_select(0, idx)
        if self.device.type == "cuda":
            hp = torch.empty(pages.shape, dtype=pages.dtype, pin_memory=True)
            hr = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            hp.copy_(pages, non_blocking=True)
            hr.copy_(rows, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            pending.readback = (event, hp, hr)
        else:
            pending.readback = (None, pages.clone(), rows.clone())

    def settle(self, pending: Pending | None) -> None:
        """Once `pending`'s forward has finished: keep each new record's used pages, return the rest."""
        if pending is None:
            return
        assert self.pending and self.pending[0] is pending, "forwards must settle in launch order"
        self.pending.popleft()
        self.version += 1
        self._reserved_pages -= sum(len(r) for r in pending.reserved)
        event, pages, rows = pending.readback
        if event is not None:
            event.synchronize()
        pages = pages.numpy().astype(np.int64)
        used = np.ceil(self.reduce_max(rows.numpy().astype(np.int64)) / self.plan.page_rows).astype(np.int64)
        for p, u, res in zip(pages, used, pending.reserved):
            if u > len(res):
                raise RuntimeError(f"TCA record {p} used {u} pages, {len(res)} were reserved (a bug; please report)")
            if self.freed_epoch[p] >= pending.epoch:          # freed after its launch: nothing stays
                self._push(res[::-1])
                self.n_records -= 1
                continue
            if self.alive[p]:
                raise RuntimeError(f"TCA logical page {p} got a second record (a bug; please report)")
            self.alive[p] = True
            self.rec_pages[p] = res[:u]
            self._record_pages += int(u)
            self._push(res[u:][::-1])

    def release(self, logical_pages: np.ndarray) -> None:
        """SGLang freed these logical pages: their records (if any) give their pages back."""
        pages = np.asarray(logical_pages, dtype=np.int64).reshape(-1)
        self.version += 1
        self.freed_epoch[pages] = self.launches
        for p in pages[self.alive[pages]]:
            if self.alive[p]:                                 # (a page may be listed twice)
                self.alive[p] = False
                self._push(self.rec_pages[p][::-1])
                self._record_pages -= len(self.rec_pages[p])
                self.rec_pages[p] = None
                self.n_records -= 1

    def replace_records(self, logical_pages: Sequence[int], rows: np.ndarray, slots: Sequence[int]) -> Pending:
        """Inside the forward launched last (the question-aware end of prompt, `serving.observe`): the records of
        these logical pages, each settled or launched by this forward, get new contents of rows[i] rows (max over
        ranks), which this forward compacts into rows `slots` of the reservation table. The new records are exact
        (ceil(rows / page_rows) pages each) and settle as the forward after this one. The old records give their
        pages back: settled ones now (their last readers are earlier kernels of this forward on the same stream, so
        the new contents, enqueued after them, may reuse the pages), the ones this forward launched at its
        settlement, as records freed after their launch."""
        pages = np.asarray(logical_pages, dtype=np.int64)
        need = np.ceil(self.reduce_max(np.asarray(rows, dtype=np.int64)) / self.plan.page_rows).astype(np.int64)
        if need.max(initial=0) > self.plan.max_pages_per_record:
            raise RuntimeError(f"TCA record of {int(need.max())} pages, the page table holds "
                               f"{self.plan.max_pages_per_record} (a bug; please report)")
        settled = pages[self.alive[pages]]
        freeable = self._top + sum(len(self.rec_pages[p]) for p in settled)
        if need.sum() > freeable:                        # checked before anything changes
            raise StoreExhausted(f"TCA compressed store: replacing {len(pages)} records needs {int(need.sum())} "
                                 f"pages, {freeable} are free (a bug; please report)")
        self.release(settled)
        self.freed_epoch[pages] = self.launches          # the in-flight ones: freed after this forward's launch
        return self._reserve(need.tolist(), slots)

    # -- what the scheduler may admit -------------------------------------------------------------------------------
    def token_capacity(self, logical_pages_in_use: int, request_rows_in_use: int) -> int:
        """Logical tokens the scheduler may still admit: free pages, minus the expected pages of blocks already
        allocated but not yet completed, minus the worst case (above the expected share) of every block the next
        forwards may complete (one per running request, plus a prefill chunk's), at the expected share."""
        return self._capacity(self._top, max(logical_pages_in_use - self.n_records, 0), request_rows_in_use)

    def _capacity(self, free_pages: int, open_blocks: int, request_rows_in_use: int) -> int:
        nominal = self.plan.nominal_pages_per_block
        spare = free_pages - open_blocks * nominal - self._hold_back(request_rows_in_use)
        if nominal == 0:                           # blocks keep nothing (streaming): only the ids limit
            return self.plan.logical_tokens if spare >= 0 else 0
        return max(int(spare / nominal), 0) * self.block

    def _hold_back(self, request_rows_in_use: int) -> float:
        """Pages held back for what the next forwards' completing blocks may take above the nominal share: one block
        per running request plus a prefill chunk's, each at its worst case (the sink's or `block_reserve_pages`).
        With --tca-observe, also what `replace_records` takes at once: the new records of blocks whose worst-case
        reservations are still held (this forward's and, under the overlap scheduler, the previous one's), and a page
        of fragmentation per rebuilt record."""
        p = self.plan
        worst = max(p.block_reserve_pages, p.sink_pages)
        held = (request_rows_in_use + self.chunk_blocks) * max(worst - p.nominal_pages_per_block, 0.0)
        if p.observe:           # in flight: this forward's and, under the overlap scheduler, the previous one's blocks
            held += 2 * self.chunk_blocks * worst + math.ceil(p.observe_tokens / p.block) + self.chunk_blocks
        return held

    def longest_sequence(self) -> int:
        """The most tokens one sequence may reach so that SGLang admits it on an idle server and the store then holds
        it alone with every block at its worst case. Two bounds: (1) the sink whole, every other block at the larger
        of `block_reserve_pages` and the nominal pages `token_capacity` charges it, beside `token_capacity`'s
        hold-back for one running request (else a prompt could stall mid-prefill once its own blocks fill the store,
        with nothing left to evict); (2) below `token_capacity` of the empty store by a page (SGLang's PrefillAdder
        admits a request only when its input, its clipped max_new_tokens and a page are below what is free). SGLang
        refuses longer inputs and clips max_new_tokens to it through patches/tp_worker_get_worker_info."""
        plan = self.plan
        nominal = plan.nominal_pages_per_block
        if nominal == 0:                                   # blocks keep nothing (streaming): only the ids limit
            return plan.logical_tokens
        pages = plan.heap_pages - 1 - plan.sink_pages - self._hold_back(1)
        worst = 0 if pages < 0 else (1 + int(pages // max(plan.block_reserve_pages, nominal))) * self.block
        return max(min(worst, self._capacity(plan.heap_pages - 1, 0, 0) - self.block), 0)     # of the empty store

    # -- checks -----------------------------------------------------------------------------------------------------
    def check_counts(self) -> None:
        """The O(1) part of `check`: free, recorded and reserved pages add up to the store."""
        total = self.plan.heap_pages - 1
        assert self.free_pages + self.record_pages + self.reserved_pages == total, \
            f"TCA store pages: {self.free_pages} free + {self.record_pages} in records + {self.reserved_pages} " \
            f"reserved != {total}"

    def check(self, live_logical_pages: np.ndarray | None = None) -> None:
        """Raise AssertionError when pages are lost or doubly owned; with `live_logical_pages` (at idle: the pages the
        radix cache holds), also when a live record is not among them or a held full page has no record."""
        total = self.plan.heap_pages - 1
        records = [self.rec_pages[p] for p in np.flatnonzero(self.alive)]
        reserved = [r for p in self.pending for r in p.reserved]
        assert self._record_pages == sum(len(r) for r in records) and \
            self._reserved_pages == sum(len(r) for r in reserved), "TCA store: page counters drifted"
        self.check_counts()
        seen = np.bincount(np.concatenate([self.free, *records, *reserved]).astype(np.int64),
                           minlength=self.plan.heap_pages)
        assert len(seen) == self.plan.heap_pages and seen[0] == 0 and (seen[1:] == 1).all(), \
            "TCA store: a page is lost or owned twice"
        assert self.n_records == int(self.alive.sum()) + sum(len(p.reserved) for p in self.pending), \
            "TCA store: record count drifted"
        if live_logical_pages is not None:
            live = np.zeros_like(self.alive)
            live[np.asarray(live_logical_pages, dtype=np.int64)] = True
            assert not (self.alive & ~live).any(), \
                f"TCA store: records of freed logical pages {np.flatnonzero(self.alive & ~live)[:8].tolist()}"
            assert not (live & ~self.alive).any(), \
                f"TCA store: cached logical pages without a record {np.flatnonzero(live & ~self.alive)[:8].tolist()}"
