"""Reference TCA-Attention in plain PyTorch: the oracle every kernel and the server are tested against.

Shapes are for one sequence: q [Hq, L, D], k and v [Hkv, L, D] (after RoPE). GQA: the Hq // Hkv query heads of a
group share their KV head's selection. docs/ALGORITHM.md is the spec; in short, with block b and window w:

* Block j covers positions [j*b, (j+1)*b). Block 0 is the attention sink and always stays dense.
* At sequence length n, block j >= 1 is *compressed* once (j+1)*b + w <= n; everything from
  `dense_start(n) = b * max(1, (n - w) // b)` on is the dense window. A query at position i sees n = i + 1.
* A compressed block keeps k_j tokens. Its score vector a_j [b] is the in-block softmax of its *observation
  queries* (the last query of block j, and with scoring="window" also the last queries of the blocks that follow it
  inside the window), averaged over them and maxed over the group's query heads. The redundancy metric
  n_eff = exp(entropy(a_j)) picks k_j from the head's calibrated thresholds; the top-k_j tokens of a_j stay.
* Every observation query of block j lies before position (j+1)*b + w - 1, the first query that sees the block
  compressed, so a block's selection depends only on the prefix up to then (prefix purity), and sparse prefill
  and pruned decode give the same outputs.
* Optional question-aware end of prompt (`observe` = N > 0, `observe_keep`): the prompt's last N queries re-choose,
  per KV head and with the same number of tokens, which tokens of the compressed blocks they and the decode see;
  with `observe_prefill` "dense" the prompt itself is attended densely and only the decode sees the choice.
"""
from __future__ import annotations

import math

import torch

from sglang_tca.params import POLICIES, TCAParams, dense_start


