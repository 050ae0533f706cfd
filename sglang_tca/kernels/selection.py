"""Selection of the blocks that complete in a forward pass, one Triton launch per layer (graph-safe, no host sync).

Row i of the launch is a token at position pos[i] whose logical page is rec_page[i]. A row ends block j when
(pos + 1) % b == 0; with check_pos (decode, where every row of the batch runs) the other rows return at once. For
each row that ends a block and each KV head h, with the block's keys K[t] = k_dense[l2d[P*b + t]] (t < b, P =
rec_page[i]) and the row's own query (scoring "block_last"):

    s[g, :] = q[i, h*G + g] . K[:, h] * scale            (g < G = Hq / Hkv)
    a       = max_g softmax(s[g, :])                      [b]
    n_eff   = exp(entropy(a / sum(a)))
    k       = 2 ** (number of the head's thresholds <= n_eff)       (algorithm.block_keep_counts)
    keep    = top-k of a, ties to the earlier token                  (algorithm.keep_from_counts)

and the b-bit keep mask is stored at mask[P, layer, h] (bit t = token t; bit 63 is the sign bit). Fp32 math, the
same as `sglang_tca.algorithm` (block_scores with n_obs = 1, neff, block_keep_counts, keep_from_counts,
apply_policy). The sink (pos < b) keeps every token. Policies (algorithm.apply_policy): "random" keeps TCA's counts
but ranks the tokens by `algorithm.hash_scores` (computed with torch and passed in: a function of the positions
only), "streaming" keeps no token of a compressed block.

One program per (row, KV head); the [b, b] rank matrix lives in registers (b <= 64: the mask is one int64).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_tca.algorithm import hash_scores
from sglang_tca.params import POLICIES          # ("tca", "random", "streaming"): the kernel's POLICY is the index


@triton.jit
def _select_kernel(Q, positions, rec_page, l2d, K, thresholds, rank_scores, mask, scale, layer, n_layers, n_thr,
                   stride_qn, stride_qh, stride_ks, stride_kh, stride_th,
                   HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, B: tl.constexpr,
                   BLOCK_T: tl.constexpr, POLICY: tl.constexpr, CHECK_POS: tl.constexpr):
    i = tl.program_id(0)
    h = tl.program_id(1)
    pos = tl.load(positions + i).to(tl.int64)
    if CHECK_POS:                                    # decode: only rows whose token ends a block
        if (pos + 1) % B != 0:
            return
    p = tl.load(rec_page + i).to(tl.int64)
    t = tl.arange(0, B)
    d = tl.arange(0, BLOCK_D)
    md = d < D
    slot = tl.load(l2d + p * B + t).to(tl.int64)                                   # the block's dense slots
    k = tl.load(K + slot[:, None] * stride_ks + h * stride_kh + d[None, :], mask=md[None, :],
                other=0.0).to(tl.float32)                                          # [B, BLOCK_D]
    a = tl.full([B], float("-inf"), tl.float32)
    for g in tl.static_range(G):
        qv = tl.load(Q + i.to(tl.int64) * stride_qn + (h * G + g) * stride_qh + d, mask=md, other=0.0)
        s = tl.sum(k * qv.to(tl.float32)[None, :], 1) * scale
        e = tl.exp(s - tl.max(s, 0))
        a = tl.maximum(a, e / tl.sum(e, 0))
    an = a / tl.maximum(tl.sum(a, 0), 1e-30)
    ne = tl.exp(-tl.sum(an * tl.log(tl.maximum(an, 1e-30)), 0))
    c = tl.arange(0, BLOCK_T)
    thr = tl.load(thresholds + h * stride_th + c, mask=c < n_thr, other=float("inf"))
    kc = 1 << tl.sum((thr <= ne).to(tl.int32), 0)                                   # searchsorted(right=True)
    if POLICY == 2:                                  # streaming: a compressed block keeps nothing
        kc = 0
    kc = tl.where(pos < B, B, kc)                    # the sink keeps everything
    if POLICY == 1:                                  # random: TCA's counts, tokens ranked by their hash
        r = tl.load(rank_scores + (i.to(tl.int64) * HKV + h) * B + t)
    else:
        r = a
    beats = (r[None, :] > r[:, None]) | ((r[None, :] == r[:, None]) & (t[None, :] < t[:, None]))
    keep = tl.sum(beats.to(tl.int32), 1) < kc        # rank under a stable descending sort
    bits = tl.sum(keep.to(tl.int64) << t.to(tl.int64), 0)
    tl.store(mask + (p * n_layers + layer) * HKV + h, bits)


def select_blocks(q: torch.Tensor, positions: torch.Tensor, rec_page: torch.Tensor, l2d: torch.Tensor,
                  k_dense: torch.Tensor, thresholds: torch.Tensor, mask: torch.Tensor, block: int, layer: int,
                  scale: float, policy: str = "tca", heads: torch.Tensor | None = None,
                  check_pos: bool = False) -> None:
    """Select the blocks that end at these tokens and store their masks at mask[P, layer] (see the module docstring).

    q [n, Hq, D] the tokens' queries of this layer (any float dtype; the last dim contiguous); positions [n] (each
    ends a block, unless check_pos: then rows that end none are skipped); rec_page [n] their logical pages; l2d
    SGLang's logical -> dense slot map; k_dense [dense slots, Hkv, D] this layer's dense K buffer, holding the blocks'
    keys; thresholds [Hkv, Kn-1] ascending (this layer, this rank's heads); mask [logical pages, layers, Hkv] int64;
    heads [Hkv] the global KV head ids (the "random" policy's hash)."""
    n = q.shape[0]
    if n == 0:
        return
    if policy not in POLICIES:
        raise ValueError(f"unknown selection policy {policy!r}; expected one of {POLICIES}")
    hq, d = q.shape[1], q.shape[2]
    hkv = k_dense.shape[1]
    assert block & (block - 1) == 0 and block <= 64, "the selection needs a power-of-two block <= 64"
    assert hq % hkv == 0 and k_dense.shape[2] == d and thresholds.shape[0] == hkv
    assert q.stride(2) == 1 and k_dense.stride(2) == 1 and mask.is_contiguous()
    rank_scores = mask                                                              # unused unless "random"
    if policy == "random":
        tok = (positions - block + 1)[:, None, None] + torch.arange(block, device=q.device)
        rank_scores = hash_scores(tok, heads.to(q.device).view(1, hkv, 1), layer).contiguous()   # [n, Hkv, b]
    thr = thresholds.to(device=q.device, dtype=torch.float32).contiguous()      # a no-op in the server
    n_thr = thr.shape[1]
    if n_thr == 0:
        thr = torch.full((hkv, 1), float("inf"), device=q.device)
    _select_kernel[(n, hkv)](
        q, positions, rec_page, l2d, k_dense, thr, rank_scores, mask, scale, layer, mask.shape[1], n_thr,
        q.stride(0), q.stride(1), k_dense.stride(0), k_dense.stride(1), thr.stride(0),
        HKV=hkv, G=hq // hkv, D=d, BLOCK_D=triton.next_power_of_2(d), B=block,
        BLOCK_T=max(2, triton.next_power_of_2(max(n_thr, 1))), POLICY=POLICIES.index(policy), CHECK_POS=check_pos,
        num_warps=4)
