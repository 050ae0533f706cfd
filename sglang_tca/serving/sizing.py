"""How a TCA server splits SGLang's KV byte budget (pure arithmetic, no torch, testable on CPU).

SGLang sizes its KV pool as `budget / cell` tokens, cell = layers x KV heads x (D + Dv) x dtype bytes. TCA spends the
same budget on four parts (one KV head row = D or Dv elements of one (layer, KV head, token)):

  dense pool       `dense_tokens` slots x cell: the sink and window of running requests, prefill chunks in flight,
                   and the windows the radix cache keeps (SGLang's hybrid-SWA "swa" pool, freed out of window);
  compressed store `heap_pages` pages of `page_rows` K and V rows: the kept rows of every completed block;
  tables           per logical page (= one block of `block` tokens): its keep masks, row offsets, page list and
                   row cursor, plus SGLang's logical->dense map (8 bytes per logical token);
  fixed buffers    the kept-token lists the attention reads (rows: context x KV heads for each request of the
                   largest of the CUDA-graph batch, EXTEND_GROUP_REQUESTS and the running requests that
                   DECODE_LIST_SHARE of the budget holds; positions, for prefill: EXTEND_GROUP_REQUESTS x context x KV
                   heads) and the per-step page reservations. Batches are attended in groups of requests that
                   fit them.

With --tca-observe, the dense pool above its minimum bounds the prefills that observe (each holds its whole prompt
dense until its end: `MemoryPlan.observe_tokens`), and the reservation table gets a row per block of such a prompt.

Logical token ids (SGLang's "full" pool) cost only their table bytes, so there are more of them than the store holds
at the expected kept share (`LOGICAL_SLACK`): the store, not the ids, is what runs out, and the scheduler sees the
store through `CompressedStore.token_capacity`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

ROWS_PER_PAGE = 64         # rows of one compressed-store page
LOGICAL_SLACK = 2.0        # logical ids per token the store holds at the expected share (actual shares may be lower)
MAX_LOGICAL_PER_DENSE = 8  # at most this many logical ids per dense token of the budget (their tables cost memory)
EXTEND_GROUP_REQUESTS = 4  # full-context requests whose kept lists one prefill attention call holds
DECODE_LIST_SHARE = 0.005  # budget share the decode kept rows may take to hold every running request's lists
DEFAULT_DENSE_SHARE = 0.2   # share of the budget for the dense pool unless --tca-dense-tokens / max running requests say
BALANCE_TOKENS = 16384      # under --max-running-requests, the dense pool holds windows for at most as many requests
                            # as the store holds of this length at the expected share (long-context serving)


class SizingError(ValueError):
    """The KV budget cannot hold a working TCA memory split; the message says what to change."""


@dataclass(frozen=True)
class ModelDims:
    layers: int
    kv_heads: int          # on this tensor-parallel rank
    head_dim: int
    v_head_dim: int
    dtype_bytes: int

    @property
    def cell(self) -> int:
        """Bytes of one dense token (all layers, K and V)."""
        return self.layers * self.kv_heads * (self.head_dim + self.v_head_dim) * self.dtype_bytes

    @property
    def row_bytes(self) -> int:
        """Bytes of one K row plus one V row."""
        return (self.head_dim + self.v_head_dim) * self.dtype_bytes

    @property
    def rows_per_block(self) -> int:
        """Rows of a block that keeps everything (the sink): block tokens x layers x KV heads / block tokens."""
        return self.layers * self.kv_heads


@dataclass(frozen=True)
class MemoryPlan:
    dims: ModelDims
    block: int
    window: int
    dense_tokens: int       # dense pool slots (a multiple of block), padding page not included
    heap_pages: int         # compressed-store pages, the trash page 0 included
    logical_tokens: int     # logical ids (a multiple of block), padding page not included
    max_pages_per_record: int   # page-table width: the pages the largest record (the sink) can need
    block_reserve_pages: int    # pages reserved for a completing block before its kept count is known
    expected_share: float       # mean kept share of a compressed block (budgets' rho, policy applied)
    decode_kept_rows: int       # capacity of the kept-row list (decode and prefill)
    reservation_rows: int       # rows of the per-step page-reservation table
    budget_bytes: int
    page_rows: int = ROWS_PER_PAGE
    extend_kept_rows: int = 0   # capacity of the kept-position list (prefill only)
    observe: int = 0            # --tca-observe N: a prompt's last N queries re-choose its compressed tokens
    observe_tokens: int = 0     # the longest prefill that observes (its whole prompt stays dense until its end)

    @property
    def page_bytes(self) -> int:
        """Bytes of one compressed-store page (page_rows K rows and V rows)."""
        return self.page_rows * self.dims.row_bytes

    @property
    def sink_pages(self) -> int:
        """Pages of the sink's record, which keeps every row of its block."""
        return math.ceil(self.dims.rows_per_block * self.block / self.page_rows)

    @property
    def logical_pages(self) -> int:
        return self.logical_tokens // self.block

    @property
    def table_bytes_per_logical_page(self) -> int:
        d = self.dims
        masks_offsets = d.layers * d.kv_heads * (8 + 4)
        return masks_offsets + 4 * self.max_pages_per_record + 4 + 8 * self.block

    @property
    def dense_bytes(self) -> int:
        return (self.dense_tokens + self.block) * self.dims.cell

    @property
    def heap_bytes(self) -> int:
        return self.heap_pages * self.page_bytes

    @property
    def table_bytes(self) -> int:
        return (self.logical_pages + 1) * self.table_bytes_per_logical_page

    @property
    def fixed_bytes(self) -> int:
        return 4 * (self.decode_kept_rows + self.extend_kept_rows) + 4 * self.reservation_rows * self.max_pages_per_record

    @property
    def total_bytes(self) -> int:
        return self.dense_bytes + self.heap_bytes + self.table_bytes + self.fixed_bytes

    @property
    def nominal_pages_per_block(self) -> float:
        """Pages a compressed block takes at the expected share: its rows, half a page of fragmentation, and at
        least one page when it keeps anything (none under the "streaming" policy, share 0)."""
        if self.expected_share == 0:
            return 0.0
        return max(self.dims.rows_per_block * self.block * self.expected_share / self.page_rows + 0.5, 1.0)

    @property
    def expected_store_tokens(self) -> int:
        """Tokens of compressed blocks the store holds at the expected kept share."""
        nominal = self.nominal_pages_per_block
        return self.logical_tokens if nominal == 0 else int((self.heap_pages - 1) / nominal * self.block)

    @property
    def arena_rows(self) -> int:
        """Rows of the K (and of the V) arena: the store's pages, then every layer's dense slots x KV heads."""
        return self.dense_base(self.dims.layers)

    def dense_base(self, layer: int) -> int:
        """First arena row of `layer`'s dense buffer ([dense slots + padding page, KV heads] rows)."""
        return self.heap_pages * self.page_rows + layer * (self.dense_tokens + self.block) * self.dims.kv_heads

    def summary(self, dense_equivalent_tokens: int) -> str:
        gib = 2 ** 30
        observe = (f"; --tca-observe {self.observe}: prefills of up to {self.observe_tokens} tokens observe (each holds "
                   f"its whole prompt dense until its end), longer ones run without" if self.observe else "")
        return (f"TCA KV memory: dense pool {self.dense_bytes / gib:.2f} GiB ({self.dense_tokens} tokens: sinks, "
                f"windows, prefill chunks in flight), compressed store {self.heap_bytes / gib:.2f} GiB "
                f"({self.heap_pages} pages; about {self.expected_store_tokens} tokens at the budgets' expected kept "
                f"share {self.expected_share:.3f}), tables and buffers {(self.table_bytes + self.fixed_bytes) / gib:.2f}"
                f" GiB ({self.logical_tokens} logical token ids); the same budget holds {dense_equivalent_tokens} "
                f"dense tokens{observe}")


