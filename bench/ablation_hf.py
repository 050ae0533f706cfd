"""Where TCA's retrieval loss at 8K comes from: variants of the reference TCA (sglang_tca.hf_attention) on the GPU,
each at the budgets' own per-block counts, scored against dense on RULER prompts.

    (GPU) source .gpu/env.sh && SKIP_GPU_TESTS=1 bash bench/gpu_smollm2.sh bench/ablation_hf.py [--n 12]
          (carry .gpu, .data, .eval; the prompts are bench/eval_suite.py's)
    (CPU) .venv/bin/python bench/ablation_hf.py --report RUN.jsonl [RUN2.jsonl ...] [--out DIR]   (DIR/ablation.md)

Per RULER sample (--first .. --first + n - 1 of each task at --length): dense greedy output (up to --max-new tokens, the same
masked fp32 attention path as every variant), then every variant teacher-forced on that output in two forward passes
(prompt, then the output: the pruned decode's view). Greedy decoding under the variant follows dense's output up to
its first disagreeing token; the RULER score of that agreed part is a lower bound of the variant's own score.
Reported (`report`): the share of dense-correct samples whose answers the variant reproduces (retained), that lower
bound, token agreement, and the KV kept. It is a diagnosis tool, cheaper than a server run per idea; the numbers the
issue asks for come from bench/eval_suite.py through SGLang.

Variants (all share the sparse prefill of TCA unless said):
  obs N          the prompt's last N queries re-choose the compressed tokens (--tca-observe N)
  pool P         observation scores max-pooled over P positions (default 7)
  joint          observed tokens chosen jointly over a layer's KV heads (same total) instead of per head
  global         the decode's observed tokens chosen by one top-k over every layer and KV head (same total)
  dense_tail M   the prompt's last M queries attend to everything in prefill (the question dense)
  dense_prefill  the whole prompt dense; only the decode reads the pruned cache (SnapKV-style bound)
  oracle         the observed tokens chosen by the attention of dense's own answer (the queries that produce its
                 output, from a dense pass over prompt + output) instead of the prompt's last N queries: the best
                 choice any attention-score selection could make at these counts (with dense_prefill and global:
                 at this total, spread freely over layers and heads)
  lookahead K    oracle from the answer's first K queries only (K - 1 tokens decoded with the whole cache first)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_suite import BUDGETS_DIR, load_items  # noqa: E402
from sglang_tca.algorithm import OBSERVE_POOL, keep_from_counts, observe_scores, prompt_mask, select  # noqa: E402
from sglang_tca.params import dense_start  # noqa: E402
from sglang_tca.budgets import Budgets  # noqa: E402
from sglang_tca.hf_attention import TCA, Dense, attention_policy  # noqa: E402

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt")


@dataclass
class Variant(TCA):
    pool: int = OBSERVE_POOL
    joint: bool = False
    dense_tail: int = 0
    dense_prefill: bool = False
    global_: bool = False
    oracle: bool = False
    lookahead: int = 0                                            # oracle from the answer's first N queries only

    def __post_init__(self):
        super().__post_init__()
        self.scores = {}                                          # layer -> observation scores (global_)
        self.answer_scores = {}                                   # layer -> the answer's scores (oracle; per sample)

    def mask(self, layer, q, k, pos, scale):
        if int(pos[0]) != 0:                                      # decode: as TCA (keeps self.observed)
            if self.global_ and self.scores:
                self._global_observed()
            return super().mask(layer, q, k, pos, scale)
        keep, self.counts[layer] = select(q, k, self.budgets.thresholds[layer], self.params, layer)
        mask, self.observed[layer] = prompt_mask(q, k, keep, self.params, scale, pool=self.pool,
                                                 choose=lambda a, counts: self._choose(layer, a, counts))
        L = k.shape[1]
        rows = torch.arange(L, device=k.device)
        causal = rows[None, :] <= rows[:, None]
        if self.dense_prefill:
            mask[:] = causal
        elif self.dense_tail:
            mask[:, L - self.dense_tail:] = causal[L - self.dense_tail:]
        return mask

    def _choose(self, layer, a, counts):
        """The observed tokens from the scores a [Hkv, ds - b]: per head (counts [Hkv]) or, joint, one top-k over
        the layer's heads with the same total; global_ also keeps the scores for the decode's re-choice; oracle
        ranks by the answer's scores instead."""
        if self.oracle:
            a = self.answer_scores[layer]
        if self.global_:
            self.scores[layer] = a
        if self.joint:
            return keep_from_counts(a.flatten()[None], counts.sum()[None])[0].view_as(a)
        return keep_from_counts(a, counts)

    def _global_observed(self):
        """Decode after the prompt: the observed tokens re-chosen by one top-k over every layer and KV head (the
        same total), from the scores the prompt's layers kept."""
        layers = sorted(self.scores)
        flat = torch.cat([self.scores[i].flatten() for i in layers])
        total = sum(self.observed[i].sum() for i in layers)
        keep = keep_from_counts(flat[None], total[None])[0]
        for i, part in zip(layers, keep.split([self.scores[i].numel() for i in layers])):
            self.observed[i] = part.view_as(self.scores[i])
        self.scores.clear()


