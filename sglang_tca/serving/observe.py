"""The question-aware end of prompt (`--tca-observe N`, `algorithm.prompt_mask`) on freed memory.

An observing request keeps its whole prompt dense until the forward that processes the prompt's last N queries
(docs/OBSERVE_DESIGN.md: it neither matches nor inserts in the radix cache, its dense slots are not freed before,
and no prefill chunk ends among its last N tokens), so every compressed token's K/V is still at its dense slot.
In that forward, per layer, after the prefix-pure pass (`observe_layer`):
  1. per KV head, the number of tokens the prefix-pure records of the compressed blocks 1..nc keep
     (nc = dense_start(n0) / b - 1 at the prompt's length n0);
  2. `algorithm.observe_keep`: the last N queries choose that many tokens per head among all compressed positions,
     from the prompt's dense keys;
  3. the blocks' keep masks in the store become the choice (their rows are rebuilt at the last layer);
  4. the last N queries attend again (`tca_sparse_attention`, kept lists of the sink and the chosen tokens at their
     dense rows) and their outputs are overwritten.
After the last layer's (`rebuild`): the new records' row counts come to the host (an observing prompt's one
synchronisation), the store replaces the old records by exact new ones (`CompressedStore.replace_records`) and the
compaction runs again for every layer, from the dense slots. The next forwards (decode) read the chosen tokens from
the store.
With --tca-observe-prefill dense (SnapKV's way), every extend of an observing prompt attends to the whole prompt
instead of the prefix-pure selection (`DensePrefillLists`; the prefix-pure records are still made, for their counts),
and step 4 is left out: only the decode reads the choice.
The scheduler's side (`ObserveRule`, used by sglang_tca/serving/radix.py and the PrefillAdder patches) decides
from lengths alone, so identically on every rank: which prefills observe, and where their chunks may end.
Tests: tests/test_serving_pipeline.py (against `algorithm.prompt_mask`, dense slots freed and poisoned after),
tests/test_serving_backend.py (inside SGLang's radix cache, chunk cache and PrefillAdder).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_tca.algorithm import observe_keep
from sglang_tca.kernels.compaction import compact_blocks
from sglang_tca.kernels.sparse_attention import tca_sparse_attention
from sglang_tca.params import TCAParams, dense_start
from sglang_tca.serving.selection import pack_bits, unpack_bits
from sglang_tca.serving.sizing import MemoryPlan
from sglang_tca.serving.store import CompressedStore, Pending


@dataclass(frozen=True)
class ObserveRule:
    """Which prefills observe, and where their chunks may end. A prefill of `fill` tokens (a prompt, or a retracted
    request's prompt and output so far) observes when N > 0, it has compressed blocks at its end and it is at most
    `max_tokens` long (`MemoryPlan.observe_tokens`: it holds every token dense until its end). Its last chunk must
    hold its last N queries, so no chunk may end inside (P0, fill), P0 = b * floor((fill - N) / b)."""
    n: int
    block: int
    window: int
    max_tokens: int

    @classmethod
    def of(cls, plan: MemoryPlan) -> ObserveRule:
        return cls(plan.observe, plan.block, plan.window, plan.observe_tokens)

    def observes(self, fill: int) -> bool:
        return self.n > 0 and fill <= self.max_tokens and dense_start(fill, self.block, self.window) >= 2 * self.block

    def last_chunk_start(self, fill: int) -> int:
        return self.block * ((fill - self.n) // self.block)

    def chunk_limit(self, start: int, fill: int, room: int) -> int | None:
        """An observing prefill at `start` whose next chunk SGLang would let take `room` tokens: None when the rest
        fits (the chunk ends at the prefill's end), else the most tokens the chunk may take so that it ends at or
        before P0 (0: wait for room for the whole rest)."""
        if fill - start <= room:
            return None
        self.check_chunk(start, fill)                    # the previous chunk ended at start
        return min(self.last_chunk_start(fill) - start, room)

    def check_chunk(self, end: int, fill: int) -> None:
        """Raise when a chunk of a prefill of `fill` tokens ends inside its last N tokens (after P0)."""
        if self.last_chunk_start(fill) < end < fill:
            raise RuntimeError(f"TCA --tca-observe: a prefill of {fill} tokens got a chunk ending at {end}, inside its "
                               f"last {fill - self.last_chunk_start(fill)} tokens (a bug; please report)")


def add_with_chunk_limit(adder, req, room: int, add, wait):
    """SGLang's PrefillAdder step `add()` (add_one_req / add_chunked_req) for an observing prefill whose next chunk
    SGLang would let take `room` tokens, with its chunk limit lowered to `ObserveRule.chunk_limit`'s; `wait` (that
    step's "not this round") when the request must wait for room. A limited chunk (or a wait) leaves no chunk budget
    to the round, as SGLang's own truncation does: SGLang chunks one request at a time (another one chunked into the
    rest would trip its `chunked_req` assertion), and a request that waits must not have others run past it."""
    rule = ObserveRule.of(adder.token_to_kv_pool_allocator.store.plan)
    start, fill = len(req.prefix_indices), len(req.full_untruncated_fill_ids)
    limit = rule.chunk_limit(start, fill, room)
    if limit is None:
        out = add()
    elif limit <= 0:
        adder.rem_chunk_tokens = 0
        return wait
    else:
        adder.rem_chunk_tokens = limit
        out = add()
        adder.rem_chunk_tokens = 0
    if req in adder.can_run_list:
        rule.check_chunk(req.extend_range.end, fill)
    return out


@dataclass(frozen=True)
class ObservingPrompt:
    row: int          # the request's req_to_token row
    length: int       # n0: the prompt's length, where this forward's extend of it ends
    q_end: int        # index past the prompt's last query among the forward's packed queries


def compressed_pages(req_to_token: torch.Tensor, prompt: ObservingPrompt, p: TCAParams) -> torch.Tensor:
    """The logical pages of the blocks 1..nc that are compressed at the prompt's length."""
    nc = int(dense_start(prompt.length, p.block, p.window)) // p.block - 1
    cols = torch.arange(1, nc + 1, device=req_to_token.device) * p.block
    return req_to_token[prompt.row, cols].long() // p.block


def _dense_rows(l2d, req_to_token, row: int, length: int, dense_base: int, hkv: int) -> torch.Tensor:
    """[length, Hkv] arena rows of the dense K/V of request row `row`'s first `length` positions (all still dense)."""
    slots = l2d[req_to_token[row, :length].long()].long()
    return dense_base + slots[:, None] * hkv + torch.arange(hkv, device=slots.device)


class DensePrefillLists:
    """--tca-observe-prefill dense: the kept lists under which `tca_sparse_attention` attends one observing prompt's
    extend densely. Every position below the dense start of the extend's last query, of every KV head, at its dense
    row (all of them are still dense); the kernel's per-query bounds give each earlier query its own causal part, so
    each query sees its whole prefix. Built once per forward; `lists(dense_base)` per layer."""

    def __init__(self, l2d: torch.Tensor, req_to_token: torch.Tensor, row: int, length: int, hkv: int,
                 p: TCAParams):
        n = 0 if length < p.block else int(dense_start(length, p.block, p.window))   # no sink yet: all of it dense
        dev = req_to_token.device
        self._rows = _dense_rows(l2d, req_to_token, row, n, 0, hkv).t().flatten()          # (head, position)
        self.kept_pos = torch.arange(n, dtype=torch.int32, device=dev).repeat(hkv)
        self.kept_indptr = torch.arange(hkv + 1, dtype=torch.int32, device=dev) * n

    def lists(self, dense_base: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kept_indptr, kept_row, kept_pos) of this layer."""
        return self.kept_indptr, (self._rows + dense_base).int(), self.kept_pos


def observe_layer(q: torch.Tensor, out: torch.Tensor, layer: int, prompt: ObservingPrompt, *,
                  store: CompressedStore, arena_k: torch.Tensor, arena_v: torch.Tensor, dense_base: int,
                  l2d: torch.Tensor, req_to_token: torch.Tensor, p: TCAParams, scale: float) -> None:
    """Steps 1-4 of the module docstring for one prompt and one layer. q [T, Hq, D] and out [T, Hq, Dv] are the
    forward's packed queries and this layer's attention outputs (the prompt's last N rows are overwritten; with
    p.observe_prefill "dense" they already attended to the whole prompt and stay: only the choice is written)."""
    pages = compressed_pages(req_to_token, prompt, p)
    if pages.numel() == 0:                            # nothing compressed: the prefix-pure pass is the answer
        return
    hkv, n_obs, b = store.mask.shape[2], p.observe, p.block
    rows = _dense_rows(l2d, req_to_token, prompt.row, prompt.length, dense_base, hkv)        # [n0, Hkv]
    k = arena_k[rows].transpose(0, 1)                                              # [Hkv, n0, D]
    q_obs = q[prompt.q_end - n_obs:prompt.q_end]                                   # [N, Hq, D]
    counts = unpack_bits(store.mask[pages, layer], b).sum((0, 2))                  # [Hkv]
    chosen = observe_keep(q_obs.transpose(0, 1), k, counts, p, scale)              # [Hkv, nc * b]
    store.mask[pages, layer] = pack_bits(chosen.view(hkv, -1, b)).transpose(0, 1)
    if p.observe_prefill == "dense":
        return
    keep = torch.cat([chosen.new_ones(hkv, b), chosen], 1)                          # the sink, then the choice
    kept_row, kept_pos, kept_indptr = _kept_lists(keep, rows)
    dev = q.device                                     # the request's row, first query and offsets, made on the device
    tca_sparse_attention(q_obs, arena_k, arena_v, dense_base, hkv, l2d, req_to_token,
                         torch.full((1,), prompt.row, device=dev), torch.full((1,), prompt.length - n_obs, device=dev),
                         torch.arange(2, dtype=torch.int32, device=dev) * n_obs, kept_indptr, kept_row, kept_pos,
                         b, p.window, scale, out=out[prompt.q_end - n_obs:prompt.q_end], max_q_len=n_obs)


def _kept_lists(keep: torch.Tensor, rows: torch.Tensor):
    """(kept_row, kept_pos, kept_indptr) of one request for `tca_sparse_attention`: per KV head, the positions keep
    [Hkv, L] keeps, ascending, and their arena rows (rows [>= L, Hkv]). Without a host synchronisation (nonzero would
    wait for the device once per layer): each kept entry is scattered to its exclusive-cumsum offset, the dropped ones
    to a trash slot past the end."""
    hkv, length = keep.shape
    flat = keep.flatten()
    dest = torch.where(flat, flat.cumsum(0) - 1, hkv * length)
    pos = torch.arange(length, dtype=torch.int32, device=keep.device).repeat(hkv)
    kept_pos = torch.empty(hkv * length + 1, dtype=torch.int32, device=keep.device).scatter_(0, dest, pos)
    kept_row = torch.empty_like(kept_pos).scatter_(0, dest, rows[:length].t().flatten().int())
    return kept_row, kept_pos, torch.nn.functional.pad(keep.sum(1).cumsum(0), (1, 0)).int()


def rebuild(prompts: list[ObservingPrompt], *, store: CompressedStore, arena_k: torch.Tensor, arena_v: torch.Tensor,
            dense_bases: list[int], l2d: torch.Tensor, req_to_token: torch.Tensor, p: TCAParams,
            first_slot: int) -> Pending | None:
    """After the last layer's `observe_layer`: the observed blocks' records are replaced by exact ones holding the
    chosen tokens (reservation rows first_slot.. of this forward). Returns their reservation, which the caller ends
    and settles after the forward's own (`CompressedStore.end_forward` / `settle`)."""
    if not prompts:
        return None
    pages = torch.cat([compressed_pages(req_to_token, r, p) for r in prompts])
    if pages.numel() == 0:
        return None
    n = pages.numel()
    if first_slot + n > store.res_pages.shape[0]:
        raise RuntimeError(f"TCA --tca-observe: {n} observed blocks need reservation rows {first_slot}..{first_slot + n}"
                           f" of {store.res_pages.shape[0]} (a bug in the sizing; please report)")
    rows = unpack_bits(store.mask[pages], p.block).sum((1, 2, 3))                  # per record, all layers and heads
    host = torch.stack([pages, rows]).cpu().numpy()                                # the one synchronisation
    pending = store.replace_records(host[0], host[1], list(range(first_slot, first_slot + n)))
    slots = torch.arange(first_slot, first_slot + n, device=pages.device)
    for layer, base in enumerate(dense_bases):
        compact_blocks(arena_k, arena_v, l2d, pages, slots, store, layer, base, p.block)
    return pending
