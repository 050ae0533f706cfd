"""Which setting changes a multi-turn conversation's greedy tokens: chunk size, radix reuse, or TCA?

    python bench/conversation_check.py --model DIR --budgets FILE [--out DIR]

The 3-turn conversation of bench/http_check.py on five servers (`python launch.py`): TCA and dense triton
(--no-tca --attention-backend triton), each with chunked prefill 1024 + radix cache and with one chunk (8192) and no
radix cache, plus TCA with chunks of 1024 and no radix cache. Prints which pairs agree token for token.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_check import conversation, start  # noqa: E402  (puts the repo root on sys.path)

from sglang_tca.config import EMBEDDED_BUDGETS  # noqa: E402

VARIANTS = {
    "tca, chunk 1024, radix": ["--chunked-prefill-size", "1024"],
    "tca, chunk 1024, no radix": ["--chunked-prefill-size", "1024", "--disable-radix-cache"],
    "tca, chunk 8192, no radix": ["--chunked-prefill-size", "8192", "--disable-radix-cache"],
    "dense triton, chunk 1024, radix": ["--no-tca", "--attention-backend", "triton", "--chunked-prefill-size", "1024"],
    "dense triton, chunk 8192, no radix": ["--no-tca", "--attention-backend", "triton", "--chunked-prefill-size", "8192",
                                           "--disable-radix-cache"],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--budgets", default=str(EMBEDDED_BUDGETS))
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/conv"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    from sglang_tca.essays import essay_split

    tok = AutoTokenizer.from_pretrained(args.model)
    doc = tok.decode(tok(essay_split("heldout"), add_special_tokens=False).input_ids[30000:35000])
    qs = ["What is the main topic of the text above?", "Who is the author talking to?", "Give one example the text uses."]
    res = {}
    for i, (name, extra) in enumerate(VARIANTS.items()):
        proc, url = start(args.model, args.budgets, 30200 + i, extra, open(out / f"server_{i}.log", "w"))
        try:
            res[name] = conversation(url, doc, qs)
        finally:
            os.killpg(proc.pid, 9)
        print(f"[conv] {name}: cached {[c for _, c in res[name]]}", flush=True)
    names = list(res)
    rows = [(a, b, [x[0] == y[0] for x, y in zip(res[a], res[b])]) for i, a in enumerate(names) for b in names[i + 1:]]
    import torch

    table = (f"# conversation_check ({datetime.date.today()}, {torch.cuda.get_device_name()}, sglang 0.5.17)\n\n"
             f"command: `python bench/conversation_check.py --model DIR --budgets {args.budgets}`\n\n"
             "| server A | server B | turns identical (1, 2, 3) |\n|---|---|---|\n"
             + "".join(f"| {a} | {b} | {s} |\n" for a, b, s in rows))
    (out / "conversation_check.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
