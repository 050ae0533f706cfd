"""The reference TCA: keep-all equals dense, prefix purity, sparse prefill == pruned decode, budget semantics."""
import math

import pytest
import torch

from sglang_tca.algorithm import (PrunedKVCache, block_keep_counts, block_scores, kept_fraction, masked_attention,
                                  neff, num_selectable_blocks, select, tca_attention, thresholds_for_shares,
                                  visible)
from sglang_tca.params import TCAParams, dense_start

HQ, HKV, D = 6, 2, 16


def rand_qkv(L, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(h, L, D, generator=g, dtype=dtype) for h in (HQ, HKV, HKV))
    return q, k * 2.0, v   # sharper scores so blocks differ in redundancy


def thresholds_for(p: TCAParams, mode: str, seed=0):
    kn = int(math.log2(p.block)) + 1
    if mode == "keep_all":
        return torch.full((HKV, kn - 1), -math.inf)
    # heterogeneous, as calibration sets them: head 0 prunes hard, head 1 keeps more
    q, k, _ = rand_qkv(400, seed=seed + 100)
    nb = num_selectable_blocks(400, p)
    shares = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.0, 0.2, 0.3, 0.5]], dtype=torch.float64)
    return thresholds_for_shares(neff(block_scores(q, k, p, nb))[:, 1:], shares)


def dense_causal(q, k, v):
    L = k.shape[1]
    mask = torch.ones(HKV, L, L, dtype=torch.bool).tril()
    return masked_attention(q, k, v, mask, D ** -0.5)


