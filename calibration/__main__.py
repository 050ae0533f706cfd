"""python -m calibration [--model PATH] --out FILE [--eps E] [--device cpu|cuda] [...]

One dense forward pass over calibration text (the calibration split of the Paul Graham essays, never used for
evaluation) gives each (layer, KV head) its keep distribution; the budgets file is what the server loads.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SUPPORTED_ARCHS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m calibration", description=__doc__.split("\n\n")[1])
    ap.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--out", required=True, help="budgets file to write (JSON)")
    ap.add_argument("--eps", type=float, default=0.05, help="max mean dropped attention mass per head (default 0.05)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--block", type=int, default=64, help="block size b, a power of two (default 64)")
    ap.add_argument("--window", type=int, default=1024, help="dense local window w, a multiple of b (default 1024)")
    ap.add_argument("--scoring", choices=("block_last", "window"), default="block_last")
    ap.add_argument("--tokens", type=int, default=8192, help="calibration tokens (capped at the model's context)")
    ap.add_argument("--rows", type=int, default=512, help="sampled query rows per layer for the error (default 512)")
    return ap.parse_args(argv)


def run(args) -> Path:
    from sglang_tca.budgets import keep_counts_for
    from sglang_tca.config import check_model_path, check_model_supported, model_shape, read_model_config

    if not 0 < args.eps < 1:
        raise ValueError(f"--eps must be in (0, 1), got {args.eps}")
    keep_counts_for(args.block)
    if args.window < args.block or args.window % args.block:
        raise ValueError(f"--window ({args.window}) must be a positive multiple of --block ({args.block})")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise ValueError(f"output folder does not exist: {out.parent}")
    if args.model is None:
        from sglang_tca.embedded_model import embedded_model_dir
        args.model = str(embedded_model_dir())
    check_model_path(args.model)
    if not Path(args.model).is_dir():
        raise ValueError(f"--model must be a local Hugging Face model folder, got {args.model}")
    cfg = read_model_config(args.model)
    check_model_supported(cfg, args.model)
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"calibration supports {sorted(SUPPORTED_ARCHS)}; {args.model} is {arch}")
    shape = model_shape(cfg, args.model)

    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sglang_tca.hf_attention  # noqa: F401  (registers the "tca" attention)
    from calibration.calibrate import calibrate
    from sglang_tca.essays import essay_split

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is available")
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="tca").to(args.device)
    model.eval()
    n = min(args.tokens, cfg.get("max_position_embeddings") or args.tokens)
    ids = tok(essay_split("calibration"), return_tensors="pt", add_special_tokens=False).input_ids[:, :n]
    print(f"[calibration] {arch}, {shape.num_layers} layers x {shape.num_kv_heads} KV heads; {ids.shape[1]} tokens, "
          f"eps={args.eps}, b={args.block}, w={args.window}, scoring={args.scoring}", file=sys.stderr)
    bar = tqdm(total=shape.num_layers, desc="calibrating layers", file=sys.stderr)
    budgets = calibrate(model, ids, eps=args.eps, block=args.block, window=args.window, scoring=args.scoring,
                        n_rows=args.rows, progress=lambda _: bar.update(),
                        provenance={"model": os.path.basename(os.path.normpath(args.model)),
                                    "text": "Paul Graham essays, calibration split"})
    bar.close()
    budgets.save(out)
    rho = budgets.rho
    print(f"[calibration] wrote {out}: mean kept share of compressed blocks {float(rho.mean()):.3f} "
          f"(min {float(rho.min()):.3f}, max {float(rho.max()):.3f})", file=sys.stderr)
    return out


def main(argv=None) -> int:
    args = parse(argv)
    try:
        run(args)
    except (ValueError, OSError) as e:   # BudgetsError and TCAConfigError are ValueErrors
        if os.environ.get("SGLANG_TCA_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
