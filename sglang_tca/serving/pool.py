"""TCA's KV pool: SGLang's hybrid-SWA pool interface over one K and one V arena.

SGLang's hybrid sliding-window machinery is used "inverted" (docs/ALGORITHM.md, "Memory"): its "full" pool is the
logical token ids (no bytes: every token of every request and radix node has one), its "swa" pool is the dense pool
(`DensePool`: the sink and window of running requests, prefill chunks in flight, the windows the radix cache keeps),
and the kept rows of compressed blocks live in the compressed store (`sglang_tca.serving.store`). Both the store's
pages and every layer's dense buffer are rows of the same two arena tensors (`MemoryPlan.arena_rows`), so the
attention kernels address every key by one row index.

Writes arrive with logical locations (SGLang's out_cache_loc); they go to the dense slots the logical->dense map
gives (`full_to_swa_index_mapping`, owned by the allocator), or to the already translated location SGLang's Triton
kernels pass as KVWriteLoc.full_loc.
"""
from __future__ import annotations

import logging

import torch
from sglang.srt.mem_cache.base_swa_memory_pool import BaseSWAKVPool
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, unwrap_write_loc

from sglang_tca.serving.sizing import MemoryPlan

logger = logging.getLogger(__name__)


class DensePool(MHATokenToKVPool):
    """SGLang's MHA pool whose per-layer K/V buffers are views into the arenas (after the store's pages)."""

    def __init__(self, plan: MemoryPlan, arena_k: torch.Tensor, arena_v: torch.Tensor, **kwargs):
        self._plan, self._arena_k, self._arena_v = plan, arena_k, arena_v
        super().__init__(plan.dense_tokens, allocation_label="TCA dense", **kwargs)

    def _create_buffers(self):
        p, h = self._plan, self.head_num
        rows = (self.size + self.page_size) * h
        self.k_buffer = [self._arena_k[p.dense_base(l):p.dense_base(l) + rows].view(-1, h, self.head_dim)
                         for l in range(self.layer_num)]
        self.v_buffer = [self._arena_v[p.dense_base(l):p.dense_base(l) + rows].view(-1, h, self.v_head_dim)
                         for l in range(self.layer_num)]


class TCAKVPool(BaseSWAKVPool):
    """The pool SGLang's scheduler and allocator see (`BaseSWAKVPool`): dense buffers plus the store's arena."""

    full_kv_pool = None

    def __init__(self, plan: MemoryPlan, *, dtype: torch.dtype, device: str):
        d = plan.dims
        if d.head_dim != d.v_head_dim:
            raise ValueError("TCA's arena needs head_dim == v_head_dim")
        # no memory saver: the server refuses --enable-memory-saver with TCA (sglang_tca.plugin)
        super().__init__(plan.logical_tokens, plan.block, dtype, d.layers, device, False)
        self.plan = plan
        self.size_swa = plan.dense_tokens
        self.head_num, self.head_dim, self.v_head_dim = d.kv_heads, d.head_dim, d.v_head_dim
        self.arena_k = torch.zeros(plan.arena_rows, d.head_dim, dtype=dtype, device=device)
        self.arena_v = torch.zeros(plan.arena_rows, d.v_head_dim, dtype=dtype, device=device)
        self.swa_kv_pool = DensePool(plan, self.arena_k, self.arena_v, page_size=plan.block, dtype=dtype,
                                     head_num=d.kv_heads, head_dim=d.head_dim, v_head_dim=d.v_head_dim,
                                     layer_num=d.layers, device=device, enable_memory_saver=False,
                                     enable_alt_stream=False)
        self.full_to_swa_index_mapping = None
        k, v = self.get_kv_size_bytes()
        self.mem_usage = (k + v) / 2 ** 30
        logger.info("TCA arena: %d store pages of %d rows and %d dense slots x %d layers, %.2f GiB",
                    plan.heap_pages, plan.page_rows, plan.dense_tokens, d.layers, self.mem_usage)

    # -- the BaseSWAKVPool interface --------------------------------------------------------------------------------
    def register_mapping(self, full_to_swa_index_mapping: torch.Tensor) -> None:
        self.full_to_swa_index_mapping = full_to_swa_index_mapping

    def translate_loc_from_full_to_swa(self, kv_indices: torch.Tensor) -> torch.Tensor:
        return self.full_to_swa_index_mapping[kv_indices]

    def get_state_buf_infos(self):
        raise NotImplementedError("TCA's KV pool does not support PD disaggregation")

    def get_contiguous_buf_infos(self):
        raise NotImplementedError("TCA's KV pool does not support PD disaggregation")

    # -- the KVCache interface --------------------------------------------------------------------------------------
    def get_kv_size_bytes(self):
        return (self.arena_k.numel() * self.arena_k.element_size(),
                self.arena_v.numel() * self.arena_v.element_size())

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.swa_kv_pool.get_key_buffer(layer_id)

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.swa_kv_pool.get_value_buffer(layer_id)

    def get_kv_buffer(self, layer_id: int):
        return self.swa_kv_pool.get_kv_buffer(layer_id)

    def register_layer_transfer_counter(self, layer_transfer_counter):
        self.layer_transfer_counter = layer_transfer_counter
        self.swa_kv_pool.register_layer_transfer_counter(layer_transfer_counter)

    def set_kv_buffer(self, layer, loc_info, cache_k, cache_v, k_scale=None, v_scale=None, **kwargs):
        loc, _, full_loc = unwrap_write_loc(loc_info)
        dense = full_loc if full_loc is not None else self.full_to_swa_index_mapping[loc]
        self.swa_kv_pool.set_kv_buffer(None, dense, cache_k, cache_v, k_scale, v_scale,
                                       layer_id_override=layer.layer_id)

    def move_kv_cache(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor):
        raise NotImplementedError("TCA's KV pool does not move KV between slots (speculative decoding is refused)")
