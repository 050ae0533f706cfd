"""Budgets for the evaluation sweep, from ONE calibration pass over the calibration split (CPU, a few minutes).

    .venv/bin/python bench/eval_budgets.py [--eps 0.02 0.05 0.1 0.2 0.3] [--window 1024] [--out bench/results/eval_budgets]

Writes, per eps, `tca_w{window}_eps{eps}.json` (per-head calibrated budgets, as `python -m calibration --eps` would)
and `uniform_w{window}_eps{eps}.json` (every head the same keep distribution, of about the same mean kept share:
the ablation of per-head calibration). bench/eval_suite.py serves them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eps", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.3])
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval_budgets")
    args = ap.parse_args(argv)
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sglang_tca.hf_attention  # noqa: F401  (registers the "tca" attention)
    from calibration.calibrate import measure
    from sglang_tca.embedded_model import embedded_model_dir
    from sglang_tca.essays import essay_split

    model_dir = embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="tca").eval()
    ids = tok(essay_split("calibration"), return_tensors="pt", add_special_tokens=False).input_ids[:, :args.tokens]
    bar = tqdm(total=model.config.num_hidden_layers, desc=f"calibration pass, w={args.window}", file=sys.stderr)
    cal = measure(model, ids, block=64, window=args.window, scoring="block_last", n_rows=args.rows,
                  progress=lambda _: bar.update(),
                  provenance={"model": "SmolLM2-135M-Instruct (embedded)", "text": "Paul Graham essays, calibration split"})
    bar.close()
    args.out.mkdir(parents=True, exist_ok=True)
    for eps in args.eps:
        tca = cal.budgets(eps)
        uni = cal.uniform(tca)
        tca.save(args.out / f"tca_w{args.window}_eps{eps}.json")
        uni.save(args.out / f"uniform_w{args.window}_eps{eps}.json")
        print(f"eps {eps}: mean rho tca {float(tca.rho.mean()):.3f} (min {float(tca.rho.min()):.3f}, "
              f"max {float(tca.rho.max()):.3f}), uniform {float(uni.rho.mean()):.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
