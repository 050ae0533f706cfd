"""Building TCA's memory side inside SGLang's KV-cache configurator (called from the patches in patches/).

SGLang profiles the free GPU memory and sizes a dense KV pool of `max_total_num_tokens`; with --attention-backend tca
the same byte budget is split by `sizing.plan_memory` into TCA's dense pool, compressed store and tables, and
SGLang builds TCA's pool and allocator instead of its own. One plan per configurator (the target worker's).
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from sglang_tca.algorithm import block_keep_counts
from sglang_tca.config import load_runtime
from sglang_tca.serving.sizing import MemoryPlan, ModelDims, SizingError, block_reserve_pages, plan_memory

logger = logging.getLogger(__name__)

_PLANS: dict[int, MemoryPlan] = {}        # id(KVCacheConfigurator) -> its plan (the configurator has __slots__)


def uses_tca(configurator) -> bool:
    from sglang_tca.plugin import BACKEND_NAME

    return getattr(configurator.server_args, "attention_backend", None) == BACKEND_NAME


def _rank_budgets(configurator):
    from sglang.srt.runtime_context import get_parallel

    rt = load_runtime(configurator.server_args.model_path)
    par = get_parallel()
    return rt, rt.for_rank(par.attn_tp_rank, par.attn_tp_size)


def max_keep_per_head(budgets, policy: str) -> list[list[int]]:
    """The largest keep count each (layer, KV head) can reach: its thresholds at n_eff = b (the metric's maximum);
    none under the "streaming" policy."""
    if policy == "streaming":
        return np.zeros(budgets.thresholds.shape[:2], dtype=np.int64).tolist()
    top = torch.full((*budgets.thresholds.shape[:2], 1), float(budgets.block))
    return block_keep_counts(top, budgets.thresholds.float(), budgets.block)[..., 0].tolist()


def plan_for(configurator, config) -> MemoryPlan:
    """The plan for SGLang's resolved MemoryPoolConfig `config` (its max_total_num_tokens is the dense budget)."""
    if configurator.post_capture_kv_active:
        raise SizingError("TCA does not support post-capture KV sizing (SGLANG_ENABLE_POST_CAPTURE_KV_SIZING)")
    if configurator.is_draft_worker:
        raise SizingError("TCA does not support speculative decoding")
    rt, budgets = _rank_budgets(configurator)
    mc, sa = configurator.model_config, configurator.server_args
    from sglang.srt.runtime_context import get_parallel

    dims = ModelDims(layers=configurator.layer_info.num_effective_layers,
                     kv_heads=mc.get_num_kv_heads(get_parallel().attn_tp_size), head_dim=mc.head_dim,
                     v_head_dim=mc.v_head_dim, dtype_bytes=torch._utils._element_size(configurator.kv_cache_dtype))
    share = 0.0 if rt.policy == "streaming" else float(budgets.rho.mean())
    decode_graph = sa.cuda_graph_config.decode
    graph_bs = 0 if str(decode_graph.backend).lower().endswith("disabled") else int(decode_graph.max_bs or 0)
    plan = plan_memory(
        dims, budget_bytes=int(config.max_total_num_tokens) * dims.cell, block=rt.block, window=rt.window,
        expected_share=share, block_reserve=block_reserve_pages(dims, rt.block, max_keep_per_head(budgets, rt.policy)),
        context_len=mc.context_len, graph_max_bs=graph_bs, chunk_tokens=max(int(sa.chunked_prefill_size or 0), 1),
        max_requests=int(config.max_running_requests), dense_tokens=rt.config.dense_tokens,
        dense_requests=sa.max_running_requests, observe=rt.observe)
    logger.info(plan.summary(int(config.max_total_num_tokens)))
    return plan


def remember_plan(configurator, plan: MemoryPlan) -> None:
    _PLANS[id(configurator)] = plan


def build_pool(configurator):
    from sglang_tca.serving.pool import TCAKVPool

    return TCAKVPool(_PLANS[id(configurator)], dtype=configurator.kv_cache_dtype, device=configurator.device)


MIN_REQUEST_TOKENS = 256  # the shortest longest-request a TCA server starts with (CompressedStore.longest_sequence)


def build_allocator(configurator, pool, req_to_token_pool):
    from sglang_tca.serving.allocator import TCATokenToKVPoolAllocator
    from sglang_tca.serving.store import CompressedStore

    plan = _PLANS.pop(id(configurator))
    set_scheduler_env()                  # this scheduler process serves TCA: SGLang's SWA switches for its frees
    store = CompressedStore(plan, configurator.device, chunk_tokens=int(configurator.server_args.chunked_prefill_size),
                            reduce_max=tp_reduce_max())
    if store.longest_sequence() < MIN_REQUEST_TOKENS:
        raise SizingError(f"the compressed store ({plan.heap_pages} pages) holds no request of {MIN_REQUEST_TOKENS} "
                          f"tokens when its blocks keep their largest counts; raise --mem-fraction-static or "
                          f"--max-total-tokens, or lower --chunked-prefill-size")
    return TCATokenToKVPoolAllocator(plan, pool, store, req_to_token_pool, dtype=configurator.kv_cache_dtype,
                                     device=configurator.device)


def tp_reduce_max():
    """Max over the attention tensor-parallel ranks of a host int array (identity on one rank): every rank then
    keeps the same store pages for a record, so every host decision is the same on all ranks."""
    from sglang.srt.runtime_context import get_parallel

    if get_parallel().attn_tp_size == 1:
        return None
    group = get_parallel().attn_tp_group.cpu_group

    def reduce(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
        return t.numpy()

    return reduce


def hybrid_swa_view(result):
    """build_kv_cache's result with the flags that make SGLang's scheduler account logical ids and the dense pool
    as its hybrid-SWA "full" and "swa" pools (the model runner itself stays non-SWA)."""
    import dataclasses

    from sglang_tca.serving.allocator import TCATokenToKVPoolAllocator

    alloc = result.token_to_kv_pool_allocator
    if not isinstance(alloc, TCATokenToKVPoolAllocator):
        return result
    plan = alloc.store.plan
    return dataclasses.replace(result, is_hybrid_swa=True, sliding_window_size=plan.window + plan.block,
                               full_tokens_per_layer=plan.logical_tokens, swa_tokens_per_layer=plan.dense_tokens)


# SGLang's SWA switches, set for TCA's scheduler processes: dense slots that left a request's window are freed
# (their tokens live on in the compressed store) at every decode step's check (SGLang checks every 128th forward of the
# running batch, which alternating prefill and decode can skip for ever; a request frees at most once per block), and
# after each prefill chunk is cached (SGLang keeps a cached chunk dense until memory runs short). The last window of each
# cached chunk stays dense and evictable: a later request can reuse the prefix up to there. The last window of a
# request's prompt is locked while the request decodes only until its own window has left the prompt (window + block
# tokens decoded); then SGLang's radix cache makes it evictable (RELEASE_LEAF_LOCK_AFTER_WINDOW), so a decoding
# request holds one window, not two, and the prompt's window stays reusable until dense memory runs short.
SCHEDULER_ENV = {"SGLANG_SWA_EVICTION_INTERVAL": "1", "SGLANG_OPT_UNIFIED_CACHE_FREE_OUT_OF_WINDOW_SLOTS": "1",
                 "SGLANG_OPT_SWA_RELEASE_LEAF_LOCK_AFTER_WINDOW": "1"}


def set_scheduler_env(environ=os.environ) -> None:
    """Environment of a scheduler process that serves TCA (SGLang reads these switches when it uses them), set when
    it builds TCA's allocator: a dense server started by launch.py runs with SGLang's own values."""
    for k, v in SCHEDULER_ENV.items():
        environ.setdefault(k, v)