def variants() -> list[tuple[str, object]]:
    def b(eps):
        return Budgets.load(BUDGETS_DIR / f"tca_w1024_eps{eps}.json")

    e1, e07, e05, e02 = b(0.1), b(0.07), b(0.05), b(0.02)
    w512 = Budgets.load(BUDGETS_DIR / "tca_w512_eps0.1.json")
    return [
        ("dense", Dense()),
        ("tca eps0.1", Variant(e1)),
        ("tca eps0.1 obs32", Variant(e1, observe=32)),
        ("tca eps0.1 dense_prefill", Variant(e1, dense_prefill=True)),
        ("tca eps0.1 obs32 dense_prefill", Variant(e1, observe=32, dense_prefill=True)),
        ("tca eps0.1 obs32 dense_tail32", Variant(e1, observe=32, dense_tail=32)),
        ("tca eps0.1 obs32 joint", Variant(e1, observe=32, joint=True)),
        ("tca eps0.1 obs128", Variant(e1, observe=128)),
        ("tca eps0.1 obs32 pool1", Variant(e1, observe=32, pool=1)),
        ("tca eps0.1 obs32 pool15", Variant(e1, observe=32, pool=15)),
        ("tca eps0.05 obs32", Variant(e05, observe=32)),
        ("tca eps0.07 obs32 joint dense_tail32", Variant(e07, observe=32, joint=True, dense_tail=32)),
        ("tca eps0.1 obs128 joint dense_tail128", Variant(e1, observe=128, joint=True, dense_tail=128)),
        ("tca eps0.1 obs16", Variant(e1, observe=16)),
        ("tca eps0.1 obs8", Variant(e1, observe=8)),
        ("tca eps0.1 obs32 global", Variant(e1, observe=32, global_=True)),
        ("tca eps0.07 obs32", Variant(e07, observe=32)),
        ("tca eps0.07 obs32 global", Variant(e07, observe=32, global_=True)),
        ("tca w512 eps0.1 obs32", Variant(w512, observe=32)),
        ("tca eps0.07 obs32 dense_prefill", Variant(e07, observe=32, dense_prefill=True)),
        ("tca eps0.07 oracle", Variant(e07, observe=32, oracle=True)),
        ("tca eps0.07 oracle dense_prefill", Variant(e07, observe=32, oracle=True, dense_prefill=True)),
        ("tca eps0.07 oracle global dense_prefill",
         Variant(e07, observe=32, oracle=True, global_=True, dense_prefill=True)),
        ("tca eps0.1 oracle dense_prefill", Variant(e1, observe=32, oracle=True, dense_prefill=True)),
        ("tca eps0.05 oracle dense_prefill", Variant(e05, observe=32, oracle=True, dense_prefill=True)),
        ("tca eps0.02 obs32 dense_prefill", Variant(e02, observe=32, dense_prefill=True)),
        ("tca eps0.02 oracle dense_prefill", Variant(e02, observe=32, oracle=True, dense_prefill=True)),
        ("tca eps0.07 oracle obs128", Variant(e07, observe=128, oracle=True)),
        ("tca eps0.07 oracle dense_tail128", Variant(e07, observe=32, oracle=True, dense_tail=128)),
        ("tca eps0.07 oracle dense_tail1024", Variant(e07, observe=32, oracle=True, dense_tail=1024)),
        ("tca eps0.07 obs32 dense_tail128", Variant(e07, observe=32, dense_tail=128)),
        ("tca eps0.07 lookahead4 dense_prefill", Variant(e07, observe=32, oracle=True, lookahead=4, dense_prefill=True)),
        ("tca eps0.07 lookahead4", Variant(e07, observe=32, oracle=True, lookahead=4)),
        ("tca eps0.07 lookahead1 dense_prefill", Variant(e07, observe=32, oracle=True, lookahead=1, dense_prefill=True)),
    ]