def block_reserve_pages(dims: ModelDims, block: int, max_keep_per_head: list[list[int]] | None,
                        page_rows: int = ROWS_PER_PAGE) -> int:
    """Pages a compressed block j >= 1 can need at most: its heads' largest reachable keep counts (from the budgets'
    thresholds, policy applied), summed over layers and KV heads."""
    if max_keep_per_head is None:
        rows = dims.rows_per_block * block
    else:
        rows = sum(sum(h) for h in max_keep_per_head)
    return math.ceil(rows / page_rows)


def plan_memory(dims: ModelDims, *, budget_bytes: int, block: int, window: int, expected_share: float,
                block_reserve: int, context_len: int, graph_max_bs: int, chunk_tokens: int, max_requests: int,
                dense_tokens: int | None = None, dense_requests: int | None = None,
                dense_share: float = DEFAULT_DENSE_SHARE, page_rows: int = ROWS_PER_PAGE, observe: int = 0
                ) -> MemoryPlan:
    """Split `budget_bytes` (SGLang's KV budget) into dense pool, compressed store, tables and fixed buffers.

    max_requests: SGLang's request rows (bounds the blocks one forward can complete). The dense pool is
    `dense_tokens` if given; else, with `dense_requests` (the user's --max-running-requests), enough for that many
    requests' windows (one and a half each, see below) plus two prefill chunks, but for no more requests than the
    rest of the budget holds in the store at BALANCE_TOKENS tokens each (a dense pool for more windows than the store
    holds requests stands idle: on an H100, 128 requests' windows took 57% of the budget and the store ran full at 29
    running 20K-token requests with 13% of the dense pool in use, 2026-12-07); else `dense_share` of the budget.
    It is never smaller than two prefill chunks plus four requests at their peak (a request must be able to run).
    With `observe` > 0 (--tca-observe), prefills of up to `observe_tokens` tokens observe: the dense pool above
    that minimum (and at most the context), since such a prompt holds all its tokens dense until its last chunk;
    the reservation table gets a row for each of its blocks and a chunk's more (their records are rebuilt in that
    forward).
    Raises SizingError when the budget is too small."""
    if not 0.0 <= expected_share <= 1.0:
        raise SizingError(f"expected kept share must be in [0, 1], got {expected_share}")
    # A running request holds its own window plus partial pages and, until it has decoded window + block tokens, the
    # last window of its cached prompt (the radix cache's SWA lock, evictable after that: SCHEDULER_ENV in memory.py).
    # So two windows at its peak, and about one and a half on average while requests start and finish in turn.
    peak_request = 2 * (window + block) + 2 * block
    mean_request = 3 * (window + block) // 2 + 2 * block
    two_chunks = 2 * max(chunk_tokens, block)
    min_dense = _round_up(two_chunks + 4 * peak_request, block)
    if dense_tokens is None:
        if dense_requests is not None:
            dense_tokens = min(two_chunks + dense_requests * mean_request,
                               _balanced_dense_tokens(dims, budget_bytes, block, window, expected_share, page_rows,
                                                      two_chunks, mean_request))
        else:
            dense_tokens = int(dense_share * budget_bytes / dims.cell)
    dense_tokens = max(_round_up(dense_tokens, block), min_dense)
    observe_tokens = min(dense_tokens - min_dense, context_len) if observe > 0 else 0
    max_pages = max(math.ceil(dims.rows_per_block * block / page_rows), block_reserve)
    # a forward's own completing blocks; with observe, also the rebuilt blocks of the prompts ending in it: one up to
    # observe_tokens long and whole prompts admitted beside it within one chunk
    chunk_blocks = max(chunk_tokens, block) // block
    reservation_rows = max(graph_max_bs, chunk_blocks + max_requests + 1 +
                           (math.ceil(observe_tokens / block) + chunk_blocks if observe_tokens else 0))
    extend_kept_rows = EXTEND_GROUP_REQUESTS * context_len * dims.kv_heads
    # Decode attends a batch in groups of requests whose lists fit (TCAAttnBackend._groups); a CUDA graph's batch
    # must fit one group, and so, within DECODE_LIST_SHARE of the budget, must every batch of max_requests (eager
    # decode above the graphs' batch sizes would otherwise launch the kept lists and attention once per group).
    per_request = context_len * dims.kv_heads
    all_requests = min(max_requests, int(DECODE_LIST_SHARE * budget_bytes) // (4 * per_request))
    decode_kept_rows = max(graph_max_bs, EXTEND_GROUP_REQUESTS, all_requests) * per_request

    def plan(heap_pages: int, logical_tokens: int) -> MemoryPlan:
        return MemoryPlan(dims, block, window, dense_tokens, heap_pages, logical_tokens, max_pages, block_reserve,
                          expected_share, decode_kept_rows, reservation_rows, budget_bytes, page_rows,
                          extend_kept_rows, observe, observe_tokens)

    # Logical ids scale with the store: LOGICAL_SLACK x the tokens it holds at the expected share, plus the dense pool.
    # Near-zero shares (streaming) would ask for ids whose tables outweigh the store: cap them.
    probe = plan(1, 0)
    rest = budget_bytes - probe.dense_bytes - probe.fixed_bytes - probe.table_bytes_per_logical_page
    nominal = max(probe.nominal_pages_per_block, 1.0)
    max_logical = MAX_LOGICAL_PER_DENSE * budget_bytes // dims.cell
    logical_per_page = min(LOGICAL_SLACK / nominal, max_logical / block / max(rest // probe.page_bytes, 1))
    per_page = probe.page_bytes + logical_per_page * probe.table_bytes_per_logical_page
    heap_pages = int(rest // per_page)
    if heap_pages < 2 * max_pages + 1:
        raise SizingError(f"the KV budget ({budget_bytes / 2**30:.2f} GiB) leaves no room for TCA's compressed store "
                          f"after a dense pool of {dense_tokens} tokens; raise --mem-fraction-static, lower "
                          f"--chunked-prefill-size or --cuda-graph-max-bs, or set --tca-dense-tokens")
    logical_tokens = min(_round_up(int(logical_per_page * heap_pages) * block + dense_tokens, block),
                         max_logical // block * block)
    out = plan(heap_pages, logical_tokens)
    while out.total_bytes > budget_bytes and out.heap_pages > 2 * max_pages + 1:   # rounding: shave pages
        out = plan(out.heap_pages - 1, out.logical_tokens)
    if out.arena_rows >= 2 ** 31:
        raise SizingError(f"the KV arena would have {out.arena_rows} rows; the kernels index rows with int32")
    return out


def _balanced_dense_tokens(dims: ModelDims, budget_bytes: int, block: int, window: int, share: float, page_rows: int,
                           two_chunks: int, mean_request: int) -> int:
    """The dense pool D whose windows, (D - two_chunks) / mean_request, are as many as the requests of BALANCE_TOKENS
    tokens the rest of the budget holds in the store: each its compressed blocks at the nominal pages of
    `MemoryPlan.nominal_pages_per_block` and its logical pages' tables (fixed buffers are left out: a small share)."""
    probe = MemoryPlan(dims, block, window, 0, 0, 0, 1, 0, share, 0, 0, budget_bytes, page_rows)
    blocks = (BALANCE_TOKENS - window - block) / block
    per_request = blocks * probe.nominal_pages_per_block * probe.page_bytes + \
        BALANCE_TOKENS / block * probe.table_bytes_per_logical_page
    # (D - c) / m = (budget - D * cell) / e   =>   D = (budget / e + c / m) / (1 / m + cell / e)
    d = (budget_bytes / per_request + two_chunks / mean_request) / (1 / mean_request + dims.cell / per_request)
    return int(d)


def _round_up(x: int, m: int) -> int:
    return -(-int(x) // m) * m