def num_selectable_blocks(n: int, p: TCAParams) -> int:
    """Blocks j (counting the sink as 0) whose observation queries all exist at length n."""
    return max(0, (n // p.block) - p.n_obs + 1)


def block_scores(q: torch.Tensor, k: torch.Tensor, p: TCAParams, n_blocks: int) -> torch.Tensor:
    """a [Hkv, n_blocks, b]: per block, the in-block attention of its observation queries (mean over them, max over
    the group's query heads). Row j for j < n_blocks; row 0 (the sink) is computed but never used."""
    hq, _, d = q.shape
    hkv, b = k.shape[0], p.block
    if n_blocks == 0:
        return q.new_zeros(hkv, 0, b, dtype=torch.float32)
    g = hq // hkv
    last = torch.arange(n_blocks + p.n_obs - 1, device=q.device) * b + (b - 1)      # block-last query positions
    q_last = q[:, last].float().view(hkv, g, -1, d)                                   # [Hkv, g, nb+n_obs-1, D]
    k_blk = k[:, : n_blocks * b].float().view(hkv, n_blocks, b, d)
    obs = torch.arange(n_blocks, device=q.device)[:, None] + torch.arange(p.n_obs, device=q.device)  # [nb, n_obs]
    s = torch.einsum("hgnod,hnbd->hgnob", q_last[:, :, obs], k_blk) / math.sqrt(d)  # [Hkv, g, nb, n_obs, b]
    return s.softmax(-1).mean(-2).amax(1)


def neff(a: torch.Tensor) -> torch.Tensor:
    """Redundancy metric: effective number of tokens exp(H) of each block's (renormalised) score vector."""
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-30)
    return torch.exp(-(a * a.clamp_min(1e-30).log()).sum(-1))


def block_keep_counts(metric: torch.Tensor, thresholds: torch.Tensor, block: int) -> torch.Tensor:
    """k per block [Hkv, nb] from the metric [Hkv, nb] and the head's ascending thresholds [Hkv, Kn-1]."""
    idx = torch.searchsorted(thresholds.to(metric.device).contiguous(), metric.contiguous(), right=True)
    return torch.pow(2, idx)


def thresholds_for_shares(metric: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Calibration rule: thresholds [H, Kn-1] such that, on these blocks' metric values [H, nb], the share p[h, m]
    (counted by largest remainder) of the most redundant blocks keeps keep_counts[m]; boundaries sit halfway
    between neighbouring sorted values (-inf/+inf where a boundary falls outside the data)."""
    h, nb = metric.shape
    srt = metric.sort(-1).values
    raw = p * nb
    cnt = raw.floor()
    short = (nb - cnt.sum(-1)).long()
    frac_order = (raw - cnt).argsort(-1, descending=True)
    for i in range(h):                                     # largest remainder: hand out what flooring lost
        cnt[i, frac_order[i, : short[i]]] += 1
    cut = cnt.cumsum(-1)[:, :-1].long()                   # [H, Kn-1] number of blocks below each boundary
    lo = srt.gather(1, (cut - 1).clamp(0, nb - 1))
    hi = srt.gather(1, cut.clamp(0, nb - 1))
    t = (lo + hi) / 2
    t = torch.where(cut <= 0, torch.full_like(t, -math.inf), t)
    return torch.where(cut >= nb, torch.full_like(t, math.inf), t)


def keep_from_counts(a: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Top-k_j tokens of each block by score (ties go to the earlier token). a [..., nb, b], counts [..., nb]."""
    order = torch.sort(a, dim=-1, descending=True, stable=True).indices
    rank = order.argsort(-1)
    return rank < counts[..., None]


def hash_scores(pos: torch.Tensor, head: torch.Tensor, layer: int) -> torch.Tensor:
    """A fixed pseudo-random int64 score per (layer, global KV head, token position), broadcast over pos and head:
    the same in every run, on every device and tensor-parallel rank, and a function of the position only (so a
    random selection is prefix-pure too)."""
    m = 0xFFFFFFFF
    x = (pos.long() * 0x9E3779B1 + head.long() * 0x85EBCA77 + layer * 0xC2B2AE3D) & m
    for mul in (0x7FEB352D, 0x846CA68B):                   # two rounds of a 32-bit integer mixer
        x = ((x ^ (x >> 16)) * mul) & m
    return x ^ (x >> 16)


def apply_policy(a: torch.Tensor, counts: torch.Tensor, policy: str, pos: torch.Tensor, head: torch.Tensor,
                 layer: int):
    """(ranking scores, keep counts) of compressed blocks under a selection policy. "tca" leaves them as they are.
    The evaluation baselines keep TCA's shapes: "random" keeps TCA's per-block counts (the same KV budget) but ranks
    the tokens by `hash_scores`; "streaming" keeps no token of a compressed block (StreamingLLM: sink + window).
    a [..., b] scores, counts [...]; pos (token positions) and head (global KV head ids) broadcast to a's shape."""
    if policy == "random":
        return hash_scores(pos, head, layer).expand(a.shape), counts
    if policy == "streaming":
        return a, torch.zeros_like(counts)
    if policy != "tca":
        raise ValueError(f"unknown selection policy {policy!r}; expected one of {POLICIES}")
    return a, counts


def select(q: torch.Tensor, k: torch.Tensor, thresholds: torch.Tensor, p: TCAParams, layer: int = 0):
    """keep [Hkv, L] bool for a prompt of length L = k.shape[1]: True for the sink, for kept tokens of selectable
    blocks, and for every token of blocks not yet selectable (they are still in the dense window). Also returns
    the per-block keep counts [Hkv, nb] of the selectable blocks (block 0 included as b). `layer` only matters
    for p.policy == "random"; the heads are taken as global KV heads 0..Hkv-1."""
    hkv, L, _ = k.shape
    nb = num_selectable_blocks(L, p)
    keep = torch.ones(hkv, L, dtype=torch.bool, device=k.device)
    if nb <= 1:
        return keep, torch.full((hkv, nb), p.block, device=k.device)
    a = block_scores(q, k, p, nb)
    counts = block_keep_counts(neff(a), thresholds, p.block)
    pos = torch.arange(nb * p.block, device=k.device).view(1, nb, p.block)
    a, counts = apply_policy(a, counts, p.policy, pos, torch.arange(hkv, device=k.device).view(hkv, 1, 1), layer)
    counts[:, 0] = p.block                                                              # sink stays dense
    keep[:, : nb * p.block] = keep_from_counts(a, counts).flatten(1)
    return keep, counts


OBSERVE_POOL = 7     # max-pooling width of the observation scores: a kept token brings its neighbours (SnapKV)


def observe_scores(q_obs: torch.Tensor, k: torch.Tensor, p: TCAParams, scale: float, pool: int = OBSERVE_POOL,
                   chunk: int = 16384) -> torch.Tensor:
    """a [Hkv, ds - b] over the compressed positions [b, ds), ds = dense_start(n), of a prompt of length n =
    k.shape[1]: the attention of its last N queries q_obs [Hq, N, D] (positions n-N..n-1), softmax over all causal
    keys, mean over the N queries, max over the group's query heads, max-pooled over `pool` neighbouring positions.
    Longer prompts are processed `chunk` keys at a time (a softmax normaliser pass, then the scores), so memory is
    O(Hq * N * chunk), not O(Hq * N * n)."""
    hq, n_obs, d = q_obs.shape
    hkv, n, _ = k.shape
    ds = int(dense_start(n, p.block, p.window))
    if ds <= p.block:
        return k.new_zeros(hkv, 0, dtype=torch.float32)
    qf = q_obs.float().reshape(hkv, hq // hkv, n_obs, d) * scale
    q_pos = n - n_obs + torch.arange(n_obs, device=k.device)

    def logits(t0, t1):                                                # [Hkv, g, N, t1 - t0], causal
        s = torch.einsum("hgod,hnd->hgon", qf, k[:, t0:t1].float())
        return s.masked_fill_(torch.arange(t0, t1, device=k.device)[None, :] > q_pos[:, None], float("-inf"))

    # in place where the logits are not needed again: each copy is 64 MiB for Llama-3.1-8B at 16K keys (N = 32)
    if n <= chunk:                                     # one pass: the logits once (launch-bound at these sizes)
        s = logits(0, n)
        a = s[..., p.block:ds].sub_(s.logsumexp(-1, keepdim=True)).exp_().mean(2).amax(1)
    else:
        lse = torch.stack([logits(t0, min(t0 + chunk, n)).logsumexp(-1) for t0 in range(0, n, chunk)]).logsumexp(0)
        a = torch.cat([logits(t0, min(t0 + chunk, ds)).sub_(lse[..., None]).exp_().mean(2).amax(1)
                       for t0 in range(p.block, ds, chunk)], -1)                           # [Hkv, ds - b]
    return torch.nn.functional.max_pool1d(a[:, None], pool, stride=1, padding=pool // 2)[:, 0]


def observe_keep(q_obs: torch.Tensor, k: torch.Tensor, counts: torch.Tensor, p: TCAParams, scale: float,
                 pool: int = OBSERVE_POOL, chunk: int = 16384) -> torch.Tensor:
    """Question-aware selection at the end of a prompt (SnapKV-style observation window): keep [Hkv, ds - b] bool
    over the compressed positions, keeping counts[h] tokens per KV head (the prefix-pure selection's number there,
    so the KV budget and the per-head budgets are unchanged), the top ones by `observe_scores`; ties go to the
    earlier token. q_obs [Hq, N, D], k [Hkv, n, D], counts [Hkv] int."""
    a = observe_scores(q_obs, k, p, scale, pool, chunk)
    return keep_from_counts(a, counts.to(a.device))


def with_observed(keep: torch.Tensor, observed: torch.Tensor, block: int) -> torch.Tensor:
    """keep [Hkv, L] with the compressed positions [b, b + observed.shape[1]) replaced by `observed`."""
    out = keep.clone()
    out[:, block:block + observed.shape[1]] = observed
    return out


def visible(keep: torch.Tensor, q_pos: torch.Tensor, n_keys: int, p: TCAParams) -> torch.Tensor:
    """[Hkv, S, n_keys] bool: what query positions q_pos [S] see: causal, and inside [block, dense_start) only
    kept tokens."""
    t = torch.arange(n_keys, device=keep.device)
    causal = t[None, :] <= q_pos[:, None]
    compressed = (t[None, :] >= p.block) & (t[None, :] < dense_start(q_pos + 1, p.block, p.window)[:, None])
    return causal[None] & (~compressed[None] | keep[:, None, :])


def masked_attention(q, k, v, mask, scale, chunk: int = 512):
    """Softmax attention with a per-KV-head boolean mask [Hkv, S, Lk]; q [Hq, S, D]. At least fp32 math, chunked
    over S."""
    hq, s_len, _ = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    out = torch.empty(hq, s_len, v.shape[-1], dtype=q.dtype, device=q.device)
    acc = torch.promote_types(q.dtype, torch.float32)
    kf, vf = k.to(acc).repeat_interleave(g, 0), v.to(acc).repeat_interleave(g, 0)
    for s0 in range(0, s_len, chunk):
        m = mask[:, s0:s0 + chunk].repeat_interleave(g, 0)
        out[:, s0:s0 + chunk] = torch.nn.functional.scaled_dot_product_attention(
            q[:, s0:s0 + chunk].to(acc), kf, vf, attn_mask=m, scale=scale).to(q.dtype)
    return out


def prompt_mask(q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor, p: TCAParams, scale: float,
                q_start: int = 0, pool: int = OBSERVE_POOL, choose=keep_from_counts):
    """What the queries of positions [q_start, L) of a prompt of length L = k.shape[1] see, given its prefix-pure
    selection keep [Hkv, L] (`select`): (mask [Hkv, L - q_start, L], observed [Hkv, ds - b] or None). With
    p.observe = N > 0 the prompt's last N queries see `observe_keep`'s tokens in the compressed blocks (returned as
    `observed`: the decode that follows sees them too), every other query the prefix-pure selection; with
    p.observe_prefill "dense" every query of the prompt sees the whole causal prompt instead (only the decode reads
    the observed choice: SnapKV's way). `pool` and `choose(scores [Hkv, ds - b], counts [Hkv]) -> keep` vary the
    observed choice (bench/ablation_hf.py); the defaults are `observe_keep`'s."""
    lk = k.shape[1]
    q_pos = torch.arange(q_start, lk, device=q.device)
    n_obs = min(p.observe, lk)
    dense = n_obs > 0 and p.observe_prefill == "dense"             # every token kept: the causal mask
    mask = visible(torch.ones_like(keep) if dense else keep, q_pos, lk, p)
    if n_obs == 0:
        return mask, None
    ds = int(dense_start(lk, p.block, p.window))
    observed = choose(observe_scores(q[:, lk - n_obs:], k, p, scale, pool), keep[:, p.block:ds].sum(-1))
    if not dense:
        tail = torch.arange(max(q_start, lk - n_obs), lk, device=q.device)
        mask[:, tail - q_start] = visible(with_observed(keep, observed, p.block), tail, lk, p)
    return mask, observed


def tca_attention(q, k, v, thresholds, p: TCAParams, scale=None, q_start: int = 0, chunk: int = 512):
    """Sparse TCA attention for one prompt. q [Hq, Lk, D] holds the queries of *every* position (selection reads
    the block-last ones), k, v [Hkv, Lk, D]; returns the outputs of positions [q_start, Lk)."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    mask, _ = prompt_mask(q, k, select(q, k, thresholds, p)[0], p, scale, q_start)
    return masked_attention(q[:, q_start:], k, v, mask, scale, chunk)


def kept_fraction(keep_counts_per_block: torch.Tensor, n: int, p: TCAParams) -> float:
    """Share of the dense KV a sequence of length n keeps (mean over heads): sink + dense window + kept tokens of
    compressed blocks, from per-block counts [Hkv, nb] (block 0 = sink)."""
    n_comp = dense_start(n, p.block, p.window) // p.block - 1                          # compressed blocks 1..n_comp
    kept = keep_counts_per_block[:, 1:1 + n_comp].sum(-1).float()
    return float(((n - n_comp * p.block + kept) / n).mean())


class PrunedKVCache:
    """Pruned decode for one layer, physically: per KV head it stores only the sink, the kept tokens of compressed
    blocks, and the dense tail; as the tail passes w + b its oldest block is compressed and its dropped tokens are
    gone. Outputs must equal `tca_attention` on the full sequence (tests/test_algorithm.py)."""

    def __init__(self, thresholds: torch.Tensor, p: TCAParams, scale: float):
        if p.policy != "tca":
            raise ValueError(f"PrunedKVCache implements the 'tca' policy only, got {p.policy!r}")
        self.t, self.p, self.scale = thresholds, p, scale
        self.n = 0                        # tokens seen
        self.k = self.v = None            # dense tail [Hkv, T, D]; the tail starts at position self.tail_start
        self.tail_start = 0
        self.kept_k: list[torch.Tensor] = []   # per KV head [n_h, D]: sink + kept tokens, in position order
        self.kept_v: list[torch.Tensor] = []
        self.q_last: list[torch.Tensor] = []   # block-last queries of the blocks still in the tail [Hq, D]

    def _compress_ready_blocks(self):
        b, w = self.p.block, self.p.window
        while self.tail_start + b <= dense_start(self.n, b, w) and self.tail_start >= b:
            j = self.tail_start // b
            q_obs = torch.stack(self.q_last[: self.p.n_obs], 1)                        # [Hq, n_obs, D]
            # Scores of block j from its observation queries: reuse block_scores on a one-block view.
            a = block_scores(_obs_as_block_lasts(q_obs, b), self.k[:, :b], self.p, 1)[:, 0]   # [Hkv, b]
            cnt = block_keep_counts(neff(a)[:, None], self.t, b)[:, 0]
            keep = keep_from_counts(a, cnt)                                            # [Hkv, b]
            for h in range(self.k.shape[0]):
                self.kept_k[h] = torch.cat([self.kept_k[h], self.k[h, :b][keep[h]]])
                self.kept_v[h] = torch.cat([self.kept_v[h], self.v[h, :b][keep[h]]])
            self.k, self.v = self.k[:, b:], self.v[:, b:]
            self.q_last.pop(0)
            self.tail_start += b
            assert j * b + b == self.tail_start

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append one token (q [Hq, D], k, v [Hkv, D]) and return its attention output [Hq, D]."""
        b = self.p.block
        if self.k is None:
            self.k, self.v = k[:, None], v[:, None]
            self.kept_k = [k.new_zeros(0, k.shape[-1]) for _ in range(k.shape[0])]
            self.kept_v = [v.new_zeros(0, v.shape[-1]) for _ in range(v.shape[0])]
        else:
            self.k, self.v = torch.cat([self.k, k[:, None]], 1), torch.cat([self.v, v[:, None]], 1)
        self.n += 1
        if self.n % b == 0 and self.n > b:                  # a block (not the sink) just completed
            self.q_last.append(q)
        if self.n == b:                                     # the sink block moves out of the tail for good
            self.kept_k = list(self.k.unbind(0))
            self.kept_v = list(self.v.unbind(0))
            self.k, self.v = self.k[:, b:], self.v[:, b:]
            self.tail_start = b
        self._compress_ready_blocks()
        return self._attend(q)

    def _attend(self, q):
        hq, hkv = q.shape[0], len(self.kept_k)
        g = hq // hkv
        out = torch.empty(hq, self.v.shape[-1], dtype=q.dtype)
        acc = torch.promote_types(q.dtype, torch.float32)
        for h in range(hkv):
            kk = torch.cat([self.kept_k[h], self.k[h]]).to(acc)
            vv = torch.cat([self.kept_v[h], self.v[h]]).to(acc)
            s = (q[h * g:(h + 1) * g].to(acc) @ kk.T) * self.scale
            out[h * g:(h + 1) * g] = (s.softmax(-1) @ vv).to(q.dtype)
        return out

    def stored_tokens(self) -> list[int]:
        """Tokens stored per KV head right now (what the pruned cache holds)."""
        return [kk.shape[0] + self.k.shape[1] for kk in self.kept_k]


def _obs_as_block_lasts(q_obs: torch.Tensor, b: int) -> torch.Tensor:
    """Lay the observation queries [Hq, n_obs, D] out at block-last positions so `block_scores` reads them."""
    hq, n_obs, d = q_obs.shape
    q = q_obs.new_zeros(hq, n_obs * b, d)
    q[:, b - 1::b] = q_obs
    return q
