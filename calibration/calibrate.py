"""Offline calibration: one dense forward pass over calibration text gives every (layer, KV head) its budget.

For each layer, a hook sees the post-RoPE queries and keys of the whole text. It scores the blocks (as the online
selection does), then, for every log-Gaussian candidate distribution p over keep counts k in {1, 2, ..., b}, sets the
head's thresholds so that the calibration blocks follow p, and measures the attention mass the resulting selection
drops on sampled query rows (worst query head of the group, mean over rows). Each head gets the cheapest candidate
whose dropped mass is <= eps; docs/ALGORITHM.md explains why dropped mass bounds the output error.
"""
from __future__ import annotations

import datetime
import math
from dataclasses import dataclass

import torch

from sglang_tca.algorithm import (block_keep_counts, block_scores, keep_from_counts, neff, num_selectable_blocks,
                                  thresholds_for_shares)
from sglang_tca.params import TCAParams, dense_start
from sglang_tca.budgets import Budgets, ModelShape, keep_counts_for

MUS_STEP = 0.5
SIGMAS = (0.25, 0.5, 1.0, 2.0)


def candidates(block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-Gaussian keep distributions P [M, Kn] sorted by expected kept share rho [M]; the last one is keep-all."""
    lk = torch.arange(int(math.log2(block)) + 1, dtype=torch.float64)
    mus = torch.arange(0, lk[-1] + 1e-9, MUS_STEP)
    P = torch.stack([torch.exp(-(lk - mu) ** 2 / (2 * s * s)) for mu in mus for s in SIGMAS])
    P = torch.cat([P / P.sum(-1, keepdim=True), torch.nn.functional.one_hot(lk.long()[-1:], len(lk)).double()])
    rho = (P * 2 ** lk).sum(-1) / block
    order = rho.argsort(stable=True)
    return P[order].float(), rho[order].float()


def sample_rows(L: int, p: TCAParams, n: int) -> torch.Tensor:
    """Query positions whose view includes compressed blocks, evenly spread."""
    first = p.window + 2 * p.block - 1
    if L <= first:
        raise ValueError(f"calibration text of {L} tokens is too short for window {p.window} and block {p.block}: "
                         f"need more than {first} tokens")
    return torch.linspace(first, L - 1, min(n, L - first)).round().long().unique()


@torch.no_grad()
def layer_budget(q: torch.Tensor, k: torch.Tensor, p: TCAParams, P: torch.Tensor, eps: float, n_rows: int):
    """q [Hq, L, D], k [Hkv, L, D] of one layer -> (chosen candidate index [Hkv], dropped mass [Hkv, M],
    thresholds [Hkv, M, Kn-1])."""
    hq, L, d = q.shape
    hkv, g, b = k.shape[0], q.shape[0] // k.shape[0], p.block
    nb = num_selectable_blocks(L, p)
    a = block_scores(q, k, p, nb)                                                   # [Hkv, nb, b]
    metric = neff(a)[:, 1:]                                                         # the sink is never compressed
    rows = sample_rows(L, p, n_rows).to(q.device)
    # full causal attention of the sampled rows, fp32
    s = torch.einsum("hsd,htd->hst", q[:, rows].float(), k.float().repeat_interleave(g, 0)) * d ** -0.5
    t = torch.arange(L, device=q.device)
    s = s.masked_fill(t[None, None, :] > rows[None, :, None], float("-inf"))
    A = s.softmax(-1)                                                               # [Hq, S, L]
    compressed = (t[None, :] >= b) & (t[None, :] < dense_start(rows + 1, b, p.window)[:, None])   # [S, L]
    base = (A * ~compressed).sum(-1)                                                # mass that is always kept
    Ac = (A * compressed)[..., b: nb * b]                                           # mass in blocks 1..nb-1
    M = P.shape[0]
    thr = torch.stack([thresholds_for_shares(metric, P[m].expand(hkv, -1).to(metric)) for m in range(M)], 1)
    counts = block_keep_counts(metric[:, None].expand(-1, M, -1), thr, b)           # [Hkv, M, nb-1]
    keep = keep_from_counts(a[:, None, 1:].expand(-1, M, -1, -1), counts).flatten(2).float()   # [Hkv, M, (nb-1)*b]
    kept = torch.einsum("hgst,hmt->hgsm", Ac.view(hkv, g, -1, Ac.shape[-1]), keep)  # [Hkv, g, S, M]
    dropped = (1 - base.view(hkv, g, -1, 1) - kept).clamp_min(0).amax(1).mean(1)  # [Hkv, M]
    return cheapest_within(dropped, eps), dropped, thr


def cheapest_within(dropped: torch.Tensor, eps: float) -> torch.Tensor:
    """Per head, the first (cheapest) candidate whose dropped mass is <= eps, else the last one (keep-all).
    dropped [..., M] over candidates sorted by rho."""
    ok = dropped <= eps
    return torch.where(ok.any(-1), ok.float().argmax(-1), torch.full(ok.shape[:-1], ok.shape[-1] - 1,
                                                                     device=ok.device))


@dataclass
class Calibration:
    """What one calibration pass measured for every candidate: budgets for any eps, and their uniform twin."""
    shape: ModelShape
    block: int
    window: int
    scoring: str
    P: torch.Tensor          # [M, Kn] candidate keep distributions, sorted by rho
    rho: torch.Tensor        # [M]
    dropped: torch.Tensor    # [L, H, M] mean dropped attention mass
    thr: torch.Tensor        # [L, H, M, Kn-1] thresholds that realise each candidate on the calibration text
    info: dict

    def _budgets(self, choice: torch.Tensor, eps: float, **extra) -> Budgets:
        idx = choice[..., None, None].expand(-1, -1, 1, self.thr.shape[-1])
        err = self.dropped.gather(-1, choice[..., None])[..., 0]
        return Budgets(self.shape, self.block, self.window, eps, self.scoring, "neff", self.P[choice],
                       self.thr.gather(2, idx)[:, :, 0], {**self.info, **extra, "dropped_mass": err.tolist()})

    def budgets(self, eps: float) -> Budgets:
        """Each head gets the cheapest candidate whose dropped mass is <= eps (the TCA budgets)."""
        return self._budgets(cheapest_within(self.dropped, eps), eps)

    def uniform(self, like: Budgets) -> Budgets:
        """Ablation of the per-head budgets: every head gets the one candidate whose rho is closest to the mean rho
        of `like` (same KV budget on average), each head's thresholds still fitted to its own metric."""
        m = int((self.rho - float(like.rho.mean())).abs().argmin())
        choice = torch.full(self.dropped.shape[:2], m, dtype=torch.long)
        return self._budgets(choice, like.eps, uniform_of_eps=like.eps)


def calibrate(model, input_ids: torch.Tensor, *, eps: float, block: int, window: int, scoring: str,
              n_rows: int = 512, progress=None, provenance: dict | None = None) -> Budgets:
    """Run `model` (a transformers causal LM loaded with attn_implementation="tca") once over input_ids [1, L]."""
    return measure(model, input_ids, block=block, window=window, scoring=scoring, n_rows=n_rows, progress=progress,
                   provenance=provenance).budgets(eps)


def measure(model, input_ids: torch.Tensor, *, block: int, window: int, scoring: str, n_rows: int = 512,
            progress=None, provenance: dict | None = None) -> Calibration:
    """The calibration forward pass: every candidate's dropped mass and thresholds, per (layer, KV head)."""
    from sglang_tca.hf_attention import Dense, attention_policy

    p = TCAParams(block, window, scoring)
    shape = ModelShape.from_hf_config(model.config)
    P, rho = candidates(block)
    kn, M = len(keep_counts_for(block)), P.shape[0]
    dropped = torch.empty(shape.num_layers, shape.num_kv_heads, M)
    thr = torch.empty(shape.num_layers, shape.num_kv_heads, M, kn - 1)
    sample_rows(input_ids.shape[1], p, n_rows)                                       # fail early if too short

    def on_layer(layer, q, k):
        _, dropped[layer], thr[layer] = (t.cpu() for t in layer_budget(q, k, p, P.to(q.device), 0.0, n_rows))
        if progress is not None:
            progress(layer)

    with attention_policy(Dense(), on_layer=on_layer), torch.no_grad():
        model(input_ids=input_ids.to(model.device), use_cache=False, logits_to_keep=1)
    info = {"date": datetime.date.today().isoformat(), "tokens": int(input_ids.shape[1]), "rows": n_rows,
            "candidates": M, "torch": torch.__version__}
    return Calibration(shape, block, window, scoring, P, rho, dropped, thr, {**(provenance or {}), **info})
