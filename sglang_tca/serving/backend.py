"""The "tca" attention backend: SGLang's Triton backend with TCA selection and sparse attention.

Per layer and batch, in extend (prefill chunks) and decode alike:
  1. save the batch's K/V into SGLang's pool (unchanged pool, unchanged allocator);
  2. every token that ends a block j >= 1 selects that block from its own query (scoring "block_last") and stores the
     b-bit keep mask at its KV slot (`selection.select_at_slots`): in extend only those tokens' rows (found on the
     host, `selection.block_end_rows`), in decode every row (static shapes, so decode CUDA graphs capture it);
  3. attention: each query sees the sink, the kept tokens of blocks that left its window and its dense window:
     the masks become per-(request, KV head) kept lists (`kernels.kept_lists`), which
     `kernels.sparse_attention.tca_sparse_attention` reads. Batches in which no
     sequence is long enough to have a compressed block run SGLang's dense Triton kernels unchanged (identical
     results by construction: TCA only differs from dense once a block has left the window).
The radix cache is SGLang's own: a request that reuses a cached prefix reads the masks stored at the prefix's slots.
With `--tca-observe N` (question-aware end of prompt) the last N queries of each prompt's final chunk re-choose the
tokens of the compressed blocks, per KV head and with the same number of tokens (`selection.observe_request`):
they attend to that choice, and so does the decode that follows (the kept lists read the request's row of
`obs_bits` for its prompt's blocks). The choice is the request's own, never written to shared slots; the KV of
those N tokens and of the answer is computed with it and cached like any other (as SGLang caches decode-time KV).
With SGLANG_TCA_STATS=FILE (evaluation only: it reads device values on the host) every extend batch appends, per
request, the share of its KV that its last token sees (`_record_kept`).
"""
from __future__ import annotations

import itertools
import json
import logging
import os

import torch
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
from sglang.srt.runtime_context import get_parallel

from sglang_tca.params import TCAParams, dense_start
from sglang_tca.config import STATS_ENV, load_runtime
from sglang_tca.kernels.kept_lists import kept_lists_from_bits
from sglang_tca.kernels.sparse_attention import tca_sparse_attention
from sglang_tca.serving.selection import bits_dtype_check, block_end_rows, observe_request, select_at_slots

logger = logging.getLogger(__name__)


