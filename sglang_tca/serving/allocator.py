"""TCA's token allocator: SGLang's hybrid-SWA allocator over logical ids ("full") and dense slots ("swa").

Both sub-allocators are SGLang's paged allocator with page size = block, so a block is one logical page and one
dense page while it is dense. Two things differ from SGLang's own hybrid-SWA allocator:
  * the logical allocator tells the compressed store which logical pages it frees (their records' pages return);
  * `full_available_size` is what the store can still hold, converted to logical tokens
    (`CompressedStore.token_capacity`), when that is less than the free logical ids: SGLang's scheduler then admits,
    evicts and retracts by the store's real free memory, with its own logic. The free ids this holds back
    (`store_held_tokens`) are reported to SGLang's invariant checker as held (sglang_tca.serving.radix), so its
    conservation check still counts every logical id.
"""
from __future__ import annotations

import torch
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator

from sglang_tca.serving.sizing import MemoryPlan
from sglang_tca.serving.store import CompressedStore


class LogicalAllocator(PagedTokenToKVPoolAllocator):
    """Logical ids in pages of one block; frees reach the compressed store."""

    store: CompressedStore | None = None

    def _release_page_ids(self, *page_ids: torch.Tensor):
        super()._release_page_ids(*page_ids)
        if self.store is not None:
            # A host copy of the freed page ids: SGLang's free paths synchronise already (torch.unique, SWA masks).
            self.store.release(torch.cat(page_ids).cpu().numpy())

    def clear(self):
        super().clear()
        if self.store is not None:
            self.store.clear()

    def pages_in_use(self) -> int:
        return self.num_pages - len(self.free_pages) - len(self.release_pages)


class TCATokenToKVPoolAllocator(SWATokenToKVPoolAllocator):
    def __init__(self, plan: MemoryPlan, kvcache, store: CompressedStore, req_to_token_pool, *,
                 dtype: torch.dtype, device: str):
        super().__init__(plan.logical_tokens, plan.dense_tokens, plan.block, dtype, device, kvcache, need_sort=False)
        logical = LogicalAllocator(plan.logical_tokens, plan.block, dtype, device, None, need_sort=False)
        logical.store = store
        self.full_attn_allocator = logical
        self.store = store
        self.req_to_token_pool = req_to_token_pool

    def full_available_size(self):
        free_ids = self.full_attn_allocator.available_size()
        rows_in_use = self.req_to_token_pool.size - self.req_to_token_pool.available_size()
        return min(free_ids, self.store.token_capacity(self.full_attn_allocator.pages_in_use(), rows_in_use))

    def available_size(self):
        return min(self.full_available_size(), self.swa_available_size())

    def store_held_tokens(self) -> int:
        """Free logical ids that `full_available_size` holds back because the store could not hold their blocks."""
        return self.full_attn_allocator.available_size() - self.full_available_size()

    def tca_stats(self) -> dict:
        """The memory split and what is in use now (for /get_server_info), in tokens, pages and bytes."""
        s, plan = self.store, self.store.plan
        dense_used = plan.dense_tokens - self.swa_available_size()
        store_used = plan.heap_pages - 1 - s.free_pages
        logical_used = plan.logical_tokens - self.full_attn_allocator.available_size()
        return {"dense_tokens": plan.dense_tokens, "dense_used_tokens": dense_used,
                "store_pages": plan.heap_pages - 1, "store_used_pages": store_used,
                "store_reserved_pages": s.reserved_pages, "records": s.n_records,
                "logical_tokens": plan.logical_tokens, "logical_used_tokens": logical_used,
                "store_capacity_tokens": self.full_available_size(),
                "dense_bytes": plan.dense_bytes, "store_bytes": plan.heap_bytes,
                "table_bytes": plan.table_bytes + plan.fixed_bytes, "page_bytes": plan.page_bytes,
                "dense_token_bytes": plan.dims.cell, "expected_share": plan.expected_share,
                "used_bytes": dense_used * plan.dims.cell + store_used * plan.page_bytes,
                "used_table_bytes": logical_used // plan.block * plan.table_bytes_per_logical_page}

    def debug_print(self) -> str:
        s = self.store
        return (super().debug_print() + f"#tca-store-free-pages: {s.free_pages}, #tca-records: {s.n_records}, "
                f"#tca-reserved-pages: {s.reserved_pages}, ")
