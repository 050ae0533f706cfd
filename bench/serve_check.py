"""GPU check of TCA inside SGLang (offline Engine, same API as the server) on the embedded SmolLM2, on freed KV memory.

    python bench/serve_check.py --model DIR --budgets FILE [--out DIR] [--chunk N]

Every run uses the same prefill chunk size (--chunk, default 1024, so prompts above it are prefilled in chunks),
and TCA runs with SGLang's strict memory checks on while busy (SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY=1) and at
idle (the default), so a leak or an accounting error in the pools stops the run.
1. keep-all budgets: greedy tokens of TCA == SGLang's dense `triton` backend, prompts of 100..8K tokens batched,
   and identical between two TCA runs;
2. calibrated budgets: passkey retrieval at 4K and 8K tokens, dense vs TCA;
3. radix reuse: one document, two questions sent one after the other, then a conversation's next turn (the first
   turn's whole sequence + a new question): tokens equal to a run with the radix cache disabled, and the cached-token
   counts show the hits; then two short prompts (below window + block, so SGLang's dense kernels run them) on a
   shared 300-token prefix, one after the other: the second reuses the cached prefix; keep-all == dense triton and
   radix on == off on them too;
4. memory: TCA's split and the store's use after the runs (`/get_server_info` -> internal_states -> tca).
Prints a markdown table last and writes it (and the raw outputs) under --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sglang_tca.config import EMBEDDED_BUDGETS  # noqa: E402

LENGTHS = (100, 1000, 2000, 4000, 8000)


def engine(model, backend, budgets=None, observe=0, observe_prefill=None, **kw):
    from sglang_tca.config import TCAConfig
    from sglang_tca.engine import Engine

    tca = TCAConfig(budgets=str(budgets), observe=observe or None, observe_prefill=observe_prefill) \
        if budgets is not None else None
    return Engine(model_path=str(model), attention_backend=backend, tca=tca, disable_prefill_cuda_graph=True,
                  log_level="error", mem_fraction_static=0.5, cuda_graph_max_bs_decode=16, **kw)


def generate(eng, prompts, max_new=32):
    outs = eng.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": max_new})
    return [o["output_ids"] for o in outs], [o["meta_info"].get("cached_tokens", 0) for o in outs]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--budgets", default=str(EMBEDDED_BUDGETS))
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/serve_check"))
    ap.add_argument("--chunk", type=int, default=1024)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import sglang
    import torch
    from transformers import AutoTokenizer

    from sglang_tca.budgets import Budgets, ModelShape
    from sglang_tca.essays import essay_split, passkey_prompt

    tok = AutoTokenizer.from_pretrained(args.model)
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    keep_all = out / "keep_all.json"
    Budgets.uniform(ModelShape.from_hf_config(cfg), [0] * 6 + [1], block=64, window=1024).save(keep_all)
    hay = tok(essay_split("heldout"), add_special_tokens=False).input_ids
    prompts = [hay[i * 37: i * 37 + n] for i, n in enumerate(LENGTHS)]
    keys = [52817, 39402, 71163]
    pk = {L: [tok(passkey_prompt(tok, L, d, k, seed=i), add_special_tokens=False).input_ids
              for i, (d, k) in enumerate(zip((0.2, 0.5, 0.8), keys))] for L in (4000, 7900)}
    doc = hay[20000:26000]
    questions = [tok("\n\nQuestion: What is the main topic of the text above? Answer:", add_special_tokens=False).input_ids,
                 tok("\n\nQuestion: Summarize the last paragraph in one sentence. Answer:", add_special_tokens=False).input_ids]
    short_prefix, short_tails = hay[30000:30300], [hay[31000:31100], hay[32000:32150]]
    rows, raw = [], {}

    def timed(name, fn):
        t0 = time.time()
        r = fn()
        print(f"[serve_check] {name}: {time.time() - t0:.1f}s", flush=True)
        return r

    def run_suite(tag, backend, budgets=None, **kw):
        if backend == "tca":
            os.environ["SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY"] = "1"
        eng = timed(f"start {tag}", lambda: engine(args.model, backend, budgets, chunked_prefill_size=args.chunk,
                                                    **kw))
        os.environ.pop("SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY", None)
        try:
            res = {"lengths": timed(f"{tag} lengths", lambda: generate(eng, prompts)[0])}
            res["lengths_again"] = generate(eng, prompts)[0]
            res["passkey"] = {L: [tok.decode(o) for o in generate(eng, ps, 12)[0]] for L, ps in pk.items()}
            seq = []
            for qn in questions:                                  # one after the other: the second hits the cache
                ids, cached = generate(eng, [doc + qn])
                seq.append((ids[0], cached[0]))
            turn1 = doc + questions[0] + seq[0][0]                 # the next turn of the first conversation
            ids, cached = generate(eng, [turn1 + questions[1]])
            seq.append((ids[0], cached[0], len(turn1)))
            for tail in short_tails:                              # the second reads the first's cached prefix
                ids, cached = generate(eng, [short_prefix + tail])
                seq.append((ids[0], cached[0]))
            res["radix"] = seq
            if backend == "tca":
                res["memory"] = eng.get_server_info()["internal_states"][0]["tca"]
        finally:
            eng.shutdown()
        raw[tag] = res
        return res

    dense = run_suite("dense triton", "triton")
    keep = run_suite("tca keep-all", "tca", keep_all)
    cal = run_suite("tca calibrated", "tca", args.budgets)
    nor = run_suite("tca calibrated, radix off", "tca", args.budgets, disable_radix_cache=True)

    same = [a == b for a, b in zip(keep["lengths"], dense["lengths"])]
    rows.append(("keep-all TCA == dense triton (greedy, 32 tokens)", f"{sum(same)}/{len(same)} prompts "
                 f"({', '.join(str(n) for n, s in zip(LENGTHS, same) if not s) or 'all lengths'} differ)" if not all(same)
                 else f"{len(same)}/{len(same)} prompts identical ({LENGTHS[0]}..{LENGTHS[-1]} tokens)"))
    rows.append(("keep-all TCA run twice identical", str(keep["lengths"] == keep["lengths_again"])))
    for L in pk:
        for tag, res in (("dense", dense), ("TCA calibrated", cal)):
            hits = sum(str(k) in t for k, t in zip(keys, res["passkey"][L]))
            rows.append((f"passkey {L} tokens, {tag}", f"{hits}/{len(keys)}"))
    rows.append(("radix on vs off: same tokens (2 questions on one document, the next turn, 2 short prompts)",
                 str([a[0] for a in cal["radix"]] == [a[0] for a in nor["radix"]])))
    rows.append(("short prompts on a cached prefix: keep-all TCA == dense triton",
                 str([a[0] for a in keep["radix"][3:]] == [a[0] for a in dense["radix"][3:]])))
    rows.append(("short prompts: second one's cached tokens (radix on / off)",
                 f"{cal['radix'][4][1]} / {nor['radix'][4][1]}"))
    rows.append(("second question cached tokens (radix on / off)", f"{cal['radix'][1][1]} / {nor['radix'][1][1]}"))
    rows.append(("next turn cached tokens (radix on / off; previous sequence length)",
                 f"{cal['radix'][2][1]} / {nor['radix'][2][1]} ({cal['radix'][2][2]})"))
    m = cal["memory"]
    rows.append(("TCA memory after the calibrated run", f"dense pool {m['dense_tokens']} tokens, store "
                 f"{m['store_pages']} pages ({m['store_used_pages']} in use by {m['records']} cached blocks), "
                 f"{m['logical_tokens']} logical ids"))
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    table = (f"# serve_check ({datetime.date.today()}, {dev}, sglang {sglang.__version__}, torch {torch.__version__})\n\n"
             f"command: `python bench/serve_check.py --model DIR --budgets {args.budgets} --chunk {args.chunk}`"
             f"\n\n| check | result |\n|---|---|\n"
             + "".join(f"| {a} | {b} |\n" for a, b in rows))
    (out / "serve_check.md").write_text(table)
    (out / "serve_check_raw.json").write_text(json.dumps(raw, default=str)[:2_000_000])
    print(table)


if __name__ == "__main__":
    main()
