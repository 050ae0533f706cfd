"""Token selection of newly compressible blocks: `algorithm.select`, one block at a time, over SGLang's token pool.

For each block (request row, block index j >= 1) and each KV head h, with the block's observation queries
(scoring="block_last": the query at position (j+1)*b - 1, all Hq heads; scoring="window": the last queries of blocks
j .. j + w/b - 1):

    s[g, o, :] = q_obs[o, h*G + g] . K[j*b : (j+1)*b, h] / sqrt(D)          (K gathered through req_to_token)
    a          = max_g mean_o softmax(s[g, o, :])                          [b]
    n_eff      = exp(entropy(a / sum(a)))
    k          = keep_counts[searchsorted(thresholds[h], n_eff, right=True)]   (j == 0, the sink: k = b)
    keep       = top-k of a, ties to the earlier token

exactly as `algorithm.block_scores`, `neff`, `block_keep_counts` and `keep_from_counts` do it (fp32 math).

`select_blocks` is a Triton kernel, one program per (block, KV head), for b <= 128 (the [b, b] rank matrix lives in
registers). It is cheap next to attention: a block becomes compressible once per b tokens per request, and a whole
32K prompt has ~500 blocks x Hkv programs of b x D work each; over the same math in torch
(`selection.scores_to_bits`, what the server runs today) it saves ~15 small launches per layer. Not yet used by the
server: `_prep` builds `keep_counts` on the host, which decode CUDA-graph capture refuses; precompute it first.

Output (`SelectResult`), for n blocks:
    keep     [n, Hkv, b] bool      kept tokens of each block
    counts   [n, Hkv] int32        k per (block, head)
    kept_pos [n, Hkv, b] int32     absolute positions of the kept tokens, ascending, in the first counts[i, h]
                                   entries; -1 after them. Appending kept_pos[i, h, :counts[i, h]] to the (request,
                                   head) list keeps it sorted when blocks are appended in increasing j.
    scores   [n, Hkv, b] float32   a (for debugging / calibration)
    neff     [n, Hkv] float32      the metric
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl


class SelectResult(NamedTuple):
    keep: torch.Tensor
    counts: torch.Tensor
    kept_pos: torch.Tensor
    scores: torch.Tensor
    neff: torch.Tensor


@triton.jit
def _select_kernel(
    QObs, K_Buf, req_to_token, req_pool_indices, block_idx, thresholds, keep_counts,
    Keep, Counts, KeptPos, Scores, Neff,
    sqrt_d, n_obs, n_thr,
    stride_qb, stride_qo, stride_qh,
    stride_kbs, stride_kh,
    stride_r2t, stride_th,
    num_kv_heads,
    D: tl.constexpr, B: tl.constexpr, G: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    rp = tl.load(req_pool_indices + i).to(tl.int64)
    j = tl.load(block_idx + i).to(tl.int32)

    offs_b = tl.arange(0, B)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    pos = j * B + offs_b
    slot = tl.load(req_to_token + rp * stride_r2t + pos).to(tl.int64)
    k = tl.load(K_Buf + slot[:, None] * stride_kbs + h * stride_kh + offs_d[None, :],
                mask=mask_d[None, :], other=0.0).to(tl.float32)                     # [B, BLOCK_D]

    a = tl.zeros([B], dtype=tl.float32) - float("inf")
    for g in tl.static_range(G):
        ssum = tl.zeros([B], dtype=tl.float32)
        for o in range(n_obs):
            qv = tl.load(QObs + i.to(tl.int64) * stride_qb + o * stride_qo + (h * G + g) * stride_qh + offs_d,
                         mask=mask_d, other=0.0).to(tl.float32)
            s = tl.sum(k * qv[None, :], 1) / sqrt_d
            e = tl.exp(s - tl.max(s, 0))
            ssum += e / tl.sum(e, 0)
        a = tl.maximum(a, ssum / n_obs)

    # n_eff = exp(entropy) of the renormalised scores
    an = a / tl.maximum(tl.sum(a, 0), 1e-30)
    ne = tl.exp(-tl.sum(an * tl.log(tl.maximum(an, 1e-30)), 0))
    # searchsorted(thresholds[h], ne, right=True) = number of thresholds <= ne
    offs_t = tl.arange(0, BLOCK_T)
    thr = tl.load(thresholds + h * stride_th + offs_t, mask=offs_t < n_thr, other=float("inf"))
    idx = tl.sum((thr <= ne).to(tl.int32), 0)
    kc = tl.load(keep_counts + idx).to(tl.int32)
    kc = tl.where(j == 0, B, kc)

    # rank under a stable descending sort: greater scores, then equal scores of earlier tokens
    ai = a[:, None]
    aj = a[None, :]
    beats = (aj > ai) | ((aj == ai) & (offs_b[None, :] < offs_b[:, None]))
    rank = tl.sum(beats.to(tl.int32), 1)
    keep = rank < kc

    out_off = (i.to(tl.int64) * num_kv_heads + h) * B
    tl.store(Keep + out_off + offs_b, keep.to(tl.int8))
    tl.store(Scores + out_off + offs_b, a)
    tl.store(Counts + i * num_kv_heads + h, kc)
    tl.store(Neff + i * num_kv_heads + h, ne)
    dst = tl.cumsum(keep.to(tl.int32), 0) - 1
    tl.store(KeptPos + out_off + offs_b, tl.full([B], -1, tl.int32), mask=offs_b >= kc)
    tl.store(KeptPos + out_off + dst, pos, mask=keep)


def _prep(q_obs, thresholds, block, keep_counts, device):
    if q_obs.dim() == 3:
        q_obs = q_obs[:, None]
    assert q_obs.dim() == 4, "q_obs [n_blocks, n_obs, Hq, D] (or [n_blocks, Hq, D] for n_obs = 1)"
    kn = thresholds.shape[-1] + 1
    if keep_counts is None:
        keep_counts = 2 ** torch.arange(kn)
    keep_counts = keep_counts.to(device=device, dtype=torch.int32)
    assert keep_counts.numel() == kn, "keep_counts must have thresholds.shape[-1] + 1 entries"
    return q_obs, thresholds.to(device=device, dtype=torch.float32).contiguous(), keep_counts


def select_blocks(q_obs: torch.Tensor, k_buffer: torch.Tensor, req_to_token: torch.Tensor,
                  req_pool_indices: torch.Tensor, block_idx: torch.Tensor, thresholds: torch.Tensor, block: int,
                  keep_counts: Optional[torch.Tensor] = None) -> SelectResult:
    """Triton selection (one program per (block, KV head)); see the module docstring.

    q_obs [n, n_obs, Hq, D] (or [n, Hq, D]) observation queries of each block, any float dtype (math in fp32);
    k_buffer [slots, Hkv, D]; req_to_token [R, max_ctx] int32; req_pool_indices [n] and block_idx [n] int (request
    row and block index j of each block; positions j*b .. (j+1)*b - 1 must be in the pool);
    thresholds [Hkv, Kn-1] ascending (this layer, TP-local heads); keep_counts [Kn] (default 1, 2, 4, ..., b).
    """
    assert block & (block - 1) == 0 and block <= 128, "Triton selection needs a power-of-two block <= 128"
    q_obs, thr, kc = _prep(q_obs, thresholds, block, keep_counts, k_buffer.device)
    n, n_obs, Hq, D = q_obs.shape
    Hkv = k_buffer.shape[1]
    assert Hq % Hkv == 0 and k_buffer.shape[2] == D and thr.shape[0] == Hkv
    assert q_obs.stride(-1) == 1 and k_buffer.stride(-1) == 1 and req_to_token.stride(-1) == 1
    dev = k_buffer.device
    keep = torch.empty(n, Hkv, block, dtype=torch.int8, device=dev)
    counts = torch.empty(n, Hkv, dtype=torch.int32, device=dev)
    kept_pos = torch.empty(n, Hkv, block, dtype=torch.int32, device=dev)
    scores = torch.empty(n, Hkv, block, dtype=torch.float32, device=dev)
    ne = torch.empty(n, Hkv, dtype=torch.float32, device=dev)
    if n > 0:
        n_thr = thr.shape[-1]
        thr_arg = thr if n_thr > 0 else torch.full((Hkv, 1), math.inf, device=dev)
        _select_kernel[(n, Hkv)](
            q_obs, k_buffer, req_to_token, req_pool_indices, block_idx, thr_arg, kc,
            keep, counts, kept_pos, scores, ne,
            math.sqrt(D), n_obs, n_thr,
            q_obs.stride(0), q_obs.stride(1), q_obs.stride(2),
            k_buffer.stride(0), k_buffer.stride(1),
            req_to_token.stride(0), thr_arg.stride(0),
            Hkv,
            D=D, B=block, G=Hq // Hkv, BLOCK_D=triton.next_power_of_2(D),
            BLOCK_T=max(2, triton.next_power_of_2(max(n_thr, 1))),
            num_warps=4,
        )
    return SelectResult(keep.bool(), counts, kept_pos, scores, ne)
