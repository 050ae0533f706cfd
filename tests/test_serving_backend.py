"""TCA's serving path inside SGLang's real memory machinery, on CPU: the memory plan, TCA's pool and allocator (built
as the patches build them), SGLang's hybrid-SWA radix cache through TCA's factory, and the attention backend,
driven request by request the way SGLang's scheduler drives them (match, lock, allocate, forward, cache the
unfinished prompt, free out-of-window dense slots, decode, finish, evict, retract). After every forward the
outputs are compared with the reference (sglang_tca.algorithm) on the request's own sequence, the store settles,
and SGLang's conservation invariant (free + evictable + protected + held == total, for logical ids and dense slots)
is checked; at idle, the radix cache's sanity check, which includes the store's own (a record for exactly the
cached logical pages)."""
from __future__ import annotations

import array
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

L, HQ, HKV, D, B, W = 2, 4, 2, 16, 8, 32
VOCAB = 64


def thresholds():
    kn = int(math.log2(B)) + 1
    base = torch.linspace(1.5, 7.0, kn - 1)
    return torch.stack([torch.stack([base * (0.6 + 0.25 * h + 0.3 * l) for h in range(HKV)]) for l in range(L)])


@pytest.fixture(scope="module")
def sglang_ready(tmp_path_factory):
    from sglang_tca import plugin

    plugin.register()
    import sglang.srt.layers.attention.triton_backend as tb

    tb.get_device_core_count = lambda *a: 8          # the Triton backend asks the GPU for its SM count
    return tmp_path_factory.mktemp("tiny")


def make_model(d, keep_all=False):
    from sglang_tca.budgets import Budgets, ModelShape

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HQ * D,
           "intermediate_size": 128, "num_hidden_layers": L, "num_attention_heads": HQ, "num_key_value_heads": HKV,
           "head_dim": D, "vocab_size": 1000, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
           "torch_dtype": "float32", "rope_theta": 10000.0}
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    kn = int(math.log2(B)) + 1
    b = Budgets.uniform(ModelShape.from_hf_config(cfg), [0] * (kn - 1) + [1], block=B, window=W)
    if not keep_all:
        b.thresholds = thresholds()
        b.p = torch.full((L, HKV, kn), 1.0 / kn)
    b.save(d / "tca_budgets.json")
    return d


