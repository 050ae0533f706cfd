"""python -m calibration [--model PATH] --out FILE [--eps E] [--device cpu|cuda] [...]

One dense forward pass over calibration text (the calibration split of the Paul Graham essays, never used for
evaluation) gives each (layer, KV head) its keep distribution; the budgets file is what the server loads.

Everything that can be checked is checked before the model loads (the arguments, the output path, the essays
file, the model's config, the token count): bad input ends with one `error: ...` line and exit code 2
(SGLANG_TCA_DEBUG=1 shows the traceback). Budgets the server cannot serve (`sglang_tca.budgets.server_limits`:
scoring "window", block > 64) are refused unless --allow-unservable is given, which warns.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from sglang_tca.cli import QuietParser

SUPPORTED_ARCHS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
EXIT_BAD_INPUT = 2


def parse(argv):
    ap = QuietParser(prog="python -m calibration", description=__doc__.split("\n\n")[1])
    ap.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--out", required=True, help="budgets file to write (JSON)")
    ap.add_argument("--eps", type=float, default=0.05, help="max mean dropped attention mass per head, in (0, 1) "
                                                            "(default 0.05)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--block", type=int, default=64, help="block size b, a power of two (default 64; the server "
                                                          "serves b <= 64)")
    ap.add_argument("--window", type=int, default=1024, help="dense local window w, a multiple of b (default 1024)")
    ap.add_argument("--scoring", choices=("block_last", "window"), default="block_last",
                    help="block scoring (default block_last; the server serves only block_last)")
    ap.add_argument("--tokens", type=int, default=8192,
                    help="calibration tokens, at least 1 (capped at the model's context; default 8192)")
    ap.add_argument("--rows", type=int, default=512,
                    help="sampled query rows per layer for the error, at least 1 (default 512)")
    ap.add_argument("--allow-unservable", action="store_true",
                    help="write budgets the server cannot serve (scoring window, block > 64), for the reference "
                         "implementation and ablations; warns")
    return ap.parse_args(argv)


def check_args(args) -> Path:
    """The checks that need neither the model nor the data. Returns the output path."""
    from sglang_tca.budgets import BudgetsError, keep_counts_for, server_limits

    if not 0 < args.eps < 1:
        raise ValueError(f"--eps must be in (0, 1), got {args.eps}")
    try:
        keep_counts_for(args.block)
    except BudgetsError:
        raise ValueError(f"--block must be a positive power of two, got {args.block}") from None
    if args.window < args.block or args.window % args.block:
        raise ValueError(f"--window ({args.window}) must be a positive multiple of --block ({args.block})")
    if args.tokens < 1:
        raise ValueError(f"--tokens must be at least 1, got {args.tokens}")
    if args.rows < 1:
        raise ValueError(f"--rows must be at least 1, got {args.rows}")
    problems = server_limits(args.block, args.scoring)
    if problems and not args.allow_unservable:
        raise ValueError(f"the server cannot serve budgets with {' and '.join(problems)}; pass --allow-unservable "
                         f"to write them anyway (reference implementation and ablations only)")
    if problems:
        print(f"warning: the server cannot serve these budgets ({' and '.join(problems)}); writing them because of "
              f"--allow-unservable", file=sys.stderr)
    return check_out(Path(args.out).expanduser())


def check_out(out: Path) -> Path:
    """--out must name a file (new or writable) in an existing, writable folder."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name the budgets file to write")
    if not out.parent.is_dir():
        raise ValueError(f"output folder does not exist: {out.parent}")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ValueError(f"output folder is not writable: {out.parent}")
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"--out {out} exists and is not writable")
    return out


def calibration_text() -> str:
    """The calibration split, with a clear error naming the essays file when it is missing or malformed."""
    from sglang_tca.essays import essay_split, essays_path

    path = essays_path()   # FileNotFoundError (an OSError) says how to install the data
    try:
        return essay_split("calibration")
    except OSError as e:
        raise ValueError(f"cannot read the essays file {path}: {e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the essays file {path} is not valid JSON: {e}") from None
    except (KeyError, TypeError, AssertionError):   # no "text", not an object, text not a string / too short
        raise ValueError(f"the essays file {path} must be a JSON object whose \"text\" is the essays as one long "
                         f"string (see sglang_tca/essays.py)") from None


def run(args) -> Path:
    from sglang_tca.config import check_model_path, check_model_supported, model_shape, read_model_config

    out = check_args(args)
    text = calibration_text()
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
    context = cfg.get("max_position_embeddings")
    n = min(args.tokens, context) if isinstance(context, int) and context > 0 else args.tokens

    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sglang_tca.hf_attention  # noqa: F401  (registers the "tca" attention)
    from calibration.calibrate import calibrate, sample_rows
    from sglang_tca.params import TCAParams

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is available")
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :n]
    try:
        sample_rows(ids.shape[1], TCAParams(args.block, args.window, args.scoring), args.rows)
    except ValueError as e:   # fewer tokens than window + 2 blocks: nothing would be compressed
        raise ValueError(f"{e} (--tokens {args.tokens}, the model's context {context})") from None
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="tca").to(args.device)
    model.eval()
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
    try:
        run(parse(argv))
    except (ValueError, OSError) as e:   # CLIError, BudgetsError and TCAConfigError are ValueErrors
        if os.environ.get("SGLANG_TCA_DEBUG"):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