@pytest.mark.parametrize("scoring", ["block_last", "window"])
def test_keep_all_equals_dense(scoring):
    p = TCAParams(block=8, window=32, scoring=scoring)
    q, k, v = rand_qkv(203)
    out = tca_attention(q, k, v, thresholds_for(p, "keep_all"), p)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(HQ // HKV, 0), v.repeat_interleave(HQ // HKV, 0), is_causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scoring", ["block_last", "window"])
def test_pruning_changes_output_and_keeps_less(scoring):
    p = TCAParams(block=8, window=32, scoring=scoring)
    q, k, v = rand_qkv(300, seed=1)
    t = thresholds_for(p, "hetero")
    keep, counts = select(q, k, t, p)
    out = tca_attention(q, k, v, t, p)
    assert (out - dense_causal(q, k, v)).abs().max() > 1e-3          # sparse is not dense
    torch.testing.assert_close(out[:, :p.window + 2 * p.block - 1], dense_causal(q, k, v)[:, :p.window + 2 * p.block - 1])
    frac = kept_fraction(counts, 300, p)
    assert 0.2 < frac < 1.0
    # heterogeneous budgets: head 1 (lower thresholds -> larger k) keeps more than head 0
    assert counts[1, 1:].sum() > counts[0, 1:].sum()
    # every compressed block keeps exactly its count, and counts are powers of two in [1, b]
    nb = counts.shape[1]
    per_block = keep[:, : nb * p.block].view(HKV, nb, p.block).sum(-1)
    assert torch.equal(per_block, counts)
    assert set(counts.unique().tolist()) <= {1, 2, 4, 8}


def test_visible_structure():
    """Brute force: query i sees the sink, the kept tokens of blocks that left the window, and a dense window of
    between w and w + b - 1 tokens (all tokens while i is small)."""
    p = TCAParams(block=8, window=32)
    L = 150
    keep = torch.rand(HKV, L, generator=torch.Generator().manual_seed(0)) < 0.3
    vis = visible(keep, torch.arange(L), L, p)
    for i in range(L):
        n = i + 1
        n_comp_blocks = max(0, (n - 32) // 8 - 1)         # blocks 1..n_comp_blocks have left the window
        window = n - 8 * (1 + n_comp_blocks)
        assert n_comp_blocks == 0 or 32 <= window < 40
        for h in range(HKV):
            want = [t for t in range(n) if t < 8 or t >= 8 * (1 + n_comp_blocks) or keep[h, t]]
            assert vis[h, i].nonzero().flatten().tolist() == want


@pytest.mark.parametrize("scoring", ["block_last", "window"])
def test_prefix_purity(scoring):
    """What a block keeps depends only on the prefix up to its compression: changing or extending the text after
    that point never changes it, and outputs on the shared prefix are identical."""
    p = TCAParams(block=8, window=32, scoring=scoring)
    t = thresholds_for(p, "hetero")
    q, k, v = rand_qkv(260, seed=2)
    L1 = 181
    keep1, c1 = select(q[:, :L1], k[:, :L1], t, p)
    q2, k2, v2 = rand_qkv(260, seed=3)                               # a different continuation after L1
    qx, kx, vx = (torch.cat([a[:, :L1], b[:, L1:]], 1) for a, b in ((q, q2), (k, k2), (v, v2)))
    keep2, c2 = select(qx, kx, t, p)
    n_comp = dense_start(L1, 8, 32)
    assert torch.equal(keep1[:, :n_comp], keep2[:, :n_comp])
    assert torch.equal(c1, c2[:, : c1.shape[1]])
    torch.testing.assert_close(tca_attention(qx, kx, vx, t, p)[:, :L1], tca_attention(q[:, :L1], k[:, :L1], v[:, :L1], t, p),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scoring", ["block_last", "window"])
def test_pruned_decode_equals_sparse_prefill(scoring):
    """The physical pruned cache (drops tokens for good) gives the same outputs as masked sparse prefill, and what
    it stores stays bounded by sink + kept + a tail of < w + b."""
    p = TCAParams(block=8, window=32, scoring=scoring)
    t = thresholds_for(p, "hetero")
    q, k, v = rand_qkv(230, seed=4)
    ref = tca_attention(q, k, v, t, p)
    cache = PrunedKVCache(t, p, D ** -0.5)
    outs = torch.stack([cache.step(q[:, i], k[:, i], v[:, i]) for i in range(230)], 1)
    torch.testing.assert_close(outs, ref, rtol=1e-9, atol=1e-9)
    _, counts = select(q, k, t, p)
    n_comp = dense_start(230, 8, 32) // 8 - 1
    want = [8 + int(counts[h, 1:1 + n_comp].sum()) + (230 - dense_start(230, 8, 32)) for h in range(HKV)]
    assert cache.stored_tokens() == want
    assert cache.k.shape[1] < p.window + p.block                       # the dense tail stays bounded
    assert max(want) < 230 and min(want) < 230 * 0.6


def test_keep_counts_from_thresholds():
    t = torch.tensor([[1.5, 3.0, 3.0, 10.0]])                          # b = 16 -> k in 1,2,4,8,16
    m = torch.tensor([[1.0, 1.5, 2.9, 3.0, 9.99, 10.0, 16.0]])
    assert block_keep_counts(m, t, 16).tolist() == [[1, 2, 2, 8, 8, 16, 16]]


def test_thresholds_reproduce_shares():
    g = torch.Generator().manual_seed(5)
    metric = torch.rand(3, 103, generator=g) * 63 + 1
    shares = torch.tensor([[0.5, 0.5, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1.0], [0.1, 0.1, 0.2, 0.2, 0.2, 0.1, 0.1]])
    t = thresholds_for_shares(metric, shares)
    counts = block_keep_counts(metric, t, 64)
    for h in range(3):
        got = torch.stack([(counts[h] == 2 ** m).sum() for m in range(7)]).float() / 103
        assert (got - shares[h]).abs().max() <= 1 / 103 + 1e-6
    # the most redundant blocks (smallest metric) get the smallest k
    order = metric[2].argsort()
    assert torch.all(counts[2, order].diff() >= 0)


def test_policies_random_and_streaming():
    """random keeps TCA's per-block counts (same KV budget) with other tokens; streaming keeps only sink + window;
    both are prefix-pure like TCA."""
    from sglang_tca.algorithm import hash_scores

    g = torch.Generator().manual_seed(7)
    L, hq, hkv, d = 400, 4, 2, 16
    q, k = torch.randn(hq, L, d, generator=g), torch.randn(hkv, L, d, generator=g) * 2
    t = torch.stack([torch.linspace(1.2, 6.0, 3), torch.linspace(1.05, 2.5, 3)])
    keep, counts = {}, {}
    for pol in ("tca", "random", "streaming"):
        keep[pol], counts[pol] = select(q, k, t, TCAParams(8, 32, policy=pol), layer=1)
    assert torch.equal(counts["random"], counts["tca"]) and not torch.equal(keep["random"], keep["tca"])
    assert torch.equal(keep["random"].sum(1), keep["tca"].sum(1))
    nb = counts["tca"].shape[1]
    assert not keep["streaming"][:, 8: nb * 8].any() and keep["streaming"][:, :8].all()
    assert keep["streaming"][:, nb * 8:].all()
    p = TCAParams(8, 32)
    assert kept_fraction(counts["streaming"], L, p) < kept_fraction(counts["tca"], L, p)
    short, _ = select(q[:, :200], k[:, :200], t, TCAParams(8, 32, policy="random"), layer=1)
    ns = num_selectable_blocks(200, p)
    assert torch.equal(short[:, : ns * 8], keep["random"][:, : ns * 8])            # prefix-pure
    h = hash_scores(torch.arange(1000), torch.tensor(0), 0)
    assert h.unique().numel() > 990 and torch.equal(h, hash_scores(torch.arange(1000), torch.tensor(0), 0))
    with pytest.raises(ValueError, match="unknown selection policy"):
        select(q, k, t, TCAParams(8, 32, policy="oracle"))


def test_budgets_expected_kept_matches_kept_fraction_at_fixed_counts():
    """Budgets.expected_kept(n) (the cost of a budgets file before any text) equals the measured kept fraction
    when every compressed block keeps exactly the budgets' rho * b tokens."""
    from sglang_tca.budgets import Budgets, ModelShape

    shape = ModelShape("LlamaForCausalLM", 2, 4, 2, 16)
    p = TCAParams(8, 32)
    for k_idx, k in ((3, 8), (1, 2)):                       # keep-all, and 2 of 8 tokens per block
        b = Budgets.uniform(shape, [float(i == k_idx) for i in range(4)], block=8, window=32)
        for n in (20, 100, 333):
            counts = torch.full((2, n // 8 + 1), k)
            counts[:, 0] = 8
            assert b.expected_kept(n) == pytest.approx(kept_fraction(counts, n, p))
    assert Budgets.uniform(shape, [0, 0, 0, 1], block=8, window=32).expected_kept(333) == pytest.approx(1.0)


def test_observed_end_of_prompt_finds_a_needle_at_the_same_budget():
    """Question-aware end of prompt (p.observe): a "needle" of 3 tokens in a compressed block, whose keys the last
    queries (the "question") match strongly, is kept for those queries and for the decode, though the prefix-pure
    selection drops it; every head keeps exactly as many compressed tokens as before; earlier queries and everything
    outside the compressed range are unchanged; observe = 0 is plain TCA."""
    from sglang_tca.algorithm import observe_keep, prompt_mask, with_observed

    p = TCAParams(block=8, window=32, observe=4)
    L, scale = 160, D ** -0.5
    q, k, v = rand_qkv(L, seed=7)
    t = thresholds_for(p, "calibrated")
    needle = torch.arange(42, 45)                                  # block 5, compressed (dense_start(160) = 128)
    key = torch.randn(D, dtype=q.dtype, generator=torch.Generator().manual_seed(8))
    k[:, needle] = 4 * key
    q[:, L - p.observe:] = 4 * key
    keep, _ = select(q, k, t, p)
    ds = dense_start(L, p.block, p.window)
    assert not keep[:, needle].all()                               # plain TCA drops part of it
    mask, observed = prompt_mask(q, k, keep, p, scale)
    assert observed[:, needle - p.block].all()                     # the question finds it
    assert torch.equal(observed.sum(-1), keep[:, p.block:ds].sum(-1))
    assert torch.equal(observed, observe_keep(q[:, L - p.observe:], k, keep[:, p.block:ds].sum(-1), p, scale))
    tail = torch.arange(L - p.observe, L)
    assert torch.equal(mask[:, L - p.observe:], visible(with_observed(keep, observed, p.block), tail, L, p))
    assert torch.equal(mask[:, :L - p.observe], visible(keep, torch.arange(L - p.observe), L, p))
    plain, none = prompt_mask(q, k, keep, TCAParams(block=8, window=32), scale)
    assert none is None and torch.equal(plain, visible(keep, torch.arange(L), L, p))


def test_dense_observe_prefill_attends_the_whole_prompt_and_keeps_the_same_choice():
    """observe_prefill "dense" (SnapKV's way): every query of the prompt, from any q_start, sees the whole causal
    prompt; the observed choice (what the decode sees) is the sparse variant's, from the same queries and keys."""
    from sglang_tca.algorithm import prompt_mask

    p = TCAParams(block=8, window=32, observe=4)
    pd = TCAParams(block=8, window=32, observe=4, observe_prefill="dense")
    L, scale = 160, D ** -0.5
    q, k, _ = rand_qkv(L, seed=7)
    keep, _ = select(q, k, thresholds_for(p, "calibrated"), p)
    sparse_mask, sparse_obs = prompt_mask(q, k, keep, p, scale)
    for q_start in (0, 100):
        mask, observed = prompt_mask(q, k, keep, pd, scale, q_start=q_start)
        causal = torch.arange(L)[None, :] <= torch.arange(q_start, L)[:, None]
        assert torch.equal(mask, causal.expand(HKV, -1, -1))
        assert torch.equal(observed, sparse_obs)
        assert mask.shape == sparse_mask[:, q_start:].shape and not torch.equal(sparse_mask[:, q_start:], mask)
    plain, none = prompt_mask(q, k, keep, TCAParams(block=8, window=32, observe_prefill="dense"), scale)
    assert none is None and torch.equal(plain, visible(keep, torch.arange(L), L, p))   # without observe: plain TCA


def test_hf_reference_decode_keeps_the_observed_selection():
    """sglang_tca.hf_attention.TCA with observe: after a prompt, a decode step sees the prompt's observed tokens in
    the prompt's compressed blocks (as the server's decode does), not a fresh prefix-pure selection."""
    from sglang_tca.algorithm import prompt_mask, with_observed
    from sglang_tca.budgets import Budgets, ModelShape
    from sglang_tca.hf_attention import TCA

    p = TCAParams(block=8, window=32, observe=4)
    L = 160
    q, k, _ = rand_qkv(L + 1, seed=9)
    shape = ModelShape("test", num_layers=1, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D)
    budgets = Budgets.uniform(shape, [0.4, 0.3, 0.2, 0.1], block=8, window=32,
                              thresholds=thresholds_for(p, "calibrated")[None].float())
    pol = TCA(budgets, observe=4)
    pol.mask(0, q[:, :L], k[:, :L], torch.arange(L), D ** -0.5)
    step = pol.mask(0, q, k, torch.tensor([L]), D ** -0.5)
    keep, _ = select(q, k, budgets.thresholds[0], p)
    _, observed = prompt_mask(q[:, :L], k[:, :L], select(q[:, :L], k[:, :L], budgets.thresholds[0], p)[0], p,
                              D ** -0.5)
    assert torch.equal(step, visible(with_observed(keep, observed, p.block), torch.tensor([L]), L + 1, p))
    assert not torch.equal(step, visible(keep, torch.tensor([L]), L + 1, p))


def test_observe_keep_is_the_same_in_key_chunks():
    """observe_keep's chunked softmax (normaliser pass, then scores) gives the choice of one pass over all keys,
    for chunk sizes that do and do not divide the length; nothing compressed gives an empty choice."""
    from sglang_tca.algorithm import observe_keep

    p = TCAParams(block=8, window=32, observe=5)
    q, k, _ = rand_qkv(203, seed=11)
    counts = torch.tensor([40, 75])
    whole = observe_keep(q[:, -5:], k, counts, p, D ** -0.5, chunk=10 ** 6)
    assert whole.shape == (HKV, dense_start(203, 8, 32) - 8) and torch.equal(whole.sum(-1), counts)
    for chunk in (7, 64, 100):
        assert torch.equal(observe_keep(q[:, -5:], k, counts, p, D ** -0.5, chunk=chunk), whole), chunk
    assert observe_keep(q[:, -5:, :], k[:, :40], counts, p, D ** -0.5).shape == (HKV, 0)