class Harness:
    """SGLang's memory objects and TCA's backend for a tiny model, plus a scheduler-shaped driver."""

    def __init__(self, model_dir, *, budget_tokens=4096, dense_tokens=None, radix=True, seed=0, observe=0,
                 observe_prefill=None):
        from sglang.srt.layers.radix_attention import RadixAttention
        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
        from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig
        from sglang.srt.runtime_context import get_context, get_parallel
        from sglang.srt.server_args import prepare_server_args

        from sglang_tca.serving import memory
        from sglang_tca.serving.backend import TCAAttnBackend
        from sglang_tca.serving.radix import create_tree_cache

        os.environ.pop("SGLANG_TCA_CONFIG", None)
        if dense_tokens is not None or observe:
            from sglang_tca.config import TCAConfig

            TCAConfig(dense_tokens=dense_tokens, observe=observe or None, observe_prefill=observe_prefill).to_env()
        self.observe, self.observed = observe, {}       # id(req) -> per layer, the reference's observed choice
        self.observe_prefill = observe_prefill or "sparse"
        args = ["--model-path", str(model_dir), "--load-format", "dummy", "--skip-tokenizer-init", "--device", "cpu",
                "--attention-backend", "tca", "--page-size", str(B), "--radix-cache-backend", "tca",
                "--chunked-prefill-size", "64", "--max-running-requests", "4", "--dtype", "float32",
                "--disable-prefill-cuda-graph"]
        if not radix:
            args.append("--disable-radix-cache")
        self.sa = prepare_server_args(args)
        get_context().set_server_args(self.sa)
        self._par = get_parallel().override(attn_tp_size=1, attn_tp_rank=0, tp_size=1, tp_rank=0)
        self._par.__enter__()
        mc = self.sa.get_model_config()
        conf = SimpleNamespace(post_capture_kv_active=False, is_draft_worker=False, server_args=self.sa,
                               model_config=mc, layer_info=SimpleNamespace(num_effective_layers=L),
                               kv_cache_dtype=torch.float32, device="cpu")
        plan = memory.plan_for(conf, MemoryPoolConfig(max_total_num_tokens=budget_tokens, max_running_requests=4))
        memory.remember_plan(conf, plan)
        self.pool = memory.build_pool(conf)
        self.r2t_pool = ReqToTokenPool(size=4, max_context_len=1024, device="cpu", enable_memory_saver=False)
        self.alloc = memory.build_allocator(conf, self.pool, self.r2t_pool)
        self.store, self.plan = self.alloc.store, plan
        self.tree = create_tree_cache(SimpleNamespace(
            params=CacheInitParams(disable=not radix, req_to_token_pool=self.r2t_pool,
                                   token_to_kv_pool_allocator=self.alloc, page_size=B),
            disable_radix_cache=not radix))
        self.tree.full_check_after_s = 0.0                 # every check() here checks in full (the server waits 1 s)
        runner = SimpleNamespace(req_to_token_pool=self.r2t_pool, token_to_kv_pool=self.pool,
                                 token_to_kv_pool_allocator=self.alloc, sliding_window_size=None, page_size=B,
                                 model_config=mc, device="cpu", gpu_id=0, server_args=self.sa,
                                 is_draft_worker=False)
        self.backend = TCAAttnBackend(runner)
        self.layers = [RadixAttention(HQ, D, D ** -0.5, HKV, l) for l in range(L)]
        g = torch.Generator().manual_seed(seed)
        # q/k/v of a token depend on (token id, position) only, so equal prefixes have equal keys (as in a model)
        self.tok = [torch.randn(VOCAB, h, D, generator=g) * s for h, s in ((HQ, 1), (HKV, 2), (HKV, 1))]
        self.posemb = [torch.randn(1024, h, D, generator=g) * 0.5 for h in (HQ, HKV, HKV)]
        self.layer_mix = torch.randn(L, 3, generator=g)

    def close(self):
        self._par.__exit__(None, None, None)

    # -- the "model" ------------------------------------------------------------------------------------------------
    def qkv(self, ids, layer):
        pos = torch.arange(len(ids))
        t = torch.tensor(list(ids))
        return [self.tok[i][t] * (1 + 0.3 * self.layer_mix[layer, i]) + self.posemb[i][pos] for i in range(3)]

    def reference(self, ids, start, layer, req=None):
        """What positions [start, len(ids)) of req's sequence see: the prefix-pure selection, or, in the forward that
        ends an observing prefill and after it, `prompt_mask`'s question-aware choice (observe_prefill "dense":
        every forward of an observing prefill sees its whole prompt)."""
        from sglang_tca.algorithm import masked_attention, prompt_mask, select, visible, with_observed
        from sglang_tca.params import TCAParams

        q, k, v = (x.transpose(0, 1) for x in self.qkv(ids, layer))
        p = TCAParams(B, W)
        keep, _ = select(q, k, self.backend.thresholds[layer], p, layer=layer)
        end = getattr(req, "tca_observe_end", 0)
        if len(ids) == end:
            mask, observed = prompt_mask(q, k, keep, TCAParams(B, W, observe=self.observe,
                                                               observe_prefill=self.observe_prefill),
                                         D ** -0.5, q_start=start)
            self.observed.setdefault(id(req), {})[layer] = observed
        elif len(ids) < end and self.observe_prefill == "dense":
            mask = (torch.arange(len(ids))[None, :] <= torch.arange(start, len(ids))[:, None]).expand(HKV, -1, -1)
        else:
            if id(req) in self.observed:
                keep = with_observed(keep, self.observed[id(req)][layer], B)
            mask = visible(keep, torch.arange(start, len(ids)), len(ids), p)
        return masked_attention(q[:, start:], k, v, mask, D ** -0.5).transpose(0, 1)

    # -- requests -------------------------------------------------------------------------------------------------
    def new_request(self, ids):
        from sglang.srt.managers.schedule_batch import ReqKvInfo
        from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
        from sglang.srt.mem_cache.radix_cache import RadixKey

        row = self.r2t_pool.free_slots.pop(0)
        req = SimpleNamespace(req_pool_idx=row, kv=None, cache_protected_len=0, origin_input_ids=array.array("l", ids),
                              output_ids=array.array("l"), extra_key=None, last_node=None, swa_uuid_for_lock=None,
                              skip_lock_node_ids={}, swa_prefix_lock_released=False, priority=0, session=None,
                              to_finish=None, finished_reason=None, swa_evict_floor=0, kv_committed_len=0,
                              prefix_indices=torch.empty(0, dtype=torch.int64))
        req.get_fill_ids = lambda: (req.origin_input_ids + req.output_ids)[:req.kv_committed_len]
        req.full_untruncated_fill_ids = req.origin_input_ids + req.output_ids
        m = self.tree.match_prefix(MatchPrefixParams(key=RadixKey(array.array("l", ids)), req=req))
        prefix = m.device_indices
        req.last_node = m.last_device_node
        lock = self.tree.inc_lock_ref(req.last_node)
        req.swa_uuid_for_lock = getattr(lock, "swa_uuid_for_lock", None)
        self.r2t_pool.req_to_token[row, :len(prefix)] = prefix.int()
        req.prefix_indices = prefix
        req.cache_protected_len = len(prefix)
        req.kv = ReqKvInfo(kv_allocated_len=len(prefix), swa_evicted_seqlen=0)
        req.kv_committed_len = len(prefix)
        return req

    def tokens(self, req):
        return list(req.origin_input_ids) + list(req.output_ids)

    def _forward(self, fb, reqs, starts, decode):
        be = self.backend
        if decode == "graph":
            if be._graph is None:
                be.init_cuda_graph_state(4, 4)
            be.init_forward_metadata_out_graph(fb)
        else:
            be.init_forward_metadata(fb)
        err = 0.0
        for l in range(L):
            parts = [[x[s:] for x in self.qkv(self.tokens(r)[:r.kv_committed_len], l)] for r, s in zip(reqs, starts)]
            q, k, v = (torch.cat([p[i] for p in parts]) for i in range(3))
            fwd = be.forward_decode if decode else be.forward_extend
            o = fwd(q.reshape(-1, HQ * D), k, v, self.layers[l], fb).view(-1, HQ, D)
            off = 0
            for r, s in zip(reqs, starts):
                want = self.reference(self.tokens(r)[:r.kv_committed_len], s, l, r)
                err = max(err, float((o[off:off + len(want)] - want).abs().max()))
                off += len(want)
        self.pending = be.finish_forward()
        return err

    def settle(self):
        for p in self.pending:
            self.store.settle(p)
        self.pending = []

    def extend(self, reqs, n_new, settle=True):
        """One extend batch: request r gets its next n_new[r] tokens (from origin_input_ids)."""
        import patches.forward_batch_info_init_new as carrier
        from sglang.srt.managers.schedule_batch import ScheduleBatch
        from sglang.srt.mem_cache.common import evict_from_tree_cache
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        prefix = [r.kv_committed_len for r in reqs]
        seq = [p + n for p, n in zip(prefix, n_new)]
        if self.tree.is_chunk_cache():                  # SGLang's alloc_for_extend: the chunk cache's prefill frees
            batch = SimpleNamespace(tree_cache=self.tree, forward_mode=ForwardMode.EXTEND, reqs=reqs, forward_iter=0,
                                    prefix_lens=prefix, enable_overlap=False, req_to_token_pool=self.r2t_pool,
                                    token_to_kv_pool_allocator=self.alloc)
            batch._evict_swa = lambda req, pre_len: ScheduleBatch._evict_swa(batch, req, pre_len)
            ScheduleBatch.maybe_evict_swa(batch)
        evict_from_tree_cache(self.tree, sum(n_new) + len(reqs) * B)
        assert sum(n_new) + len(reqs) * B <= self.alloc.full_available_size(), "the scheduler would not admit this"
        r2t = self.r2t_pool.req_to_token
        last = torch.tensor([int(r2t[r.req_pool_idx, p - 1]) if p else -1 for r, p in zip(reqs, prefix)])
        out = self.alloc.alloc_extend(torch.tensor(prefix), torch.tensor(prefix), torch.tensor(seq),
                                      torch.tensor(seq), last, sum(n_new))
        assert out is not None, "out of memory"
        off = 0
        for r, p, n in zip(reqs, prefix, n_new):
            r2t[r.req_pool_idx, p:p + n] = out[off:off + n].int()
            off += n
            r.kv.kv_allocated_len = r.kv_committed_len = p + n
        fb = SimpleNamespace(forward_mode=ForwardMode.EXTEND, batch_size=len(reqs), spec_info=None,
                             req_pool_indices=torch.tensor([r.req_pool_idx for r in reqs]),
                             seq_lens=torch.tensor(seq), seq_lens_cpu=torch.tensor(seq),
                             extend_prefix_lens=torch.tensor(prefix), extend_prefix_lens_cpu=prefix,
                             extend_seq_lens=torch.tensor(n_new), extend_seq_lens_cpu=list(n_new), out_cache_loc=out,
                             positions=torch.cat([torch.arange(p, s) for p, s in zip(prefix, seq)]),
                             seq_lens_sum=sum(seq), orig_seq_lens=torch.tensor(seq), encoder_lens=None)
        carrier.hook(fb, None, SimpleNamespace(reqs=reqs))    # what ForwardBatch.init_new carries
        err = self._forward(fb, reqs, prefix, decode=False)
        if not settle:
            return err
        self.settle()
        for r in reqs:                                  # SGLang caches the prompt so far after each chunk
            r.extend_range = SimpleNamespace(end=r.kv_committed_len)
            self.tree.cache_unfinished_req(r, chunked=r.kv_committed_len < len(r.origin_input_ids))
        return err

    def decode(self, reqs, token_ids, graph=False, settle=True):
        from sglang.srt.managers.schedule_batch import ScheduleBatch
        from sglang.srt.mem_cache.common import evict_from_tree_cache
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        for r in reqs:                                  # what SGLang's Req says at this point of a decode step
            r.seqlen = r.kv_committed_len + 1            # the token this step writes is already sampled
            r.decode_batch_idx = len(r.output_ids)
        batch = SimpleNamespace(tree_cache=self.tree, forward_mode=ForwardMode.DECODE, reqs=reqs, forward_iter=0,
                                req_to_token_pool=self.r2t_pool, token_to_kv_pool_allocator=self.alloc)
        batch._evict_swa = lambda req, pre_len: ScheduleBatch._evict_swa(batch, req, pre_len)
        ScheduleBatch.maybe_evict_swa(batch)            # SGLang's own: out-of-window slots, the prompt window's lock
        evict_from_tree_cache(self.tree, len(reqs) * B)
        r2t = self.r2t_pool.req_to_token
        seq = [r.kv_committed_len + 1 for r in reqs]
        last = torch.tensor([int(r2t[r.req_pool_idx, r.kv_committed_len - 1]) for r in reqs])
        out = self.alloc.alloc_decode(torch.tensor(seq), torch.tensor(seq), last)
        assert out is not None, "out of memory"
        for r, o, t in zip(reqs, out, token_ids):
            r2t[r.req_pool_idx, r.kv_committed_len] = int(o)
            r.output_ids.append(t)
            r.kv.kv_allocated_len = r.kv_committed_len = r.kv_committed_len + 1
        fb = SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=len(reqs), spec_info=None,
                             req_pool_indices=torch.tensor([r.req_pool_idx for r in reqs]),
                             seq_lens=torch.tensor(seq), seq_lens_cpu=torch.tensor(seq), out_cache_loc=out,
                             positions=torch.tensor(seq) - 1, seq_lens_sum=sum(seq), encoder_lens=None)
        err = self._forward(fb, reqs, [s - 1 for s in seq], decode="graph" if graph else "eager")
        if settle:
            self.settle()
        return err

    def finish(self, req, insert=True):
        self.tree.cache_finished_req(req, is_insert=insert, kv_len_to_handle=req.kv_committed_len)
        self.r2t_pool.free(req)

    # -- invariants -------------------------------------------------------------------------------------------------
    def pool_stats(self):
        from sglang.srt.managers.scheduler_components.pool_stats_observer import SchedulerPoolStatsObserver

        return SchedulerPoolStatsObserver(
            tree_cache=self.tree, token_to_kv_pool_allocator=self.alloc, req_to_token_pool=self.r2t_pool,
            session_controller=None, hisparse_coordinator=None, is_hybrid_swa=True, is_hybrid_ssm=False,
            enable_hisparse=False, full_tokens_per_layer=self.plan.logical_tokens,
            swa_tokens_per_layer=self.plan.dense_tokens, max_total_num_tokens=self.plan.logical_tokens,
            get_last_batch=lambda: None, get_running_batch=lambda: None).get_pool_stats()

    def check(self, running=()):
        """SGLang's conservation invariant (invariant_checker._check_pool_invariant), uncached from the running
        requests, and the store's page conservation."""
        uncached_full = sum(-(-r.kv.kv_allocated_len // B) * B - r.cache_protected_len for r in running)
        uncached_swa = sum(-(-r.kv.kv_allocated_len // B) * B - max(r.cache_protected_len, r.kv.swa_evicted_seqlen)
                           for r in running)
        t = self.tree
        full = self.alloc.full_available_size() + t.full_evictable_size() + t.full_protected_size() + \
            t.session_held_full_tokens() + uncached_full
        swa = self.alloc.swa_available_size() + t.swa_evictable_size() + t.swa_protected_size() + uncached_swa
        assert full == self.plan.logical_tokens, (full, self.plan.logical_tokens)
        assert swa == self.plan.dense_tokens, (swa, self.plan.dense_tokens)
        ps = self.pool_stats()        # what SGLang logs and exports: the logical ids in use, not the ones held back
        in_use = self.plan.logical_tokens - self.alloc.full_attn_allocator.available_size() - t.full_evictable_size()
        assert ps.full_num_used == in_use and ps.full_available_size == self.alloc.full_available_size()
        assert ps.full_token_usage == pytest.approx(in_use / (in_use + ps.full_available_size + t.full_evictable_size()))
        if not running:
            assert ps.full_num_used == 0 and ps.full_token_usage == 0.0
        if not running and not self.tree.is_chunk_cache():
            self.tree.sanity_check()
        else:
            self.store.check()


@pytest.fixture
def harness(sglang_ready, monkeypatch):
    from sglang_tca.serving.memory import SCHEDULER_ENV

    for k, v in SCHEDULER_ENV.items():                 # what TCA's scheduler processes run with
        monkeypatch.setenv(k, v)
    hs = []

    def make(**kw):
        h = Harness(make_model(sglang_ready / ("keep_all" if kw.pop("keep_all", False) else "tca"),
                               keep_all=False), **kw)
        hs.append(h)
        return h

    yield make
    for h in hs:
        h.close()


def ids(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


def test_prefill_chunks_decode_and_finish_on_freed_memory(harness):
    h = harness()
    a, b = h.new_request(ids(1, 150)), h.new_request(ids(2, 70))
    errs = [h.extend([a, b], [20, 30])]                                  # dense batch: SGLang's Triton kernels
    h.check(running=[a, b])
    errs += [h.extend([a, b], [64, 40]), h.extend([a], [66])]            # chunks with compressed blocks
    h.check(running=[a, b])
    for i in range(20):                                                  # decode, eager and graph metadata
        errs.append(h.decode([a, b], [3, 4], graph=i % 2 == 1))
        h.check(running=[a, b])
    assert max(errs) < 1e-4, errs
    assert a.kv.swa_evicted_seqlen > 0 or b.kv.swa_evicted_seqlen > 0 or h.tree.swa_evictable_size() > 0
    assert h.store.n_records == (a.kv_committed_len // B) + (b.kv_committed_len // B)
    h.finish(a)
    h.finish(b)
    h.check()                                                            # idle: the records are the cached pages
    assert h.tree.full_evictable_size() > 0


def cached_request_with_counted_checks(h, monkeypatch) -> list:
    """One finished 200-token request in the tree; returns the list each full store check appends its args to."""
    a = h.new_request(ids(5, 200))
    h.extend([a], [200])
    h.finish(a)
    calls = []
    check = h.store.check
    monkeypatch.setattr(h.store, "check", lambda *args: (calls.append(args), check(*args)))
    return calls


def test_the_idle_check_runs_once_per_state_and_again_after_a_change(harness, monkeypatch):
    """SGLang runs the tree's sanity check on every idle pass of its event loop: an unchanged state is not checked
    again, and a change (here a record freed under the tree, which the check must catch) is."""
    from sglang_tca.serving.radix import cached_logical_pages

    h = harness()
    calls = cached_request_with_counted_checks(h, monkeypatch)
    h.tree.sanity_check()
    h.tree.sanity_check()
    assert len(calls) == 1 and len(calls[0][0]) == 200 // B                # idle: checked against the cached pages
    h.store.release(cached_logical_pages(h.tree)[:1])
    with pytest.raises(AssertionError, match="cached logical pages without a record"):
        h.tree.sanity_check()


def test_the_full_idle_check_waits_until_the_state_has_held(harness, monkeypatch):
    """Back-to-back requests leave the server idle for moments: a new state gets only the O(1) page count (which
    still catches pages that went missing), the full check once the state has held for full_check_after_s."""
    import sglang_tca.serving.radix as radix

    h = harness()
    h.tree.full_check_after_s = 1.0
    clock = [100.0]
    monkeypatch.setattr(radix.time, "monotonic", lambda: clock[0])
    calls = cached_request_with_counted_checks(h, monkeypatch)
    h.tree.sanity_check()
    clock[0] += 0.5
    h.tree.sanity_check()
    assert calls == []                                                 # not yet: the state is 0.5 s old
    clock[0] += 0.6
    h.tree.sanity_check()
    h.tree.sanity_check()
    assert len(calls) == 1                                             # once, after 1.1 s; not again
    h.store._pop(1)                                                    # a page goes missing: a new state ...
    h.store.version += 1
    with pytest.raises(AssertionError, match="free .* != "):           # ... and the count catches it at once
        h.tree.sanity_check()


def test_radix_reuse_of_a_compressed_prefix_equals_a_fresh_computation(harness):
    """A conversation's next turn (the whole previous sequence) and a second question on the same document
    (a shared prefix whose window is still dense) reuse the cache and give what a fresh computation gives."""
    h = harness()
    doc = ids(3, 200)
    a = h.new_request(doc + ids(4, 20))
    for n in (64, 64, 64, 28):
        assert h.extend([a], [n]) < 1e-4
    for t in range(6):
        assert h.decode([a], [t + 5]) < 1e-4
    turn1 = h.tokens(a)
    h.finish(a)
    h.check()
    nxt = h.new_request(turn1 + ids(5, 30))                              # the next turn
    reused = nxt.kv_committed_len
    assert reused == (len(turn1) // B) * B                               # everything up to the last full block
    assert h.extend([nxt], [len(nxt.origin_input_ids) - reused]) < 1e-4
    q2 = h.new_request(doc + ids(6, 25))                                 # another question on the document
    assert q2.kv_committed_len >= (200 // B) * B - B                     # the document's blocks, window dense
    assert h.extend([q2], [len(q2.origin_input_ids) - q2.kv_committed_len]) < 1e-4
    for t in range(10):
        assert h.decode([nxt, q2], [7, 8]) < 1e-4
    h.finish(nxt)
    h.finish(q2)
    h.check()


def test_a_short_request_reusing_a_cached_prefix_reads_it_at_its_dense_slots(harness):
    """A request no longer than window + block runs SGLang's dense kernels; when it reuses a cached prefix, the
    prefix's K/V must be read at the dense slots its logical ids map to (once an earlier long request has used
    logical ids, the two differ: reading at the logical ids gave wrong output here, and on an H200 an illegal
    memory access that stopped the server, 2026-12-02)."""
    h = harness()
    x = h.new_request(ids(39, 200))                                      # moves logical ids away from dense slots
    for n in (64, 64, 72):
        assert h.extend([x], [n]) < 1e-4
    h.finish(x)
    short = h.new_request(ids(39, 200)[:24] + ids(42, 8))                # x's first blocks were compressed:
    assert short.kv_committed_len == 0                                   # a short request does not match them
    assert h.extend([short], [32]) < 1e-4
    h.finish(short, insert=False)
    a = h.new_request(ids(40, 24))
    assert h.extend([a], [24]) < 1e-4
    h.finish(a)
    b = h.new_request(ids(40, 16) + ids(41, 16))
    assert b.kv_committed_len == 16 and 32 <= W + B                      # a cached prefix, a dense batch
    logical = h.r2t_pool.req_to_token[b.req_pool_idx, :16].long()
    assert not torch.equal(h.alloc.full_to_swa_index_mapping[logical], logical)
    assert h.extend([b], [16]) < 1e-4
    for t in range(3):
        assert h.decode([b], [t + 1]) < 1e-4
    h.finish(b)
    h.check()


def random_traffic(h, seed, steps=14, max_running=3):
    """Seeded random traffic the way SGLang's scheduler drives it: short and long prompts, prompts that share a
    prefix of earlier ones (radix hits on dense and on compressed blocks), mixed prefill batches in chunks of several
    sizes, decode (eager and graph metadata), finish with and without caching. A prefill waits while the pools (after
    eviction) cannot take it, as SGLang's admission does; a decode that cannot get memory retracts the newest request.
    Checks every forward against the reference and the pools' invariants after every step; returns (prefix matched,
    prompt length) of every request, and how often the radix cache had to evict for logical ids / store pages and
    for dense slots, and how many requests were retracted."""
    import random

    from sglang.srt.mem_cache.common import evict_from_tree_cache

    rnd = random.Random(seed)
    docs = [ids(100 + i, n) for i, n in enumerate((24, 40, 96, 200))]
    running, errs, hits = [], [], []
    pressure = {"evict_full": 0, "evict_dense": 0, "retracted": 0}
    evict = h.tree.evict

    def counted_evict(params):
        pressure["evict_full"] += params.num_tokens > 0
        pressure["evict_dense"] += params.swa_num_tokens > 0
        return evict(params)

    h.tree.evict = counted_evict

    def fits(tokens):
        evict_from_tree_cache(h.tree, tokens)
        return tokens <= min(h.alloc.full_available_size(), h.alloc.swa_available_size())

    for step in range(steps):
        if len(running) < max_running:
            if step % 2 == 0:                            # short: part of the 24-token document, a short tail
                prompt = docs[0][:rnd.randint(8, 24)] + ids(1000 + step, rnd.choice((4, 12)))
            else:
                base = rnd.choice(docs[1:])
                prompt = base[:rnd.randint(8, len(base))] + ids(1000 + step, rnd.choice((4, 12, 30, 70)))
            r = h.new_request(prompt)
            running.append(r)
            hits.append((r.kv_committed_len, len(r.origin_input_ids)))
        prefill = [r for r in running if r.kv_committed_len < len(r.origin_input_ids)]
        n_new = [min(len(r.origin_input_ids) - r.kv_committed_len, rnd.choice((16, 40, 64))) for r in prefill]
        if prefill and fits(sum(n_new) + len(prefill) * B):
            errs.append(h.extend(prefill, n_new))
        for _ in range(rnd.randint(1, 3)):
            ready = [r for r in running if r.kv_committed_len >= len(r.origin_input_ids)]
            while ready and not fits(len(ready) * B):
                victim = ready.pop()                                     # SGLang retracts to make room
                h.finish(victim, insert=False)
                running.remove(victim)
                pressure["retracted"] += 1
            if ready:
                errs.append(h.decode(ready, [rnd.randrange(VOCAB) for _ in ready], graph=rnd.random() < 0.5))
        h.check(running=running)
        for r in [r for r in running if r.kv_committed_len >= len(r.origin_input_ids)]:
            if rnd.random() < 0.4:
                h.finish(r, insert=rnd.random() < 0.8)
                running.remove(r)
        h.check(running=running)
    for r in running:
        h.finish(r)
    h.check()
    assert max(errs) < 1e-4, errs
    return hits, pressure


@pytest.mark.parametrize("seed", [0, 1])
def test_random_traffic_matches_the_reference(harness, seed):
    hits, _ = random_traffic(harness(), seed)
    assert any(0 < m and n <= W + B for m, n in hits), hits          # a short request reused a cached prefix
    assert any(m > W + B for m, n in hits), hits                     # a long one reused compressed blocks


@pytest.mark.parametrize("memory", [dict(budget_tokens=2000), dict(dense_tokens=512), dict(radix=False)],
                         ids=["store-pressure", "dense-pressure", "radix-off"])
def test_random_traffic_under_memory_pressure_and_without_radix(harness, memory):
    """The same traffic with a small store (cached records evicted), a small dense pool (cached windows
    tombstoned, matches truncated), and with the radix cache off."""
    h = harness(**memory)
    _, pressure = random_traffic(h, 2, steps=20, max_running=4)
    if "budget_tokens" in memory:
        assert pressure["evict_full"] > 0, pressure
    if "dense_tokens" in memory:
        assert pressure["evict_dense"] > 0, pressure


def test_retract_while_the_forward_is_in_flight_leaks_nothing(harness):
    """SGLang may retract (free) a request right after launching its forward, before the result is processed:
    the records of that forward are settled as dead and every page comes back."""
    h = harness()
    a, b = h.new_request(ids(7, 100)), h.new_request(ids(8, 100))
    h.extend([a, b], [64, 64])
    for t in range(B - (a.kv_committed_len % B) - 1):
        h.decode([a, b], [1, 1])
    free0 = h.store.free_pages
    h.decode([a, b], [2, 2], settle=False)                               # both complete a block: reserved
    assert h.store.reserved_pages > 0
    h.finish(b, insert=False)                                            # retract b, forward not settled yet
    h.settle()
    assert not h.store.pending
    h.decode([a], [3])
    h.finish(a)
    h.check()
    assert h.store.free_pages >= free0 - h.plan.max_pages_per_record * 2


def test_store_pressure_evicts_cached_records_and_keeps_the_invariant(harness):
    """A store too small for every cached prefix: admission sees the store's capacity as logical capacity, so
    SGLang's own eviction frees least recently used prefixes (and their records) to make room."""
    h = harness(budget_tokens=2000)
    seen_evict = False
    for i in range(8):
        r = h.new_request(ids(20 + i, 130))
        for n in (64, 66):
            assert h.extend([r], [n]) < 1e-4
        h.finish(r)
        h.check()
        seen_evict |= h.store.n_records < (i + 1) * (130 // B)
    assert seen_evict


def test_radix_off_frees_everything_at_finish(harness):
    h = harness(radix=False)
    a = h.new_request(ids(9, 120))
    h.extend([a], [64])
    h.extend([a], [56])
    for t in range(10):
        assert h.decode([a], [1]) < 1e-4
        h.check(running=[a])
    h.finish(a)
    h.check()
    assert h.store.n_records == 0 and h.store.free_pages == h.plan.heap_pages - 1


def test_cached_chunks_keep_only_their_last_window_dense_and_dense_pressure_truncates_the_match(harness):
    """With TCA's scheduler switches, each cached prefill chunk frees its dense slots out of the window at once (the
    radix cache keeps the chunk's last window dense); when those windows are evicted for dense memory, a later request
    reuses the prefix only as far as the window before the match point is dense, and recomputes the rest exactly."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    h = harness()
    doc = ids(30, 384)
    a = h.new_request(doc)
    for _ in range(3):
        assert h.extend([a], [128]) < 1e-4
        h.check(running=[a])
    dense_used = h.plan.dense_tokens - h.alloc.swa_available_size()
    assert dense_used <= 3 * (W + 2 * B) < len(doc), dense_used               # not the whole prompt
    h.finish(a)
    h.check()
    full = h.new_request(doc + ids(31, 20))                                   # the end window is dense: full reuse
    assert full.kv_committed_len == len(doc)
    h.finish(full, insert=False)
    h.tree.evict(EvictParams(num_tokens=0, swa_num_tokens=h.plan.dense_tokens))   # dense memory runs short
    assert h.plan.dense_tokens - h.alloc.swa_available_size() == 0
    h.check()
    b = h.new_request(doc + ids(31, 20))
    assert b.kv_committed_len < len(doc)                                      # no dense window left to match at
    for n in (128, 128, 128):
        left = len(b.origin_input_ids) - b.kv_committed_len
        if left:
            assert h.extend([b], [min(n, left)]) < 1e-4
            h.check(running=[b])
    for t in range(4):
        assert h.decode([b], [t + 1]) < 1e-4
    h.finish(b)
    h.check()


def test_building_tcas_allocator_sets_sglangs_swa_switches(harness, monkeypatch):
    """The switches are set in the process that builds TCA's allocator (a TCA scheduler), not at registration."""
    from sglang_tca.serving.memory import SCHEDULER_ENV

    for k in SCHEDULER_ENV:
        monkeypatch.delenv(k)
    harness()
    assert {k: os.environ.get(k) for k in SCHEDULER_ENV} == SCHEDULER_ENV


def test_a_long_generation_releases_its_prompts_window_to_the_radix_cache(harness):
    """SCHEDULER_ENV's RELEASE_LEAF_LOCK_AFTER_WINDOW: the prompt's last window is locked only until the request has
    decoded window + block tokens (its own window no longer reaches the prompt); then it is evictable, not held, so a
    decoding request holds one window, not two, while the window stays dense for reuse: a later request on the same
    prompt reuses all of it. When dense memory runs short the released window is reclaimed while the request still
    decodes exactly, and a later request then reuses less of the prompt and recomputes the rest exactly."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    h = harness()
    chunks = (64, 64, 64, 8)
    for k, (answer, pressure) in enumerate(((W // 2, False), (W + B + 8, False), (W + B + 8, True))):
        doc = ids(40 + k, sum(chunks))
        a = h.new_request(doc)
        for n in chunks:
            assert h.extend([a], [n]) < 1e-4
        protected = []
        for t in range(answer):
            assert h.decode([a], [t % VOCAB]) < 1e-4
            h.check(running=[a])
            protected.append(h.tree.swa_protected_size())
        assert protected[0] >= W                                          # the prompt's last window is locked
        long_answer = answer > W + B
        assert a.swa_prefix_lock_released == long_answer
        # released: locked -> evictable (the conservation check after every step: nothing lost)
        assert protected[-1] == (0 if long_answer else protected[0]), protected
        if pressure:
            h.tree.evict(EvictParams(num_tokens=0, swa_num_tokens=h.tree.swa_evictable_size()))
            assert h.tree.swa_evictable_size() == 0
            for t in range(4):
                assert h.decode([a], [t + 1]) < 1e-4
                h.check(running=[a])
        h.finish(a)
        h.check()
        b = h.new_request(doc + ids(50, 20))
        if pressure:
            assert b.kv_committed_len < len(doc), b.kv_committed_len       # no dense window left to match at
        else:
            assert b.kv_committed_len == len(doc), (answer, b.kv_committed_len)
        assert h.extend([b], [len(b.origin_input_ids) - b.kv_committed_len]) < 1e-4
        for t in range(3):
            assert h.decode([b], [t + 1]) < 1e-4
        h.finish(b)
        h.check()


def observe_chunks(h, req, room=64):
    """The chunks SGLang's PrefillAdder gives an observing prefill with `room` tokens each round
    (patches/schedule_policy_add_*: `ObserveRule.chunk_limit`)."""
    from sglang_tca.serving.observe import ObserveRule

    rule, fill, start, out = ObserveRule.of(h.plan), len(req.full_untruncated_fill_ids), req.kv_committed_len, []
    while start < fill:
        limit = rule.chunk_limit(start, fill, room)
        n = fill - start if limit is None else limit
        assert n > 0
        out.append(n)
        start += n
    return out


@pytest.mark.parametrize("observe_prefill", ["sparse", "dense"])
@pytest.mark.parametrize("radix", [True, False], ids=["radix", "chunk_cache"])
def test_an_observing_prompt_stays_dense_and_private_then_decodes_its_choice(harness, radix, observe_prefill):
    """--tca-observe on freed memory inside SGLang's caches: an observing prompt matches nothing (its document is
    cached by an earlier request), frees no dense slot and inserts nothing until its end; in the forward that ends it
    the last N queries re-choose its compressed tokens (outputs = `algorithm.prompt_mask`, a choice other than the
    prefix-pure one), its records are rebuilt exactly, and decode reads them (= the reference with the observed
    choice) while SGLang's decode steps free its out-of-window dense slots. At finish nothing is inserted, and the
    pools' invariants hold throughout. With --tca-observe-prefill dense every chunk of the prompt attends to the whole
    prompt (the reference's causal mask) and the decode reads the same kind of choice."""
    from sglang_tca.algorithm import select
    from sglang_tca.params import TCAParams

    h = harness(observe=8, radix=radix, dense_tokens=1024, observe_prefill=observe_prefill)
    assert h.plan.observe == 8 and h.plan.observe_tokens >= 300
    doc = ids(50, 190)
    plain = h.new_request(doc[:40])                       # too short to observe (no compressed block at its end)
    assert plain.tca_observe_end == 0
    h.extend([plain], [40])
    h.finish(plain)
    cached = h.tree.full_evictable_size()                 # its 40 tokens (none without the radix cache)
    first = h.new_request(doc + ids(51, 10))              # 200 tokens: observes
    assert first.tca_observe_end == 200 and first.kv_committed_len == 0
    chunks = observe_chunks(h, first)
    assert chunks == [64, 64, 64, 8] and sum(chunks) == 200     # the last chunk holds the last N = 8 queries
    r2t, l2d = h.r2t_pool.req_to_token, h.alloc.full_to_swa_index_mapping
    errs = []
    for n in chunks:
        errs.append(h.extend([first], [n]))
        h.check(running=[first])
        held = l2d[r2t[first.req_pool_idx, :first.kv_committed_len].long()]
        assert (held > 0).all() and first.kv.swa_evicted_seqlen == 0      # the whole prompt is still dense
    assert h.tree.full_evictable_size() == cached and h.tree.full_protected_size() == 0    # nothing inserted
    assert max(errs) < 1e-4, errs
    pages = (r2t[first.req_pool_idx, B:200 - W - B:B].long() // B)          # its compressed blocks 1..nc
    q, k, _ = (x.transpose(0, 1) for x in h.qkv(h.tokens(first), 0))
    pure, _ = select(q, k, h.backend.thresholds[0], TCAParams(B, W), layer=0)
    assert not torch.equal(h.observed[id(first)][0], pure[:, B:B + pages.numel() * B])   # a question-aware choice
    second = h.new_request(doc + ids(52, 12))             # the same document: no match either
    assert second.tca_observe_end == 202 and second.kv_committed_len == 0
    for n in observe_chunks(h, second):
        errs.append(h.extend([second], [n]))
    for t in range(W + 2 * B):
        errs.append(h.decode([first, second], [t % VOCAB, (t + 3) % VOCAB], graph=t % 2 == 1))
        h.check(running=[first, second])
    assert max(errs) < 1e-4, errs
    assert first.kv.swa_evicted_seqlen >= 200 - W - B                     # decode freed the prompt's dense slots
    h.finish(first)
    h.finish(second)
    h.check()                                             # idle: records exactly for the cached pages
    left = h.tree.full_evictable_size()                   # plain's prefix, unless store pressure evicted it
    assert left in (0, cached) and h.store.n_records == left // B


def test_a_dense_observing_prefill_batched_with_plain_ones_attends_in_a_group_of_its_own(harness, tmp_path):
    """--tca-observe-prefill dense in mixed extend batches: an observing prompt's chunks (first, middle and last in
    the batch) attend densely in a group of their own while a prompt too long to observe and a short one beside it
    keep TCA's selection; every output and the decode after them equal the reference. The evaluation statistics
    (SGLANG_TCA_STATS) count what the store keeps for it, not the dense prefill's whole prompt."""
    h = harness(observe=8, dense_tokens=700, observe_prefill="dense")
    h.backend._stats_path = str(tmp_path / "stats.jsonl")
    assert 150 <= h.plan.observe_tokens < 250
    long, obs, short = h.new_request(ids(81, 250)), h.new_request(ids(82, 150)), h.new_request(ids(83, 30))
    assert (long.tca_observe_end, obs.tca_observe_end, short.tca_observe_end) == (0, 150, 0)
    assert observe_chunks(h, obs) == [64, 64, 22]
    errs, alone = [], []
    for reqs, n in (([short, obs, long], [30, 64, 64]), ([obs, long], [64, 64]), ([long, obs], [64, 22]),
                    ([long], [58])):
        errs.append(h.extend(reqs, n))
        alone.append([g[-1] is not None for g in h.backend._ext_groups])
        h.check(running=[long, obs, short])
    assert alone == [[False, True, False], [True, False], [False, True], [False]]
    stats = [json.loads(x) for x in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [x["seq_len"] for x in stats] == [30, 64, 64, 128, 128, 192, 150, 250]
    assert stats[0]["kept"] == 1.0 and 0.5 < stats[6]["kept"] < 1.0          # at its end: sink + kept + window
    for t in range(W + B):
        errs.append(h.decode([short, obs, long], [t % VOCAB, (t + 5) % VOCAB, (t + 9) % VOCAB], graph=t % 2 == 0))
    assert max(errs) < 1e-4, errs
    assert obs.kv.swa_evicted_seqlen > 0                               # its prompt's dense slots were freed
    for r in (short, obs, long):
        h.finish(r)
    h.check()


def test_sglangs_prefill_adder_never_ends_an_observing_chunk_inside_its_last_n_tokens(harness):
    """SGLang's own PrefillAdder with TCA's patches: a 196-token observing prompt in 64-token rounds is chunked
    64, 128, 184, 196 (SGLang alone: 64, 128, 192, 196, a last chunk of 4 < N = 8 queries); a short round stops the
    chunk at or before P0 = 184; at P0 the rest waits for a round that holds it whole. A prompt that does not observe
    is chunked as SGLang chunks it."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.managers.schedule_policy import PrefillAdder
    from sglang.srt.sampling.sampling_params import SamplingParams

    h = harness(observe=8, dense_tokens=1024)

    def chunks(n_tokens, rooms):
        req = Req("r", "", array.array("q", ids(60, n_tokens)), SamplingParams(max_new_tokens=16))
        req.init_next_round_input(h.tree)
        ends = []
        for room in rooms:
            adder = PrefillAdder(B, h.tree, h.alloc, None, 0.5, 16384, room)
            if req.prefix_indices.numel() == 0:
                adder.add_one_req(req, False, None)
            else:
                adder.add_chunked_req(req)
            if req not in adder.can_run_list:
                ends.append(None)                                 # waits this round
                continue
            ends.append(req.extend_range.end)
            req.prefix_indices = torch.zeros(req.extend_range.end, dtype=torch.int64)   # as cache_unfinished_req
        return req, ends

    req, ends = chunks(196, [64, 64, 64, 64])
    assert req.tca_observe_end == 196 and ends == [64, 128, 184, 196]
    # a round whose chunk the rule cut (or that waits) is left no chunk budget: SGLang chunks one request at a time
    for room, cut_at in ((64, 184), (10, None)):
        req = Req("c", "", array.array("q", ids(61, 196)), SamplingParams(max_new_tokens=16))
        req.init_next_round_input(h.tree)
        req.prefix_indices = torch.zeros(128 if cut_at else 184, dtype=torch.int64)
        adder = PrefillAdder(B, h.tree, h.alloc, None, 0.5, 16384, room)
        assert adder.add_chunked_req(req) is req and adder.rem_chunk_tokens == 0
        assert (req.extend_range.end == cut_at) if cut_at else req not in adder.can_run_list
        other = Req("o", "", array.array("q", ids(62, 100)), SamplingParams(max_new_tokens=16))
        other.init_next_round_input(h.tree)
        adder.add_one_req(other, True, None)
        assert other not in adder.can_run_list and adder.new_chunked_req is None
    assert chunks(196, [64, 64, 30, 10, 20, 50])[1] == [64, 128, 158, 168, 184, 196]
    assert chunks(196, [64, 64, 56, 10, 11, 12])[1] == [64, 128, 184, None, None, 196]
    req, ends = chunks(40, [64])                                   # no compressed block at its end
    assert req.tca_observe_end == 0 and ends == [40]


@pytest.mark.parametrize("observe_prefill", ["sparse", "dense"])
def test_observing_prompts_in_any_chunking_retracted_mid_prefill_or_in_flight_leak_nothing(harness, observe_prefill):
    """An observing prompt gives the reference's outputs whatever SGLang's rounds hold (chunks of 64 or 24: the
    choice does not depend on the chunking); retracted after some chunks, or right after its observing forward was
    launched (the rebuilt records still in flight), it gives every page back, and re-admitted it matches nothing
    and prefills again."""
    h = harness(observe=8, dense_tokens=1024, observe_prefill=observe_prefill)
    prompt = ids(70, 196)
    for room in (64, 24):
        a = h.new_request(prompt)
        errs = [h.extend([a], [n]) for n in observe_chunks(h, a, room)]
        errs += [h.decode([a], [t]) for t in range(3)]
        assert max(errs) < 1e-4, (room, errs)
        h.finish(a)
        h.check()
    b = h.new_request(prompt)
    for n in observe_chunks(h, b)[:2]:
        h.extend([b], [n])
    h.finish(b, insert=False)                                  # retracted mid-prefill
    h.check()
    c = h.new_request(prompt)
    assert c.kv_committed_len == 0
    *head, last = observe_chunks(h, c)
    for n in head:
        h.extend([c], [n])
    free = h.store.free_pages
    h.extend([c], [last], settle=False)                        # the observing forward, not settled yet
    assert h.store.reserved_pages > 0 and h.store.free_pages < free
    h.finish(c, insert=False)                                  # retracted while it is in flight
    h.settle()
    assert not h.store.pending
    h.check()
    assert h.store.free_pages == h.plan.heap_pages - 1 - h.store.record_pages
