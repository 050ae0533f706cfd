"""TCA's prefix cache: SGLang's own radix cache for hybrid sliding-window models, with the dense window of TCA.

Registered as the radix-cache backend "tca" (`--radix-cache-backend tca`, set by the plugin). With the radix cache
on it is SGLang's UnifiedRadixCache with the FULL (logical ids, which name the compressed records) and SWA (dense
slots) components and sliding window W = window + block; with --disable-radix-cache, SGLang's SWAChunkCache.

What this gives, unchanged from SGLang's hybrid-SWA semantics:
  * a node whose dense slots were freed keeps its logical ids (a tombstone): its blocks stay readable compressed;
  * a prefix matches only where the W tokens before the match point are still dense, which is exactly what the
    next query needs (its dense window [dense_start(m + 1), m) lies inside them), so a request that reuses a cached
    prefix computes what a fresh request would (prefix purity makes the cached records equal to fresh ones);
  * a finished request inserts its whole sequence with the last window dense, so a conversation's next turn reuses
    everything up to the last full block;
  * under dense pressure the least recently used windows are tombstoned first, under store pressure (the
    allocator reports it as logical pressure) the least recently used leaves are evicted with their records.
A prefill that observes (--tca-observe, `serving.observe.ObserveRule`; marked at its match as
`req.tca_observe_end`, its length) matches nothing, inserts nothing and frees no dense slot before its end: its
last N queries choose among every compressed token, so it can start from no cached (already compressed) prefix, and
its records depend on its question, so no other request may read them. Its dense slots are freed by SGLang's decode
steps once it decodes (`ScheduleBatch._evict_swa`; patches/schedule_batch_evict_swa.py keeps the chunk cache's
prefill frees off it).
Both caches report the free logical ids the allocator holds back for the store (`store_held_tokens`) as held, so
SGLang's conservation check (free + evictable + protected + held == total) still counts every logical id;
`sanity_check` adds the store's own invariants (no page lost or doubly owned; at idle, a record exactly for every
cached logical page), in full once a state has held for a second.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from sglang.srt.mem_cache.base_prefix_cache import zero_match_result
from sglang.srt.mem_cache.chunk_cache import SWAChunkCache
from sglang.srt.mem_cache.unified_cache.components import ComponentType
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from sglang_tca.serving.observe import ObserveRule


def observing(req) -> bool:
    """Whether this request's prefill observes (set at its last match; retraction re-matches)."""
    return bool(getattr(req, "tca_observe_end", 0))


class _TCACache:
    """What both caches add: the store's held-back ids, and observing prefills' match."""

    def session_held_full_tokens(self, active_pool_idxs=None) -> int:
        return super().session_held_full_tokens(active_pool_idxs) + \
            self.token_to_kv_pool_allocator.store_held_tokens()

    def match_prefix(self, params):
        result = super().match_prefix(params)
        req = params.req
        if req is None:                                  # SGLang's own re-match after an insert
            return result
        # Also called from the scheduling policy's priority pass (calc_priority), with fill ids not yet refreshed;
        # init_next_round_input matches again, with them, before the request is added (and nothing reads it between)
        fill = len(req.full_untruncated_fill_ids)
        req.tca_observe_end = fill if ObserveRule.of(self.token_to_kv_pool_allocator.store.plan).observes(fill) else 0
        return zero_match_result(self, result, extra_key=req.extra_key) if req.tca_observe_end else result


class TCAChunkCache(_TCACache, SWAChunkCache):
    pass


class TCARadixCache(_TCACache, UnifiedRadixCache):
    full_check_after_s = 1.0          # the full check waits until the state has been unchanged this long
    _checked = None                   # the state the last full check passed in (`_state`)
    _seen = None                      # the state of the last call, and since when it holds
    _seen_since = 0.0

    def _state(self) -> tuple:
        """What changes whenever the tree or the store does: the store's version and the tree's size counters."""
        return (self.token_to_kv_pool_allocator.store.version, self.full_evictable_size(), self.full_protected_size(),
                self.swa_evictable_size(), self.swa_protected_size())

    def cache_unfinished_req(self, req, chunked: bool = False, **kwargs) -> None:
        if not observing(req):
            return super().cache_unfinished_req(req, chunked=chunked, **kwargs)
        # SGLang's radix-disabled branch: no insert, no out-of-window free; the next chunk extends this prefix
        req.prefix_indices = self.req_to_token_pool.req_to_token[req.req_pool_idx, :len(req.get_fill_ids())].to(
            dtype=torch.int64, copy=True)

    def cache_finished_req(self, req, is_insert: bool = True, **kwargs) -> None:
        super().cache_finished_req(req, is_insert=is_insert and not observing(req), **kwargs)

    def sanity_check(self):
        """SGLang's tree check and the store's. SGLang calls this on every pass of its idle event loop (for hybrid-SWA
        caches, which TCA's is). With millions of store pages the full check takes tens of milliseconds, which a
        request arriving at that moment would wait for (back-to-back requests always did: their server goes idle
        between them). So a new state gets the store's O(1) page count at once, and the full check (tree, every
        page, records against the cached pages) once it has been unchanged for `full_check_after_s`; a state that
        passed is not checked again."""
        state = self._state()
        if state == self._checked:
            return
        store = self.token_to_kv_pool_allocator.store
        now = time.monotonic()
        if state != self._seen:
            self._seen, self._seen_since = state, now
        if now - self._seen_since < self.full_check_after_s:
            store.check_counts()
            return
        super().sanity_check()
        if self.protected_size() == 0 and not store.pending:        # idle: the tree holds every live record
            store.check(cached_logical_pages(self))
        else:
            store.check()
        self._checked = state


def cached_logical_pages(tree: UnifiedRadixCache) -> np.ndarray:
    """The logical pages the radix tree holds (a host copy, for the idle check)."""
    values = tree.all_values_flatten()
    return torch.unique(values // tree.page_size).cpu().numpy() if values.numel() else np.zeros(0, dtype=np.int64)


def create_tree_cache(ctx):
    """The registered factory (sglang.srt.mem_cache.registry.RadixCacheFactory)."""
    allocator = ctx.params.token_to_kv_pool_allocator
    window = allocator.store.plan.window + allocator.store.plan.block
    params = dataclasses.replace(ctx.params, sliding_window_size=window,
                                 tree_components=(ComponentType.FULL, ComponentType.SWA))
    if ctx.disable_radix_cache:
        return TCAChunkCache(params)
    return TCARadixCache(params)
