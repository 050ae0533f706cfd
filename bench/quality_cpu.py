"""First quality signal on CPU: dense vs reference TCA on the embedded SmolLM2-135M-Instruct.

    .venv/bin/python bench/quality_cpu.py --budgets A.json [B.json ...] [--lengths 2048 4096] [--out FILE.md]

For each policy (dense, then one TCA per budgets file): passkey retrieval at each length and three depths
(greedy, 8 new tokens), and fidelity to dense on held-out essay text (next-token KL(dense || policy) and top-1
agreement over the positions past w + 2b, where pruning can act), with the KV kept fraction at that length.
Prints a markdown table and writes it to --out.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sglang_tca.budgets import Budgets  # noqa: E402
from sglang_tca.hf_attention import TCA, Dense, attention_policy, logit_fidelity  # noqa: E402

DEPTHS = (0.2, 0.5, 0.8)


def mean_kept(policy, n):
    if not isinstance(policy, TCA):
        return 1.0
    return policy.kept_fraction(n)


def passkey(model, tok, policy, length, depth, key):
    from sglang_tca.essays import passkey_prompt

    ids = tok(passkey_prompt(tok, length, depth, key, seed=int(depth * 10)), return_tensors="pt",
              add_special_tokens=False).input_ids
    with attention_policy(policy):
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return str(key) in text, mean_kept(policy, ids.shape[1]), text.strip()


def logits(model, ids, policy):
    with attention_policy(policy):
        return model(input_ids=ids, use_cache=False).logits[0].float()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", nargs="+", required=True)
    ap.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096])
    ap.add_argument("--out", default="bench/results/quality_cpu.md")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sglang_tca.embedded_model import embedded_model_dir
    from sglang_tca.essays import essay_split

    path = embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="tca").eval()
    policies = [("dense", Dense())] + [(f"TCA {Path(b).stem}", TCA(Budgets.load(b))) for b in args.budgets]
    heldout = tok(essay_split("heldout"), return_tensors="pt", add_special_tokens=False).input_ids
    rows = []
    torch.set_grad_enabled(False)
    for L in args.lengths:
        ids = heldout[:, :L]
        ref = None
        for name, pol in policies:
            t0 = time.time()
            lg = logits(model, ids, pol)
            kept = mean_kept(pol, L)
            ref = lg if ref is None else ref
            start = (pol.params.window + 2 * pol.params.block) if pol.params else 0
            kl, agree = logit_fidelity(ref[start:], lg[start:])
            hits = []
            for i, depth in enumerate(DEPTHS):
                ok, _, text = passkey(model, tok, pol, L, depth, 10000 + 7919 * (i + 1) % 90000)
                hits.append(ok)
                print(f"  {name} L={L} depth={depth}: {'ok ' if ok else 'MISS'} {text!r}", file=sys.stderr)
            rows.append((name, L, kept, kl, agree, sum(hits), len(hits), time.time() - t0))
            print(f"{name:28s} L={L} kept={kept:.3f} KL={kl:.4f} agree={agree:.3f} passkey={sum(hits)}/{len(hits)}",
                  file=sys.stderr)

    import transformers
    head = (f"# CPU quality signal: dense vs reference TCA on SmolLM2-135M-Instruct\n\n"
            f"- date: {datetime.date.today()}; device: CPU ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads), fp32; torch {torch.__version__}, transformers {transformers.__version__}\n"
            f"- command: `.venv/bin/python bench/quality_cpu.py --budgets {' '.join(args.budgets)} "
            f"--lengths {' '.join(map(str, args.lengths))}`\n"
            f"- fidelity: held-out essay text (never the calibration split), positions >= w + 2b; "
            f"passkey: depths {DEPTHS}, greedy 8 tokens\n"
            f"- kept = share of dense KV entries the policy keeps at that length (sink + window + kept tokens), "
            f"mean over layers and KV heads\n\n"
            "| policy | tokens | KV kept | KL(dense‖policy) | top-1 agreement | passkey | seconds |\n"
            "|---|---|---|---|---|---|---|\n")
    table = head + "".join(f"| {n} | {L} | {k:.3f} | {kl:.4f} | {a:.3f} | {h}/{m} | {s:.0f} |\n"
                           for n, L, k, kl, a, h, m, s in rows)
    Path(args.out).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