class TCAAttnBackend(TritonAttnBackend):
    def __init__(self, model_runner, *args, **kwargs):
        super().__init__(model_runner, *args, **kwargs)
        rt = load_runtime(model_runner.server_args.model_path)
        tp_rank, tp_size = get_parallel().attn_tp_rank, get_parallel().attn_tp_size
        budgets = rt.for_rank(tp_rank, tp_size)
        if budgets.scoring != "block_last":
            raise ValueError(f"the server implements scoring 'block_last'; the budgets file uses {budgets.scoring!r}")
        self.block, self.window, self.policy = rt.block, rt.window, rt.policy
        bits_dtype_check(self.block)
        dev = model_runner.device
        self.kv_heads = torch.tensor(list(rt.budgets.rank_kv_heads(tp_rank, tp_size)), device=dev)  # global ids
        self.thresholds = budgets.thresholds.to(dev)                                    # [L, Hkv_local, Kn-1]
        n_layers = model_runner.model_config.num_hidden_layers
        if self.thresholds.shape[:2] != (n_layers, self.num_kv_head):
            raise ValueError(f"budgets cover {tuple(self.thresholds.shape[:2])} (layers, KV heads) on this rank; "
                             f"the model has {(n_layers, self.num_kv_head)}")
        n_slots = self.token_to_kv_pool.size + self.token_to_kv_pool.page_size
        self.slot_bits = torch.zeros(n_layers, n_slots, self.num_kv_head, dtype=torch.int64, device=dev)
        self._sparse_from = self.window + 2 * self.block        # shortest sequence with a compressed block
        self._ctx = model_runner.model_config.context_len
        self._decode_kept = torch.empty(0, dtype=torch.int32, device=dev)   # kept-list capacity, bs * ctx * Hkv
        self._arange = torch.arange(self.num_kv_head + 2, dtype=torch.int32, device=dev)
        self._n_layers = n_layers
        self._stats_path = os.environ.get(STATS_ENV) if tp_rank == 0 else None
        self.observe = rt.observe
        self._params = TCAParams(self.block, self.window, budgets.scoring, self.policy, self.observe)
        if self.observe:       # per request row: its prompt's observed masks (layer, row, block, head), block count
            rows = self.req_to_token.shape[0]
            self.obs_bits = torch.zeros(n_layers, rows, self._ctx // self.block + 1, self.num_kv_head,
                                        dtype=torch.int64, device=dev)
            self.obs_nb = torch.zeros(rows, dtype=torch.int32, device=dev)
            logger.info("TCA --tca-observe %d: %.0f MiB for the observed masks of %d request rows (bound it with "
                        "--max-running-requests)", self.observe, self.obs_bits.numel() * 8 / 2**20, rows)

    def init_cuda_graph_state(self, max_bs, max_num_tokens, *args, **kwargs):
        super().init_cuda_graph_state(max_bs, max_num_tokens, *args, **kwargs)
        self._grow_decode_buffers(max_bs)      # before capture: graphs keep these pointers

    def _grow_decode_buffers(self, bs):
        if self._arange.numel() < bs + 1:
            self._arange = torch.arange(bs + 1, dtype=torch.int32, device=self._arange.device)
        need = bs * self._ctx * self.num_kv_head
        if self._decode_kept.numel() < need:
            self._decode_kept = torch.empty(need, dtype=torch.int32, device=self._decode_kept.device)

    # -- per batch ------------------------------------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        self._set_tca_metadata(forward_batch)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        super().init_forward_metadata_out_graph(forward_batch, in_capture=in_capture)
        self._set_tca_metadata(forward_batch)

    def _set_tca_metadata(self, fb):
        mode = fb.forward_mode
        if mode.is_decode_or_idle():
            bs = fb.batch_size
            self._grow_decode_buffers(bs)
            self._req_rows = fb.req_pool_indices
            self._q_start = fb.positions          # a static buffer under CUDA graphs (seq_len - 1 per request)
            self._last = fb.positions
            self._qo_indptr = self._arange[: bs + 1]
            self._kept_pos = self._decode_kept
            self._max_q = 1
            self._max_len = self.req_to_token.shape[1]    # static bound: graphs are replayed for every length
            self._select_rows = None                      # every row
            # decode graphs are captured once for all lengths: always take the sparse path there
            self._sparse = True
        else:
            lens = fb.extend_seq_lens
            self._req_rows = torch.repeat_interleave(fb.req_pool_indices, lens, output_size=fb.extend_num_tokens)
            self._q_start = fb.extend_prefix_lens
            self._last = fb.seq_lens - 1
            self._qo_indptr = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
            self._kept_pos = torch.empty(int(sum(fb.seq_lens_cpu)) * self.num_kv_head, dtype=torch.int32,
                                         device=lens.device)
            self._max_q = max(fb.extend_seq_lens_cpu)
            self._max_len = int(max(fb.seq_lens_cpu))
            self._sparse = self._max_len >= self._sparse_from
            rows = block_end_rows(fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu, self.block)
            self._select_rows = torch.tensor(rows, dtype=torch.int64).pin_memory().to(lens.device, non_blocking=True)
            if self.observe:
                self._set_observe_metadata(fb)

    def _set_observe_metadata(self, fb):
        """Extend: each request of the batch starts its observed state afresh. Requests whose prompt ends in this
        batch (seq_len >= orig_seq_len, the prompt's full length; no host sync) observe their compressed blocks:
        obs_nb = their count (0 for the others, whose decode then reads the slots)."""
        n = fb.seq_lens
        self._final = n >= fb.orig_seq_lens if fb.orig_seq_lens is not None else torch.ones_like(n, dtype=torch.bool)
        nb = dense_start(n, self.block, self.window) // self.block - 1
        self.obs_nb[fb.req_pool_indices] = torch.where(self._final, nb, 0).to(torch.int32)
        ends = itertools.accumulate(fb.extend_seq_lens_cpu)
        self._observe_reqs = [(r, n_r, min(self.observe, ext), end) for r, (n_r, ext, end)
                              in enumerate(zip(fb.seq_lens_cpu.tolist(), fb.extend_seq_lens_cpu, ends))
                              if n_r >= self._sparse_from]

    # -- per layer ------------------------------------------------------------------------------------------------
    def _select(self, q, layer, fb):
        k_buf = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        q = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        pos, slots, req_rows = fb.positions, fb.out_cache_loc, self._req_rows
        if self._select_rows is not None:                   # extend: only the tokens that end a block
            if self._select_rows.numel() == 0:
                return
            q, pos, slots, req_rows = (x.index_select(0, self._select_rows) for x in (q, pos, slots, req_rows))
        select_at_slots(q, pos, slots, req_rows, self.req_to_token, k_buf, self.thresholds[layer.layer_id],
                        self.slot_bits[layer.layer_id], self.block, layer.scaling, self.policy, self.kv_heads,
                        layer.layer_id)

    def _record_kept(self, layer, fb, kept_indptr):
        """Evaluation statistics (SGLANG_TCA_STATS): the share of each request's KV its last token sees (sink + kept +
        dense window) over its length, mean over layers and KV heads; one JSON line per request after the last
        layer. kept_indptr None means the batch ran dense."""
        n = fb.seq_lens.float()
        seen = n[:, None].expand(-1, self.num_kv_head)
        if kept_indptr is not None:
            kept = kept_indptr.diff()[: n.numel() * self.num_kv_head].view(-1, self.num_kv_head).float()
            tail = (n - dense_start(fb.seq_lens, self.block, self.window)).clamp_min(0)
            seen = n.clamp(max=self.block)[:, None] + kept + tail[:, None]
        self._kept_acc = seen.sum(1) + (self._kept_acc if layer.layer_id else 0)
        if layer.layer_id == self._n_layers - 1:
            share = self._kept_acc / (n * self._n_layers * self.num_kv_head)
            with open(self._stats_path, "a") as f:
                for length, s in zip(fb.seq_lens.tolist(), share.tolist()):
                    f.write(json.dumps({"seq_len": length, "kept": round(s, 5), "policy": self.policy}) + "\n")

    def _observe(self, q, o, layer, fb, kept_indptr):
        """Question-aware end of prompt: the last queries of each request whose prompt ends here attend to their
        own choice of compressed tokens (as many per KV head as the prefix-pure lists hold), written to obs_bits."""
        qv, ov = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim), o.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        k_buf, v_buf = self.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        counts = kept_indptr.diff()[: fb.batch_size * self.num_kv_head].view(-1, self.num_kv_head)
        for r, n, n_obs, end in self._observe_reqs:
            row = fb.req_pool_indices[r:r + 1]
            kept = observe_request(qv[end - n_obs:end], k_buf, self.req_to_token, row, n, counts[r], self._params,
                                   layer.scaling, self.obs_bits[layer.layer_id])
            out = tca_sparse_attention(qv[end - n_obs:end], k_buf, v_buf, self.req_to_token, row,
                                       fb.seq_lens[r:r + 1] - n_obs, self._arange[:2] * n_obs,
                                       self._arange[: self.num_kv_head + 1] * kept.shape[1], kept.flatten(),
                                       self.block, self.window, layer.scaling, max_q_len=n_obs)
            ov[end - n_obs:end] = torch.where(self._final[r], out, ov[end - n_obs:end])

    def _sparse_attention(self, q, layer, fb):
        o = torch.empty_like(q)
        k_buf, v_buf = self.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        decode = fb.forward_mode.is_decode_or_idle()
        observed = (self.obs_bits[layer.layer_id], self.obs_nb) if self.observe and decode else None
        kept_indptr = kept_lists_from_bits(self.slot_bits[layer.layer_id], self.req_to_token, fb.req_pool_indices,
                                           self._last, self.block, self.window, self._kept_pos, self._max_len,
                                           observed=observed)
        tca_sparse_attention(q.view(-1, layer.tp_q_head_num, layer.qk_head_dim), k_buf, v_buf, self.req_to_token,
                             fb.req_pool_indices, self._q_start, self._qo_indptr, kept_indptr, self._kept_pos,
                             self.block, self.window, layer.scaling,
                             out=o.view(-1, layer.tp_q_head_num, layer.v_head_dim), max_q_len=self._max_q)
        return o, kept_indptr

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        kept_indptr = None
        if not self._sparse:
            o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
            self._select(q, layer, forward_batch)           # K/V are saved now; blocks completing here still select
        else:
            if save_kv_cache:
                self.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
            self._select(q, layer, forward_batch)
            o, kept_indptr = self._sparse_attention(q, layer, forward_batch)
            if self.observe:
                self._observe(q, o, layer, forward_batch, kept_indptr)
        if self._stats_path:
            self._record_kept(layer, forward_batch, kept_indptr)
        return o

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if save_kv_cache:
            self.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        self._select(q, layer, forward_batch)
        return self._sparse_attention(q, layer, forward_batch)[0]
