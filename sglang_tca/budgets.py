"""TCA budgets file: what calibration writes and the server loads.

One JSON file per model. Everything per head is indexed [layer][global KV head], so a tensor-parallel rank
takes its slice with `Budgets.for_rank`. Format (version 1):

    {
      "format": "sglang-tca-budgets", "version": 1,
      "model": {"architecture": str, "num_layers": int, "num_q_heads": int, "num_kv_heads": int, "head_dim": int},
      "block": b, "window": w, "sink": b, "eps": float, "scoring": "block_last"|"window", "metric": "neff",
      "keep_counts": [1, 2, 4, ..., b],
      "p":          [L][H][len(keep_counts)]   share of blocks that keep k tokens (rows sum to 1),
      "thresholds": [L][H][len(keep_counts)-1] ascending redundancy-metric boundaries: a block whose metric is
                                               below thresholds[m] (and not below thresholds[m-1]) keeps keep_counts[m],
      "rho":        [L][H]                     expected kept share of a compressed block, sum_k p_k * k / b,
      "calibration": {...}                     free-form provenance (text, tokens, date, error per head)
    }
Every integer (block, window, sink, the model's sizes) must be a JSON integer: 64.7 or 64.0 is refused, not truncated.

The server implements a subset of what the format can describe (`SERVER_SCORINGS`, `SERVER_MAX_BLOCK`,
`server_limits`): the launcher refuses other budgets at start, calibration before it loads the model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sglang_tca.params import dense_start

FORMAT = "sglang-tca-budgets"
VERSION = 1
SCORINGS = ("block_last", "window")
METRICS = ("neff",)
# What sglang_tca/serving implements (its backend re-checks both when it starts): block-last scoring, and a block's
# keep mask stored as one int64 at the block's last KV slot. "window" scoring and larger blocks are reference-only.
SERVER_SCORINGS = ("block_last",)
SERVER_MAX_BLOCK = 64


class BudgetsError(ValueError):
    """A budgets file is missing, corrupt, or made for another model. The message says which and what to do."""


def server_limits(block: int, scoring: str) -> list[str]:
    """Why the server cannot serve budgets of this block size and scoring ([] when it can)."""
    problems = []
    if scoring not in SERVER_SCORINGS:
        problems.append(f"scoring {scoring!r} (the server implements {', '.join(map(repr, SERVER_SCORINGS))})")
    if block > SERVER_MAX_BLOCK:
        problems.append(f"block {block} (the server stores a block's keep mask in 64 bits: "
                        f"block <= {SERVER_MAX_BLOCK})")
    return problems


def keep_counts_for(block: int) -> list[int]:
    if block < 1 or block & (block - 1):
        raise BudgetsError(f"block size must be a power of two, got {block}")
    return [1 << i for i in range(int(math.log2(block)) + 1)]


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_hf_config(cls, cfg) -> "ModelShape":
        """From a transformers PretrainedConfig or a config.json dict."""
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        archs = get("architectures") or ["unknown"]
        n_q = get("num_attention_heads")
        head_dim = get("head_dim") or get("hidden_size") // n_q
        return cls(archs[0], get("num_hidden_layers"), n_q, get("num_key_value_heads") or n_q, head_dim)


@dataclass
class Budgets:
    model: ModelShape
    block: int
    window: int
    eps: float
    scoring: str
    metric: str
    p: torch.Tensor            # [L, H, Kn] float32
    thresholds: torch.Tensor   # [L, H, Kn-1] float32, ascending along the last dim
    calibration: dict = field(default_factory=dict)
    source: str | None = field(default=None, compare=False)   # the file it was loaded from (named in every error)
    sha256: str | None = field(default=None, compare=False)   # of that file's bytes

    @property
    def sink(self) -> int:
        return self.block

    @property
    def _name(self) -> str:
        return "budgets" if self.source is None else f"budgets file {self.source}"

    @property
    def keep_counts(self) -> torch.Tensor:
        return torch.tensor(keep_counts_for(self.block))

    @property
    def rho(self) -> torch.Tensor:  # [L, H]
        return (self.p * self.keep_counts.float()).sum(-1) / self.block

    @classmethod
    def uniform(cls, model: ModelShape, p: list[float] | torch.Tensor, *, block=64, window=1024,
                scoring="block_last", metric="neff", eps=float("nan"), thresholds=None) -> "Budgets":
        """The same keep distribution for every head. `p=[0,...,0,1]` is keep-all (equals dense attention).
        Without thresholds, blocks are assigned k by the metric's fixed quantile-free rule: all blocks keep the
        largest k with non-zero p (used for keep-all and for tests)."""
        kn = len(keep_counts_for(block))
        p = torch.as_tensor(p, dtype=torch.float32)
        if p.shape != (kn,):
            raise BudgetsError(f"p must have {kn} entries for block {block}, got {tuple(p.shape)}")
        P = p.expand(model.num_layers, model.num_kv_heads, kn).clone()
        if thresholds is None:  # every block gets the largest k with p > 0
            thresholds = torch.full((kn - 1,), -math.inf)
            top = int(torch.nonzero(p > 0).max())
            thresholds[top:] = math.inf
        T = torch.as_tensor(thresholds, dtype=torch.float32).expand(model.num_layers, model.num_kv_heads, kn - 1).clone()
        return cls(model, block, window, eps, scoring, metric, P, T)

    def expected_kept(self, n: int, window: int | None = None, rho: float | None = None) -> float:
        """Share of the KV kept at length n if every compressed block keeps the mean rho of all heads (sink and
        dense window kept whole): what these budgets cost, before any text is seen. `window` / `rho` replace the
        budgets' own (a served --tca-window; rho 0: StreamingLLM with that window)."""
        comp = dense_start(n, self.block, self.window if window is None else window) - self.block
        rho = self.rho.mean() if rho is None else rho
        return float((n - comp + rho * comp) / n)

    def validate(self) -> None:
        m = self.model
        try:
            kn = len(keep_counts_for(self.block))
        except BudgetsError as e:
            raise BudgetsError(f"{self._name}: {e}") from None
        if self.scoring not in SCORINGS:
            raise BudgetsError(f"{self._name}: unknown scoring {self.scoring!r}; expected one of {SCORINGS}")
        if self.metric not in METRICS:
            raise BudgetsError(f"{self._name}: unknown metric {self.metric!r}; expected one of {METRICS}")
        if self.window < self.block or self.window % self.block:
            raise BudgetsError(f"{self._name}: window ({self.window}) must be a positive multiple of block "
                               f"({self.block})")
        want = (m.num_layers, m.num_kv_heads)
        if tuple(self.p.shape) != (*want, kn):
            raise BudgetsError(f"{self._name}: p has shape {tuple(self.p.shape)}, expected {(*want, kn)}")
        if tuple(self.thresholds.shape) != (*want, kn - 1):
            raise BudgetsError(f"{self._name}: thresholds has shape {tuple(self.thresholds.shape)}, "
                               f"expected {(*want, kn - 1)}")
        if not torch.isfinite(self.p).all() or (self.p < 0).any() or not torch.allclose(self.p.sum(-1), torch.ones(want), atol=1e-4):
            raise BudgetsError(f"{self._name}: p must be finite, non-negative, and each head's row must sum to 1")
        if (self.thresholds.diff(dim=-1) < 0).any() or self.thresholds.isnan().any():
            raise BudgetsError(f"{self._name}: thresholds must be ascending along the keep-count axis (and not NaN)")

    def check_servable(self) -> None:
        """Refuse budgets the server cannot serve (`server_limits`): at launch, not after the weights are loaded."""
        problems = server_limits(self.block, self.scoring)
        if problems:
            raise BudgetsError(f"{self._name} cannot be served: it uses {' and '.join(problems)}; recalibrate with "
                               f"--scoring block_last --block {min(self.block, SERVER_MAX_BLOCK)}")

    def check_model(self, shape: ModelShape, source: str = "the model") -> None:
        """Refuse budgets calibrated for a model of another shape."""
        mine = self.model
        for name in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim"):
            if getattr(mine, name) != getattr(shape, name):
                raise BudgetsError(
                    f"{self._name} was made for a model with {name}={getattr(mine, name)} "
                    f"({mine.architecture}), but {source} has {name}={getattr(shape, name)}; "
                    f"calibrate this model: python -m calibration --model PATH --out FILE")

    def rank_kv_heads(self, tp_rank: int, tp_size: int) -> range:
        """Global KV heads a tensor-parallel rank owns (one replicated head when tp_size > num_kv_heads)."""
        h = self.model.num_kv_heads
        if tp_size <= h:
            if h % tp_size:
                raise BudgetsError(f"{self._name}: {h} KV heads cannot be split over tp_size={tp_size}")
            per = h // tp_size
            return range(tp_rank * per, (tp_rank + 1) * per)
        if tp_size % h:
            raise BudgetsError(f"{self._name}: tp_size={tp_size} is not a multiple of {h} KV heads")
        g = tp_rank // (tp_size // h)
        return range(g, g + 1)

    def for_rank(self, tp_rank: int, tp_size: int) -> "Budgets":
        """The budgets of the KV heads a tensor-parallel rank owns (`rank_kv_heads`)."""
        r = self.rank_kv_heads(tp_rank, tp_size)
        sl = slice(r.start, r.stop)
        return dataclasses.replace(self, p=self.p[:, sl].clone(), thresholds=self.thresholds[:, sl].clone())

    # ---- file I/O -------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        inf_safe = lambda t: [[[x if math.isfinite(x) else (1e30 if x > 0 else -1e30) for x in h] for h in l]
                              for l in t.tolist()]
        return {
            "format": FORMAT, "version": VERSION, "model": vars(self.model),
            "block": self.block, "window": self.window, "sink": self.sink, "eps": self.eps,
            "scoring": self.scoring, "metric": self.metric, "keep_counts": keep_counts_for(self.block),
            "p": self.p.tolist(), "thresholds": inf_safe(self.thresholds), "rho": self.rho.tolist(),
            "calibration": self.calibration,
        }

    def save(self, path: str | Path) -> None:
        self.validate()
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path, *, sha256: str | None = None) -> "Budgets":
        """Read and validate a budgets file. With `sha256`, refuse a file whose bytes hash differently (every
        serving process must load the file the launcher checked, not whatever is at the path now)."""
        path = Path(path)
        if not path.is_file():
            raise BudgetsError(f"budgets file not found: {path}")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise BudgetsError(f"cannot read the budgets file {path}: {e}") from None
        digest = hashlib.sha256(data).hexdigest()
        if sha256 is not None and digest != sha256:
            raise BudgetsError(f"budgets file {path} changed after the launcher checked it (sha256 {digest[:16]}..., "
                               f"expected {sha256[:16]}...); every process must serve the same budgets: "
                               f"restart the launch")
        try:
            d = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BudgetsError(f"budgets file {path} is not valid JSON: {e}") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise BudgetsError(f"{path} is not an sglang-tca budgets file (missing \"format\": \"{FORMAT}\")")
        if d.get("version") != VERSION:
            raise BudgetsError(f"{path} has budgets format version {d.get('version')}, this build reads {VERSION}")
        try:
            model = d["model"]
            if not isinstance(model, dict):
                raise TypeError(f"\"model\" must be an object, got {model!r}")
            for key in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim"):
                _integer(model.get(key), f"model.{key}")
            block, window = _integer(d["block"], "block"), _integer(d["window"], "window")
            if "sink" in d and _integer(d["sink"], "sink") != block:
                raise ValueError(f"sink ({d['sink']}) must equal block ({block})")
            eps = d["eps"]
            if isinstance(eps, bool) or not isinstance(eps, (int, float)):
                raise TypeError(f"eps must be a number, got {eps!r}")
            b = cls(ModelShape(**model), block, window, float(eps), d["scoring"], d["metric"],
                    torch.tensor(d["p"], dtype=torch.float32), torch.tensor(d["thresholds"], dtype=torch.float32),
                    d.get("calibration", {}), source=str(path), sha256=digest)
        except (KeyError, TypeError, ValueError) as e:
            raise BudgetsError(f"budgets file {path} is corrupt: {type(e).__name__}: {e}") from None
        b.validate()
        return b


def _integer(v, what: str) -> int:
    """A JSON integer (not a float such as 64.7 or 64.0, which int() would silently truncate, nor a bool)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{what} must be an integer, got {v!r}")
    return v
