"""The parameters of TCA that every layer of the project shares: the block/window geometry and the selection
policies. Pure Python (no torch, no sglang), so the launcher, the budgets format, the reference algorithm and the
server all import it without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("tca", "random", "streaming")   # token selection policies, see algorithm.apply_policy
OBSERVE_PREFILLS = ("sparse", "dense")      # what an observing prompt's own queries see, see algorithm.prompt_mask


@dataclass(frozen=True)
class TCAParams:
    block: int = 64
    window: int = 1024
    scoring: str = "block_last"   # or "window"
    policy: str = "tca"           # or an evaluation baseline, see `algorithm.apply_policy`
    observe: int = 0              # question-aware end of prompt: its last `observe` queries re-select (0 = off)
    observe_prefill: str = "sparse"   # "dense": an observing prompt's queries see the whole prompt (SnapKV-style)

    @property
    def n_obs(self) -> int:
        """Observation queries per block: its own last query, or the last queries of the w/b blocks from it on."""
        return 1 if self.scoring == "block_last" else self.window // self.block


def dense_start(n, block: int, window: int):
    """First position of the dense window at sequence length n (an int or a torch tensor). Positions
    [block, dense_start) are compressed blocks; [0, block) is the sink."""
    if hasattr(n, "clamp"):
        return block * ((n - window) // block).clamp(min=1)
    return block * max(1, (n - window) // block)
