"""The "tca" attention backend: SGLang's Triton backend with TCA selection, compaction and sparse attention over the
compressed store (sglang_tca.serving.store) and the dense pool (sglang_tca.serving.pool).

Per batch (`init_forward_metadata*`, on the host, no device synchronisation): the tokens that end a block are found
from host lengths (extend: `selection.block_end_rows`; decode: `selection.decode_block_ends`)
and each such block gets its worst case of store pages (`CompressedStore.begin_forward`).

Per layer, in extend (prefill chunks) and decode alike:
  1. save the batch's K/V into the dense pool (logical ids -> dense slots through SGLang's map);
  2. every token that ends a block selects it from its own query (`kernels.selection`, scoring "block_last"; in
     decode every row runs and the rows that end no block return at once): one keep mask per KV head in the block's
     record (the sink keeps everything);
  3. the block's kept rows are copied into the record's store pages (`kernels.compaction`);
  4. attention: each query sees the sink and the kept tokens of blocks that left its window, read from the store
     (`kernels.kept_lists` -> `kernels.sparse_attention`), and its dense window, read from the dense pool.
     Extend batches whose sequences all fit in SGLang's SWA window (window + block: nothing was freed, nothing is
     compressed) run SGLang's dense Triton kernels, with a cached prefix's logical ids translated to dense slots.
With --tca-observe N, an extend that ends an observing prefill (`serving.observe`: the batch carries which, through
patches/forward_batch_info_init_new.py) re-chooses that prompt's compressed tokens after each layer's pass
(`observe.observe_layer`: its last N queries choose and attend again) and rebuilds its records after the last layer
(`observe.rebuild`); with --tca-observe-prefill dense every extend of an observing prefill attends to the whole
prompt (`observe.DensePrefillLists`, in a group of its own) and the last N queries only choose.
After the forward (`finish_forward`, from the TP worker patch) the rows each new record used are copied to the host;
SGLang's result processing then settles the reservations (`patches/scheduler_process_batch_result.py`).
Decode shapes are static, so decode CUDA graphs capture all of it.
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

from sglang_tca.config import STATS_ENV, load_runtime
from sglang_tca.kernels.compaction import compact_blocks
from sglang_tca.kernels.kept_lists import kept_lists
from sglang_tca.kernels.selection import select_blocks
from sglang_tca.kernels.sparse_attention import tca_sparse_attention
from sglang_tca.params import TCAParams, dense_start
from sglang_tca.serving.observe import DensePrefillLists, ObservingPrompt, observe_layer, rebuild
from sglang_tca.serving.pool import TCAKVPool
from sglang_tca.serving.selection import block_end_rows, decode_block_ends

logger = logging.getLogger(__name__)


class TCAAttnBackend(TritonAttnBackend):
    def __init__(self, model_runner, *args, **kwargs):
        super().__init__(model_runner, *args, **kwargs)
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, TCAKVPool):
            raise RuntimeError("the tca attention backend needs TCA's KV pool; the sglang-tca patches were not "
                               "applied in this process (start the server with launch.py or sglang_tca.engine)")
        rt = load_runtime(model_runner.server_args.model_path)
        tp_rank, tp_size = get_parallel().attn_tp_rank, get_parallel().attn_tp_size
        budgets = rt.for_rank(tp_rank, tp_size)
        self.block, self.window, self.policy = rt.block, rt.window, rt.policy   # block <= 64: budgets.server_limits
        self.params = TCAParams(rt.block, rt.window, policy=rt.policy, observe=rt.observe,
                                observe_prefill=rt.observe_prefill)
        dev = model_runner.device
        self.kv_heads = torch.tensor(list(rt.budgets.rank_kv_heads(tp_rank, tp_size)), device=dev)  # global ids
        self.thresholds = budgets.thresholds.to(dev)                                    # [L, Hkv_local, Kn-1]
        n_layers = model_runner.model_config.num_hidden_layers
        if self.thresholds.shape[:2] != (n_layers, self.num_kv_head):
            raise ValueError(f"budgets cover {tuple(self.thresholds.shape[:2])} (layers, KV heads) on this rank; "
                             f"the model has {(n_layers, self.num_kv_head)}")
        self.pool = pool
        self.plan = pool.plan
        self.store = model_runner.token_to_kv_pool_allocator.store
        self.l2d = model_runner.token_to_kv_pool_allocator.full_to_swa_index_mapping
        self.dense_window = self.window + self.block   # SGLang keeps this many trailing tokens of a request dense
        self._n_layers = n_layers
        self._arange = torch.arange(max(self.plan.reservation_rows, self.num_kv_head) + 2, dtype=torch.int32,
                                    device=dev)
        # the kept-token lists of one attention call (static: never grown while serving; sglang_tca.serving.sizing)
        self._kept_row = torch.empty(self.plan.decode_kept_rows, dtype=torch.int32, device=dev)
        self._kept_pos = torch.empty(self.plan.extend_kept_rows, dtype=torch.int32, device=dev)
        ctx = self.req_to_token.shape[1]
        self._win_offsets = torch.arange(self.dense_window, device=dev)          # a decode query's dense window
        self._block_cols = torch.arange(0, ctx, self.block, device=dev)          # the first position of each block
        self._graph = None                       # static decode buffers of CUDA graphs (init_cuda_graph_state)
        self._pending = []                               # this forward's reservations (CompressedStore.Pending)
        self._observing: list[ObservingPrompt] = []      # this extend's prefills that observe at its end
        self._stats_path = os.environ.get(STATS_ENV) if tp_rank == 0 else None
        if rt.observe:
            logger.info(f"TCA --tca-observe {rt.observe}: observing prompts attend {rt.observe_prefill}ly in prefill "
                        f"(--tca-observe-prefill {rt.observe_prefill})")

    # -- per batch ------------------------------------------------------------------------------------------------
    def init_cuda_graph_state(self, max_bs, max_num_tokens, *args, **kwargs):
        """Static buffers the captured decode graphs read (SGLang's Triton decode buffers are not needed)."""
        dev = self.req_to_token.device
        self._graph = dict(
            dense_loc=torch.zeros(max_bs, dtype=torch.int64, device=dev),
            dense_slots=torch.zeros(max_bs, self.dense_window, dtype=torch.int64, device=dev),
            dense_first=torch.zeros(max_bs, dtype=torch.int32, device=dev),
            block_pages=torch.zeros(max_bs, self._block_cols.numel(), dtype=torch.int32, device=dev))

    def init_forward_metadata(self, forward_batch):
        if forward_batch.forward_mode.is_decode_or_idle():
            self._set_decode_metadata(forward_batch, graph=False)
        else:
            self._set_extend_metadata(forward_batch)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        if not forward_batch.forward_mode.is_decode_or_idle():
            raise RuntimeError("TCA runs prefill without CUDA graphs (launch.py disables the prefill CUDA graph)")
        self._set_decode_metadata(forward_batch, graph=True)

    def _reserve(self, positions: list[int], slots: list[int]) -> None:
        """Reserve store pages for the blocks ending at these positions (position b - 1 ends the sink)."""
        pending = self.store.begin_forward([p == self.block - 1 for p in positions], slots)
        if pending is not None:
            self._pending.append(pending)

    def _set_decode_metadata(self, fb, graph: bool):
        """Decode: reserve pages for the rows whose token ends a block, and translate what the kernels read
        through SGLang's shared tables (req_to_token, the logical->dense map) into per-batch tables: SGLang's
        scheduler may rewrite the shared ones while a decode CUDA graph replays."""
        bs = fb.batch_size
        seq = (fb.seq_lens_cpu if fb.seq_lens_cpu is not None else fb.seq_lens.cpu())[:bs].tolist()
        ends = decode_block_ends(seq, self.block)
        if ends:
            self.store.res_pages[:bs].zero_()          # rows that end no block point at the trash page
            self._reserve([seq[i] - 1 for i in ends], ends)
        rows, n = fb.req_pool_indices[:bs].long(), fb.seq_lens[:bs]
        first = torch.where(n >= self.block, dense_start(n, self.block, self.window), 0)
        pos = (first[:, None] + self._win_offsets).clamp(max=self.req_to_token.shape[1] - 1)
        dense_slots = self.l2d[self.req_to_token[rows[:, None], pos].long()]
        block_pages = (self.req_to_token[rows[:, None], self._block_cols] // self.block).int()
        loc = self.l2d[fb.out_cache_loc]
        if graph:                                       # replayed for every length: static buffers and bounds
            g = self._graph
            g["dense_slots"][:bs].copy_(dense_slots)
            g["dense_first"][:bs].copy_(first)
            g["block_pages"][:bs].copy_(block_pages)
            g["dense_loc"][loc.numel():bs].zero_()      # padded rows write to the padding slot
            g["dense_loc"][:loc.numel()].copy_(loc)
            self._decode = dict(groups=[(0, bs)], max_len=self.req_to_token.shape[1],
                                dense_slots=g["dense_slots"][:bs], dense_first=g["dense_first"][:bs],
                                block_pages=g["block_pages"][:bs], dense_loc=g["dense_loc"][:bs])
        else:
            self._decode = dict(groups=self._groups(seq, self._kept_row.numel()), max_len=max(seq + [1]),
                                dense_slots=dense_slots, dense_first=first.int(), block_pages=block_pages,
                                dense_loc=loc)

    def _groups(self, seq_lens: list[int], capacity: int, alone=()) -> list[tuple[int, int]]:
        """Consecutive requests [a, b) whose kept lists (at most length x KV heads entries each) fit `capacity`
        together; one request always fits (the buffers hold a full context). The requests in `alone` get a group
        of their own."""
        groups, start, used = [], 0, 0
        for i, n in enumerate(seq_lens):
            need = n * self.num_kv_head
            if i > start and (used + need > capacity or i in alone or i - 1 in alone):
                groups.append((start, i))
                start, used = i, 0
            used += need
        groups.append((start, len(seq_lens)))
        return groups

    def _set_extend_metadata(self, fb):
        rows, positions = block_end_rows(fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu, self.block)
        self._reserve(positions, list(range(len(rows))))
        self._n_selected = len(rows)
        self._observing = self._observing_prompts(fb)
        dev = fb.seq_lens.device
        sel = torch.tensor(rows, dtype=torch.int64)
        self._sel = sel.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else sel
        self._sel_page = fb.out_cache_loc.index_select(0, self._sel) // self.block
        self._sel_pos = fb.positions.index_select(0, self._sel)
        self._max_len = int(max(fb.seq_lens_cpu))
        self._dense = self._max_len <= self.dense_window
        self._dense_loc = self.l2d[fb.out_cache_loc]      # once per batch, not in every layer's set_kv_buffer
        if self._dense:
            super().init_forward_metadata(fb)
            # SGLang's kernels read a cached prefix at its logical ids; its K/V is at the dense slots they map to
            # (every token of a sequence this short is dense: radix matches need the window before them dense)
            self.forward_metadata.kv_indices = self.l2d[self.forward_metadata.kv_indices]
            return
        ext, seq = list(fb.extend_seq_lens_cpu), fb.seq_lens_cpu.tolist()
        qo = [0, *itertools.accumulate(ext)]
        dense = self._dense_prefills(fb, seq)
        self._ext_groups = []          # (requests a..b, their tokens t0..t1, qo_indptr, bounds, DensePrefillLists)
        for a, b in self._groups(seq, self._kept_pos.numel(), alone=dense):
            indptr = torch.tensor([x - qo[a] for x in qo[a:b + 1]], dtype=torch.int32)
            indptr = indptr.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else indptr
            self._ext_groups.append((a, b, qo[a], qo[b], indptr, max(ext[a:b]), max(seq[a:b]), dense.get(a)))

    def _dense_prefills(self, fb, seq: list[int]) -> dict[int, DensePrefillLists]:
        """--tca-observe-prefill dense: the batch's observing prefills (any chunk up to their end, where every token
        is still dense), by batch index, with the kept lists that attend them densely."""
        if self.params.observe_prefill != "dense":
            return {}
        return {i: DensePrefillLists(self.l2d, self.req_to_token, row, seq[i], self.num_kv_head, self.params)
                for i, row, end in getattr(fb, "tca_observe", ()) if seq[i] <= end}

    def _observing_prompts(self, fb) -> list[ObservingPrompt]:
        """The batch's prefills whose extend ends where they observe (`req.tca_observe_end`, carried by the batch)."""
        out, q_end = [], 0
        observe = {i: (row, end) for i, row, end in getattr(fb, "tca_observe", ())}
        for i, (prefix, ext) in enumerate(zip(fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu)):
            q_end += ext
            row, end = observe.get(i, (None, 0))
            if end and prefix + ext == end:
                if ext < self.params.observe:
                    raise RuntimeError(f"TCA --tca-observe {self.params.observe}: the prefill of {end} tokens ends "
                                       f"with a chunk of {ext} (a bug; please report)")
                out.append(ObservingPrompt(row, end, q_end))
        return out

    def finish_forward(self) -> list:
        """After the forward's last kernel was enqueued: start copying the new records' row counts to the host.
        Returns the reservations for `CompressedStore.settle` (in SGLang's result processing)."""
        pending, self._pending = self._pending, []
        for p in pending:
            self.store.end_forward(p)
        return pending

    # -- per layer ------------------------------------------------------------------------------------------------
    def _select_and_compact(self, q, layer, fb, decode: bool):
        l = layer.layer_id
        q = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        k_dense = self.pool.get_key_buffer(l)
        if decode:
            if l == 0:
                self._decode_page = fb.out_cache_loc // self.block
            pos, page = fb.positions, self._decode_page
            select_blocks(q, pos, page, self.l2d, k_dense, self.thresholds[l], self.store.mask, self.block, l,
                          layer.scaling, self.policy, self.kv_heads, check_pos=True)
            compact_blocks(self.pool.arena_k, self.pool.arena_v, self.l2d, page, self._arange[:page.numel()],
                           self.store, l, self.plan.dense_base(l), self.block, positions=pos)
            return
        if self._sel.numel() == 0:
            return
        select_blocks(q.index_select(0, self._sel), self._sel_pos, self._sel_page,
                      self.l2d, k_dense, self.thresholds[l], self.store.mask, self.block, l, layer.scaling,
                      self.policy, self.kv_heads)
        compact_blocks(self.pool.arena_k, self.pool.arena_v, self.l2d, self._sel_page,
                       self._arange[:self._sel_page.numel()], self.store, l, self.plan.dense_base(l), self.block)

    def _record_kept(self, layer, fb, kept_indptr):
        """Evaluation statistics (SGLANG_TCA_STATS): the share of each request's KV its last token sees (sink + kept +
        dense window) over its length, mean over layers and KV heads; one JSON line per request after the last
        layer. kept_indptr None means the batch ran dense. A prompt attended densely under --tca-observe-prefill dense
        counts what the store keeps for it (what its decode will see), not the whole prompt its last token saw."""
        n = fb.seq_lens.float()
        seen = n[:, None].expand(-1, self.num_kv_head)
        if kept_indptr is not None:
            kept = kept_indptr.diff()[: n.numel() * self.num_kv_head].view(-1, self.num_kv_head).float()
            tail = n - torch.where(fb.seq_lens >= self.block, dense_start(fb.seq_lens, self.block, self.window), 0)
            seen = kept + tail[:, None]
        self._kept_acc = seen.sum(1) + (self._kept_acc if layer.layer_id else 0)
        if layer.layer_id == self._n_layers - 1:
            share = self._kept_acc / (n * self._n_layers * self.num_kv_head)
            with open(self._stats_path, "a") as f:
                for length, s in zip(fb.seq_lens.tolist(), share.tolist()):
                    f.write(json.dumps({"seq_len": length, "kept": round(s, 5), "policy": self.policy}) + "\n")

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        kept_indptr = None
        if save_kv_cache:
            self.pool.swa_kv_pool.set_kv_buffer(None, self._dense_loc, k, v, layer_id_override=layer.layer_id)
        if self._dense:
            o = super().forward_extend(q, k, v, layer, forward_batch, False, **kwargs)
            self._select_and_compact(q, layer, forward_batch, decode=False)
        else:
            l = layer.layer_id
            self._select_and_compact(q, layer, forward_batch, decode=False)
            fb = forward_batch
            qv = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
            o = torch.empty_like(q)
            ov = o.view(-1, layer.tp_q_head_num, layer.v_head_dim)
            counts = []
            for a, b, t0, t1, indptr, max_q, max_len, dense in self._ext_groups:
                rows = fb.req_pool_indices[a:b]
                if dense is None or self._stats_path:     # (the statistics count the store's rows, not the dense)
                    kept_indptr = kept_lists(self.store, l, self.req_to_token, rows, fb.seq_lens[a:b] - 1,
                                             self.window, self._kept_row, max_len, self._kept_pos)
                    if self._stats_path:
                        counts.append(kept_indptr.diff())
                lists = (kept_indptr, self._kept_row, self._kept_pos) if dense is None else \
                    dense.lists(self.plan.dense_base(l))
                tca_sparse_attention(qv[t0:t1], self.pool.arena_k, self.pool.arena_v, self.plan.dense_base(l),
                                     self.num_kv_head, self.l2d, self.req_to_token, rows, fb.extend_prefix_lens[a:b],
                                     indptr, *lists, self.block, self.window, layer.scaling, out=ov[t0:t1],
                                     max_q_len=max_q)
            if self._stats_path:
                kept_indptr = torch.nn.functional.pad(torch.cat(counts).cumsum(0), (1, 0))
            if self._observing:
                self._observe(qv, ov, layer)
        if self._stats_path:
            self._record_kept(layer, forward_batch, kept_indptr)
        return o

    def _observe(self, qv, ov, layer):
        """The observing prefills of this extend re-choose and attend again; after the last layer, their records are
        rebuilt (the reservation rows after this forward's own selections; settled after them)."""
        mem = dict(store=self.store, arena_k=self.pool.arena_k, arena_v=self.pool.arena_v, l2d=self.l2d,
                   req_to_token=self.req_to_token, p=self.params)
        for prompt in self._observing:
            observe_layer(qv, ov, layer.layer_id, prompt, dense_base=self.plan.dense_base(layer.layer_id),
                          scale=layer.scaling, **mem)
        if layer.layer_id == self._n_layers - 1:
            pending = rebuild(self._observing, dense_bases=[self.plan.dense_base(l) for l in range(self._n_layers)],
                              first_slot=self._n_selected, **mem)
            if pending is not None:
                self._pending.append(pending)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        fb, d, l = forward_batch, self._decode, layer.layer_id
        if save_kv_cache:
            self.pool.swa_kv_pool.set_kv_buffer(None, d["dense_loc"], k, v, layer_id_override=l)
        self._select_and_compact(q, layer, fb, decode=True)
        qv = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o = torch.empty_like(q)
        ov = o.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        for a, b in d["groups"]:
            rows, pos = fb.req_pool_indices[a:b], fb.positions[a:b]
            kept_indptr = kept_lists(self.store, l, self.req_to_token, rows, pos, self.window, self._kept_row,
                                     d["max_len"], block_pages=d["block_pages"][a:b])
            tca_sparse_attention(qv[a:b], self.pool.arena_k, self.pool.arena_v, self.plan.dense_base(l),
                                 self.num_kv_head, self.l2d, self.req_to_token, rows, pos, self._arange[:b - a + 1],
                                 kept_indptr, self._kept_row, None, self.block, self.window, layer.scaling,
                                 out=ov[a:b], dense_slots=d["dense_slots"][a:b], dense_first=d["dense_first"][a:b],
                                 max_q_len=1)
        return o