@torch.no_grad()
def answer_scores(model, prompt, target, params, first: int = 0) -> dict:
    """layer -> [Hkv, ds - b] scores over the prompt's compressed positions (ds = dense_start of the prompt): the
    attention of the queries that produce `target` (the prompt's last one and target[:-1]; with `first` > 0 only
    the first `first` of them) in a dense pass, as `observe_scores` computes it for the prompt's last queries."""
    n = prompt.shape[1]
    ds = int(dense_start(n, params.block, params.window))
    end = n - 1 + (len(target) if first <= 0 else min(first, len(target)))    # past the last query used
    out = {}

    def grab(layer, q, k):
        a = observe_scores(q[:, n - 1:end], k[:, :end], params, q.shape[-1] ** -0.5)   # over [b, dense_start(end))
        out[layer] = a[:, : ds - params.block]

    with attention_policy(Dense(), on_layer=grab):
        model(input_ids=torch.cat([prompt, target[None, :-1]], 1), use_cache=False)
    return out


@torch.no_grad()
def teacher_forced(model, prompt, target, policy):
    """Argmax of the policy at every target position (prompt forward, then the target as one cached chunk)."""
    with attention_policy(policy):
        out = model(input_ids=prompt, use_cache=True)
        nxt = out.logits[0, -1:].argmax(-1)
        if target.shape[0] > 1:
            out2 = model(input_ids=target[None, :-1], past_key_values=out.past_key_values, use_cache=True)
            nxt = torch.cat([nxt, out2.logits[0].argmax(-1)])
    return nxt


def run(args) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench import ruler

    tok = AutoTokenizer.from_pretrained(args.model)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="tca").to(dev).eval()
    items = [it for it in load_items(args.prompts) if it["kind"] == "ruler" and it["length"] == args.length
             and it["task"] in args.tasks and args.first <= it["index"] < args.first + args.n]
    out = Path(args.out) / "ablation.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    pols = [(n, v) for n, v in variants() if args.only is None or n in args.only]
    if args.only and len(pols) != len(set(args.only)):
        raise SystemExit(f"error: unknown variant in --only; known: {[n for n, _ in variants()]}")
    t0 = time.time()
    with out.open("w") as f:
        for i, it in enumerate(items):
            if time.time() - t0 > args.deadline:
                print(f"[ablation] past --deadline after {i} samples", flush=True)
                break
            ids = torch.tensor([tok(it["text"]).input_ids], device=dev)
            with attention_policy(Dense()), torch.no_grad():
                gen = model.generate(ids, max_new_tokens=min(it["max_new_tokens"], args.max_new), do_sample=False)
            target = gen[0, ids.shape[1]:]
            eos = (target == tok.eos_token_id).nonzero()
            target = target[: int(eos[0]) if len(eos) else len(target)]
            if len(target) == 0:
                continue
            text = tok.decode(target, skip_special_tokens=True)
            row = {"task": it["task"], "index": it["index"], "n_tokens": ids.shape[1], "dense_output": text,
                   "dense_score": ruler.score(text, it), "kept": {}, "agree": {}, "prefix_score": {}}
            scores = {}                                # (block, window, lookahead) -> the answer's scores
            for _, v in pols:
                if getattr(v, "oracle", False):
                    key = (v.params.block, v.params.window, v.lookahead)
                    if key not in scores:
                        scores[key] = answer_scores(model, ids, target, v.params, v.lookahead)
                    v.answer_scores = scores[key]
            for name, pol in pols:
                am = teacher_forced(model, ids, target, pol)
                row["agree"][name] = float((am == target).float().mean())
                miss = (am != target).nonzero()
                upto = int(miss[0]) if len(miss) else len(target)    # greedy under the variant follows dense this far
                row["prefix_score"][name] = ruler.score(tok.decode(target[:upto], skip_special_tokens=True), it)
                row["kept"][name] = pol.kept_fraction(ids.shape[1]) if isinstance(pol, TCA) else 1.0
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(f"[ablation] {i + 1}/{len(items)} {it['task']} #{it['index']} dense {row['dense_score']:.0f} "
                  f"{time.time() - t0:.0f}s", flush=True)
    report([out], Path(args.out) / "ablation.md")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n (sound at small n and near 0 or 1, unlike the normal one)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    mid, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (mid - half) / (1 + z * z / n), (mid + half) / (1 + z * z / n)


