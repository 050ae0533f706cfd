"""The reference TCA plugged into Hugging Face transformers' attention, for calibration and CPU quality checks.

`AttentionInterface` gets one function, "tca"; which policy it applies comes from the `attention_policy(...)`
context. It works for batch size 1, with or without the KV cache (`generate`): it keeps every layer's queries of
the sequence so far, because selection reads block-last queries. Slow (masked fp32 attention): a reference.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import AttentionInterface

from sglang_tca.algorithm import kept_fraction, masked_attention, prompt_mask, select, visible, with_observed
from sglang_tca.params import TCAParams
from sglang_tca.budgets import Budgets

IMPL = "tca"


class Policy:
    """What each query sees: `mask` returns [Hkv, len(pos), Lk] bool for the queries at positions pos, given the
    queries q [Hq, Lk, D] and keys k [Hkv, Lk, D] of the whole sequence so far. The base policy is dense (causal)."""
    params: TCAParams | None = None

    def mask(self, layer: int, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, scale: float) -> torch.Tensor:
        return (torch.arange(k.shape[1], device=k.device)[None, :] <= pos[:, None]).expand(k.shape[0], -1, -1)


class Dense(Policy):
    pass


@dataclass
class TCA(Policy):
    """TCA with these budgets; `policy` "random" / "streaming" and a `window` override give the evaluation
    baselines (see algorithm.apply_policy); `observe` N > 0 the question-aware end of prompt, whose selection the
    decode that follows (`generate`) keeps seeing, as in the server (`observe_prefill` "dense": the prompt itself
    attends densely)."""
    budgets: Budgets
    policy: str = "tca"
    window: int | None = None
    observe: int = 0
    observe_prefill: str = "sparse"
    counts: dict = field(default_factory=dict)     # layer -> per-block keep counts [Hkv, nb] of the last call
    observed: dict = field(default_factory=dict)   # layer -> the prompt's observed selection (observe > 0)

    def __post_init__(self):
        b = self.budgets
        self.params = TCAParams(b.block, self.window or b.window, b.scoring, self.policy, self.observe,
                                 self.observe_prefill)

    def mask(self, layer, q, k, pos, scale):
        keep, self.counts[layer] = select(q, k, self.budgets.thresholds[layer], self.params, layer)
        if int(pos[0]) == 0:                                       # a whole prompt
            mask, self.observed[layer] = prompt_mask(q, k, keep, self.params, scale)
            return mask
        if self.observed.get(layer) is not None:                   # decode after an observed prompt
            keep = with_observed(keep, self.observed[layer], self.params.block)
        return visible(keep, pos, k.shape[1], self.params)

    def kept_fraction(self, n: int) -> float:
        """Share of the dense KV kept at length n by the last run, mean over layers and KV heads."""
        return sum(kept_fraction(c, n, self.params) for c in self.counts.values()) / len(self.counts)


def logit_fidelity(dense: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(mean next-token KL(dense || other), top-1 agreement) of logits [L, V] over the same positions."""
    lp, lq = dense.float().log_softmax(-1), other.float().log_softmax(-1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    return kl, float((dense.argmax(-1) == other.argmax(-1)).float().mean())


@dataclass
class _Run:
    policy: Policy
    on_layer: Callable | None
    queries: dict = field(default_factory=dict)   # layer -> [Hq, L, D] queries of the sequence so far


_ACTIVE: _Run | None = None


def _forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if _ACTIVE is None:
        raise RuntimeError("the 'tca' attention needs an active sglang_tca.hf_attention.attention_policy(...) context")
    if query.shape[0] != 1:
        raise ValueError("the reference TCA attention runs one sequence at a time (batch size 1)")
    q, k, v = query[0], key[0], value[0]
    layer, lq, lk = module.layer_idx, q.shape[1], k.shape[1]
    hist = _ACTIVE.queries.get(layer)
    q_all = q if lq == lk or hist is None else torch.cat([hist[:, : lk - lq], q], 1)
    _ACTIVE.queries[layer] = q_all
    if _ACTIVE.on_layer is not None:
        _ACTIVE.on_layer(layer, q_all, k)
    pos = torch.arange(lk - lq, lk, device=q.device)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = masked_attention(q, k, v, _ACTIVE.policy.mask(layer, q_all, k, pos, scale), scale)
    return out.transpose(0, 1)[None].contiguous(), None


AttentionInterface.register(IMPL, _forward)


@contextlib.contextmanager
def attention_policy(policy: Policy, on_layer: Callable | None = None):
    """Run a model loaded with attn_implementation="tca" under `policy`; `on_layer(layer, q, k)` sees every layer's
    queries and keys of the whole sequence so far (calibration uses it)."""
    global _ACTIVE
    prev, _ACTIVE = _ACTIVE, _Run(policy, on_layer)
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = prev