def report(paths: list[Path], out_md: Path) -> None:
    """Per variant (those run on every sample of `paths`, pooled; a sample may appear once): KV kept; retained =
    share of dense-correct samples whose answers the variant reproduces (its greedy output agrees with dense's up to
    them), with its 95% Wilson interval; the RULER score of the part of dense's output the variant reproduces, a
    lower bound of its own score; token agreement under teacher forcing."""
    rows = [json.loads(x) for path in paths for x in path.read_text().splitlines() if x.strip()]
    ids = [(r["task"], r["index"]) for r in rows]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"error: a sample appears twice in {[str(p) for p in paths]}; pool disjoint runs only")
    for r in rows:      # runs before prefix_score was recorded: only a whole-output match counts (stricter)
        r.setdefault("prefix_score", {n: r["dense_score"] * (a == 1.0) for n, a in r["agree"].items()})
    names = [n for n in rows[0]["agree"] if all(n in r["agree"] for r in rows)]
    correct = [r for r in rows if r["dense_score"] > 0]

    def kept_answers(r, n):
        return r["prefix_score"][n] >= r["dense_score"]

    lines = [f"| variant | KV kept | retained (of {len(correct)} dense-correct) [95% CI] | score lower bound "
             f"(dense {sum(r['dense_score'] for r in rows) / len(rows):.1f}, n={len(rows)}) | token agreement |",
             "|---|---|---|---|---|"]
    for n in names:
        kept = sum(r["kept"][n] for r in rows) / len(rows)
        k = sum(kept_answers(r, n) for r in correct)
        lo, hi = wilson(k, len(correct))
        lb = sum(r["prefix_score"][n] for r in rows) / len(rows)
        tok_agree = sum(r["agree"][n] for r in rows) / len(rows)
        lines.append(f"| {n} | {kept:.3f} | {k / max(1, len(correct)):.2f} [{lo:.2f}, {hi:.2f}] | {lb:.1f} | "
                     f"{tok_agree:.3f} |")
    tasks = sorted({r["task"] for r in rows}, key=TASKS.index)
    lines += ["", "retained per task:", "",
              "| variant | " + " | ".join(f"{t} (n={sum(r['task'] == t for r in correct)})" for t in tasks) + " |",
              "|---|" + "---|" * len(tasks)]
    for n in names:
        cells = []
        for t in tasks:
            c = [r for r in correct if r["task"] == t]
            cells.append(f"{sum(kept_answers(r, n) for r in c) / max(1, len(c)):.2f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(text)
    print(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="Hugging Face model folder (default: the embedded SmolLM2)")
    ap.add_argument("--out", default="/tmp/out")
    ap.add_argument("--prompts", default=str(ROOT / ".eval" / "prompts.jsonl.xz"))
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--n", type=int, default=8, help="samples per task, indices --first .. --first + n - 1")
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--max-new", type=int, default=40)
    ap.add_argument("--deadline", type=float, default=480)
    ap.add_argument("--only", nargs="+", help="variant names to run (default: all, in the order of `variants`)")
    ap.add_argument("--report", type=Path, nargs="+", default=None,
                    help="only write the table of earlier runs' jsonl files (disjoint samples, pooled)")
    args = ap.parse_args(argv)
    if args.report:
        report(args.report, Path(args.out) / "ablation.md")
        return 0
    if args.model is None:
        from sglang_tca.embedded_model import embedded_model_dir
        args.model = str(embedded_model_dir())
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
