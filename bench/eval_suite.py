"""Quality of TCA through SGLang (the offline Engine: the server's scheduler, radix cache and kernels) on the embedded
SmolLM2-135M-Instruct, against dense and baseline policies at the same KV budget. Three steps:

  prepare (CPU)  .venv/bin/python bench/eval_suite.py prepare [--n 40] [--docs 8]
                 RULER prompts (bench/ruler.py: 8 tasks at 2K/4K/8K), held-out essay windows (fidelity) and
                 shared-context documents (multi-turn) -> .eval/prompts.jsonl.xz (git-ignored; carried to the GPU)
  run (GPU)      source .gpu/env.sh && SKIP_GPU_TESTS=1 bash bench/gpu_smollm2.sh bench/eval_suite.py run
                 (carry .gpu, .data, .eval) one Engine per policy run (see `plan`), raw outputs and the KV-kept
                 statistics the backend writes (SGLANG_TCA_STATS) -> $OUT/runs/<run>.json; runs already in
                 /tmp/eval_runs (an earlier call on the same warm machine) are not repeated
  report (CPU)   .venv/bin/python bench/eval_suite.py [--out bench/results] report --runs DIR [DIR ...]
                 (the runs of bench/results/eval_smollm2.md are in bench/results/eval_runs_smollm2/, xz-compressed)
                 scores with 95% confidence intervals, fidelity to dense, multi-turn, TTFT -> eval_smollm2.md, PNGs

Policies (`plan`, on the server's freed KV memory): dense (SGLang's triton backend); TCA with the eps sweep of
bench/eval_budgets.py; at the two largest KV budgets whose expected kept share at 8K is <= 0.35: uniform budgets of
the same mean, random tokens at TCA's per-block counts, and StreamingLLM (sink + window) with the window that keeps
the same share at 8K; TCA with a wider window (fewer kept tokens per compressed block, the widest window that keeps
at most a StreamingLLM peer's share: eps 0.2 and 0.1 at the larger peer share, eps 0.2 at the smaller); StreamingLLM
at eps 0.05's share; w 512; the question-aware end of prompt (--tca-observe 32, on freed memory since 2026-12-07) at
the two peer budgets (with its uniform peer, first in the plan after dense), at the same two with a dense observing
prefill (--tca-observe-prefill dense, SnapKV's way; its uniform peer too), and at eps 0.05.
The report adds paired differences (same prompts) of each TCA run against dense, the StreamingLLM run made from its
budgets file, and uniform and random at its eps; of each observe run against dense, StreamingLLM, TCA without observe
and uniform with observe; of each wide-window run against dense and the StreamingLLM run whose share it matches.
"""
from __future__ import annotations

import argparse
import datetime
import json
import lzma
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ROOT / ".eval" / "prompts.jsonl.xz"
BUDGETS_DIR = ROOT / "bench" / "results" / "eval_budgets"
LENGTHS = (2048, 4096, 8192)
FIDELITY_TOKENS = 256        # teacher-forced positions scored at the end of each essay window
CONTINUATION = 64            # greedy tokens compared with dense
TARGET_KEPT = 0.35           # the KV budget at 8K
SWEEP = (0.02, 0.05, 0.07, 0.1, 0.2, 0.3)
OBSERVE = 32                 # observation queries of the committed question-aware runs (--tca-observe)
MT_TURNS = 4
MT_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
            "I will quiz you about the numbers afterwards.")
MT_QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
MT_PREFIX = "The special magic number for {key} mentioned in the provided text is"


# ---------------------------------------------------------------------------------------------------------------------
# prepare (CPU)
# ---------------------------------------------------------------------------------------------------------------------
def prepare(args) -> None:
    import random

    from transformers import AutoTokenizer
    from tqdm import tqdm

    from bench import ruler
    from sglang_tca.embedded_model import embedded_model_dir
    from sglang_tca.essays import essay_split

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    items = []
    cells = [(t, n) for n in LENGTHS for t in ruler.TASKS]
    for task, length in tqdm(cells, desc="RULER cells", file=sys.stderr):
        for s in ruler.build(task, length, args.n, tok, seed=args.seed):
            items.append({"kind": "ruler", **s})
    held = essay_split("heldout")
    ids = tok(held).input_ids
    rng = random.Random(args.seed)
    for length in LENGTHS:
        n = length - 64                                  # + 1 generated token stays within the 8K context
        for i in range(args.docs):
            start = rng.randrange(0, len(ids) - n)
            items.append({"kind": "fidelity", "length": length, "index": i, "input_ids": ids[start:start + n]})
    for length in LENGTHS:
        for i in range(args.docs):
            items.append({"kind": "multiturn", "length": length, "index": i,
                          **shared_context_doc(length - 600, tok, seed=args.seed, index=i)})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(out, "wt") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
    print(f"[prepare] {len(items)} items -> {out} ({out.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)


def shared_context_doc(tokens: int, tok, seed: int, index: int) -> dict:
    """A document of about `tokens` tokens (essay haystack from a random offset) with MT_TURNS needles "One of the
    special magic numbers for KEY is: VALUE." at random RULER depths: {"context", "keys", "values"}."""
    import random

    from bench import ruler

    rng = random.Random(f"{seed}/multiturn/{tokens}/{index}")
    adjs, nouns, _ = ruler.wordlists()
    words = ruler.haystack_words()
    keys = []
    while len(keys) < MT_TURNS:
        k = f"{rng.choice(adjs)}-{rng.choice(nouns)}"
        keys += [k] if k not in keys else []
    values = [str(rng.randint(10 ** 6, 10 ** 7 - 1)) for _ in keys]
    needles = [ruler.NEEDLE.format(type_needle_v="numbers", key=k, value=v) for k, v in zip(keys, values)]
    depths = sorted(rng.sample(ruler.DEPTHS, MT_TURNS))
    start = rng.randrange(len(words) - 4 * tokens)

    def render(size):
        return ruler.with_needles(ruler.split_sentences(" ".join(words[start:start + size])), needles, depths)

    size = int(tokens / 1.3)
    for _ in range(3):                                   # the tokens-per-word ratio converges in two steps
        size = int(size * tokens / len(tok(render(size)).input_ids))
    order = rng.sample(range(MT_TURNS), MT_TURNS)        # questions not in document order
    return {"context": render(size), "keys": [keys[i] for i in order], "values": [values[i] for i in order]}


def load_items(path) -> list[dict]:
    with lzma.open(path, "rt") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------------------------------
# run (GPU)
# ---------------------------------------------------------------------------------------------------------------------
def plan(budgets_dir: Path, sweep=SWEEP) -> list[dict]:
    """The policy runs, most important first (a call that runs out of time still has the main comparison). Peers
    run at the two largest TCA budgets whose expected kept share at 8K is <= TARGET_KEPT; StreamingLLM also at eps
    0.05's share (the shipped default)."""
    from sglang_tca.budgets import Budgets

    tca = {e: budgets_dir / f"tca_w1024_eps{e}.json" for e in sweep}
    fits = [e for e in sweep if Budgets.load(tca[e]).expected_kept(8192) <= TARGET_KEPT]
    if not fits:
        raise SystemExit(f"error: no budgets in {budgets_dir} keep <= {TARGET_KEPT} at 8K; run bench/eval_budgets.py")
    peers = sorted(fits)[:2]

    def streaming(e):                                    # sink + the window that keeps TCA's share at 8K
        b = Budgets.load(tca[e])
        w = int((b.expected_kept(8192) * 8192 - b.block) // b.block * b.block)
        return {"name": f"streaming w={w}", "budgets": tca[e], "policy": "streaming", "window": w}

    def wide(e, peer):                 # TCA at eps e with the widest window that keeps at most `peer`'s share at 8K
        b, s = Budgets.load(tca[e]), peer["window"]
        cap = b.expected_kept(8192, window=s, rho=0.0)
        w = max((w for w in range(b.window, s + 1, b.block) if b.expected_kept(8192, window=w) <= cap), default=None)
        return None if w is None or w == b.window else {
            "name": f"tca w={w} eps={e}", "budgets": tca[e], "eps": e, "window": w, "streaming_peer": peer["name"]}

    def uniform(e, **kw):
        return {"budgets": budgets_dir / f"uniform_w1024_eps{e}.json", "eps": e, **kw}

    def observing(e, prefill="sparse"):    # the question-aware end of prompt (--tca-observe) and its uniform peer
        sfx, kw = ("", {}) if prefill == "sparse" else (f"+{prefill}", {"observe_prefill": prefill})
        return [{"name": f"tca+obs{OBSERVE}{sfx} eps={e}", "budgets": tca[e], "eps": e, "observe": OBSERVE, **kw},
                {"name": f"uniform+obs{OBSERVE}{sfx} eps={e}", **uniform(e, observe=OBSERVE, **kw)}]

    runs = [{"name": "dense", "backend": "triton"}]
    for e in peers:
        runs += [*observing(e), *observing(e, "dense"),
                 {"name": f"tca eps={e}", "budgets": tca[e], "eps": e},
                 streaming(e),
                 {"name": f"uniform eps={e}", **uniform(e)},
                 {"name": f"random eps={e}", "budgets": tca[e], "policy": "random", "eps": e}]
    # the window as a knob at the peers' shares: a wider dense window with fewer kept tokens per compressed block
    for e, peer in [(0.2, streaming(peers[0])), (0.1, streaming(peers[0])), (0.2, streaming(peers[-1]))]:
        if e in tca and (r := wide(e, peer)) is not None:
            runs.append(r)
    rest = [e for e in sweep if e not in peers]
    runs += [{"name": f"tca eps={e}", "budgets": tca[e], "eps": e} for e in rest]
    if 0.05 in rest:
        runs += [streaming(0.05), observing(0.05)[0]]
    w512 = budgets_dir / f"tca_w512_eps{peers[-1]}.json"
    if w512.is_file():                                   # the window as a knob: w 512 at the same eps
        runs.append({"name": f"tca w=512 eps={peers[-1]}", "budgets": w512, "eps": peers[-1]})
    for r in runs:
        r.setdefault("backend", "tca")
        r["budgets"] = str(r["budgets"]) if "budgets" in r else None
    return runs


class Stats:
    """Reads what the backend appended to the SGLANG_TCA_STATS file since the last call."""

    def __init__(self, path: Path):
        self.path, self.pos = path, 0
        path.write_text("")

    def take(self) -> list[dict]:
        with open(self.path) as f:
            f.seek(self.pos)
            lines = f.read()
            self.pos = f.tell()
        return [json.loads(x) for x in lines.splitlines() if x.strip()]


def run_policy(spec: dict, model: str, items: list[dict], tok, stats_path: Path, log_level: str = "error") -> dict:
    from sglang_tca.config import STATS_ENV, TCAConfig
    from sglang_tca.engine import Engine

    os.environ[STATS_ENV] = str(stats_path)
    stats = Stats(stats_path)
    tca = None
    if spec["backend"] == "tca":
        tca = TCAConfig(budgets=spec["budgets"], window=spec.get("window"), policy=spec.get("policy"),
                        observe=spec.get("observe"), observe_prefill=spec.get("observe_prefill"))
    t0 = time.time()
    eng = Engine(model_path=model, attention_backend=spec["backend"], tca=tca, disable_prefill_cuda_graph=True,
                 log_level=log_level, mem_fraction_static=0.6, cuda_graph_max_bs_decode=64)
    res = {"spec": spec, "start_s": round(time.time() - t0, 1), "phases": {}, "stats": {}}

    def gen(ids, max_new, **kw):
        sp = [{"temperature": 0, "max_new_tokens": m} for m in max_new]
        return eng.generate(input_ids=ids, sampling_params=sp, **kw)

    def phase(name, fn):
        t = time.time()
        res["phases"][name] = fn()
        res["stats"][name] = stats.take()
        print(f"[eval] {spec['name']}: {name} {time.time() - t:.1f}s", flush=True)

    try:
        ruler_items = [it for it in items if it["kind"] == "ruler"]
        enc = [tok(it["text"]).input_ids for it in ruler_items]       # as bench/ruler.py counts n_tokens

        def ruler_phase():
            outs = gen(enc, [it["max_new_tokens"] for it in ruler_items])
            keys = ("task", "length", "index", "answers", "metric")
            return [{**{k: it[k] for k in keys}, "n_tokens": len(e), "output": o["text"]}
                    for it, e, o in zip(ruler_items, enc, outs)]

        phase("ruler", ruler_phase)
        fid = [it for it in items if it["kind"] == "fidelity"]

        def fidelity_phase():
            ids = [it["input_ids"] for it in fid]
            tf = gen(ids, [1] * len(ids), return_logprob=True, top_logprobs_num=1,
                     logprob_start_len=[len(x) - FIDELITY_TOKENS for x in ids])
            cont = gen([x[:-CONTINUATION] for x in ids], [CONTINUATION] * len(ids))
            rows = []
            for it, x, t, c in zip(fid, ids, tf, cont):     # the same positions for every run: compared positionwise
                lp = [e[0] for e in t["meta_info"]["input_token_logprobs"] if e[0] is not None]
                top = [e[0][1] if e else None for e in t["meta_info"]["input_top_logprobs"]]
                rows.append({"length": it["length"], "index": it["index"], "logprobs": lp, "argmax": top,
                             "continuation": c["output_ids"]})
            return rows

        phase("fidelity", fidelity_phase)
        mt = [it for it in items if it["kind"] == "multiturn"]
        phase("multiturn_separate", lambda: multiturn(gen, tok, mt, conversation=False, stats=stats))
        phase("multiturn_conversation", lambda: multiturn(gen, tok, mt, conversation=True, stats=stats))

        def ttft_phase():
            out = {}
            for length in (4096, 8192):
                picks = [e for it, e in zip(ruler_items, enc) if it["length"] == length and it["task"] == "niah_single"]
                times = []
                for e in picks[:4]:
                    eng.flush_cache()
                    t = time.perf_counter()
                    gen([e], [1])
                    times.append(time.perf_counter() - t)
                out[str(length)] = {"first": times[0], "median_rest": statistics.median(times[1:])}
            return out

        phase("ttft", ttft_phase)
    finally:
        eng.shutdown()
    return res


def multiturn(gen, tok, docs, conversation: bool, stats: Stats) -> list[dict]:
    """Per document, MT_TURNS questions about its needles, asked one turn after another. conversation=True: one chat
    whose history (the model's own answers included) grows; False: separate requests, each document + one question.
    Both share the document's prefix through the radix cache; cached tokens and KV kept are recorded per turn."""
    history = [[] for _ in docs]
    rows = []
    for turn in range(MT_TURNS):
        prompts = []
        for d, h in zip(docs, history):
            q = MT_QUESTION.format(key=d["keys"][turn])
            first = f"{MT_INTRO}\n{d['context']}\n{q}"
            msgs = (h + [{"role": "user", "content": q}]) if (conversation and h) else [{"role": "user", "content": first}]
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            prompts.append((msgs, text + MT_PREFIX.format(key=d["keys"][turn])))
        outs = gen([tok(p).input_ids for _, p in prompts], [16] * len(docs))
        kept = stats.take()
        for i, (d, (msgs, _), o) in enumerate(zip(docs, prompts, outs)):
            answer = MT_PREFIX.format(key=d["keys"][turn]) + o["text"]
            history[i] = msgs + [{"role": "assistant", "content": answer}]
            rows.append({"length": d["length"], "index": d["index"], "turn": turn, "output": o["text"],
                         "answer": d["values"][turn], "cached": o["meta_info"].get("cached_tokens", 0),
                         "prompt_tokens": o["meta_info"].get("prompt_tokens", 0)})
        want = {o["meta_info"].get("prompt_tokens") for o in outs}
        shares = [x["kept"] for x in kept if x["seq_len"] in want]
        rows.append({"turn": turn, "kept": sum(shares) / len(shares) if shares else None})
    return rows


def select_runs(runs: list[dict], only: list[str] | None) -> list[dict]:
    """The plan's runs named by --only, in that order (all of them without it); a name not in the plan is an error."""
    if not only:
        return runs
    unknown = [n for n in only if n not in {r["name"] for r in runs}]
    if unknown:
        raise SystemExit(f"error: --only names no run of the plan: {unknown}; the plan: {[r['name'] for r in runs]}")
    return [next(r for r in runs if r["name"] == n) for n in dict.fromkeys(only)]


def run(args) -> None:
    import sglang
    import torch
    from transformers import AutoTokenizer

    runs = select_runs(plan(Path(args.budgets_dir)), args.only)
    out = Path(args.out) / "runs"
    out.mkdir(parents=True, exist_ok=True)
    cache = Path("/tmp/eval_runs")
    cache.mkdir(exist_ok=True)
    items = load_items(args.prompts)
    tok = AutoTokenizer.from_pretrained(args.model)
    t_start = time.time()
    device = torch.cuda.get_device_name()
    for spec in runs:
        fname = spec["name"].replace(" ", "_").replace("=", "").replace("+", "_") + ".json"
        if (cache / fname).is_file():
            print(f"[eval] {spec['name']}: done in an earlier call", flush=True)
        else:
            if time.time() - t_start > args.deadline:
                print(f"[eval] {spec['name']}: skipped, past --deadline {args.deadline}s", flush=True)
                continue
            res = run_policy(spec, args.model, items, tok, Path("/tmp/eval_stats.jsonl"), args.log_level)
            res.update(device=device, sglang=sglang.__version__, torch=torch.__version__,
                       date=datetime.date.today().isoformat())
            (cache / fname).write_text(json.dumps(res))
        (out / fname).write_text((cache / fname).read_text())


# ---------------------------------------------------------------------------------------------------------------------
# report (CPU)
# ---------------------------------------------------------------------------------------------------------------------
def mean_ci(xs) -> tuple[float, float, int]:
    """Mean and the half-width of its 95% confidence interval (normal approximation), n."""
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan"), 0
    m = sum(xs) / n
    sd = statistics.stdev(xs) if n > 1 else 0.0
    return m, 1.96 * sd / math.sqrt(n), n


def kept_by_length(stat_lines: list[dict], lengths_of: dict[int, int]) -> dict[int, float]:
    """Mean KV-kept share per length bucket from the backend's per-request lines (matched by prompt length)."""
    acc: dict[int, list[float]] = {}
    for s in stat_lines:
        if s["seq_len"] in lengths_of:
            acc.setdefault(lengths_of[s["seq_len"]], []).append(s["kept"])
    return {k: sum(v) / len(v) for k, v in acc.items()}


def summarize(results: list[dict]) -> dict:
    """Per run: RULER scores per (task, length) and averages with CIs, KV kept per length, fidelity to the dense
    run, multi-turn accuracy per turn, TTFT."""
    from bench import ruler

    dense = next((r for r in results if r["spec"]["backend"] == "triton"), None)
    out = {}
    for r in results:
        name, ph = r["spec"]["name"], r["phases"]
        s = {"spec": r["spec"], "ruler": {}, "avg": {}, "kept": {}, "fidelity": {}, "mt": {}, "ttft": ph.get("ttft"),
             "samples": {}}
        per_len: dict[int, list[float]] = {}
        lengths_of = {}
        for row in ph["ruler"]:
            sc = ruler.score(row["output"], row)
            s["samples"].setdefault(row["length"], {})[f"{row['task']}#{row['index']}"] = sc
            s["ruler"].setdefault(f"{row['task']}@{row['length']}", []).append(sc)
            per_len.setdefault(row["length"], []).append(sc)
            lengths_of[row["n_tokens"]] = row["length"]
        for cell, xs in list(s["ruler"].items()):
            s["ruler"][cell] = mean_ci(xs)
        # RULER average per length: mean over tasks of the task means, CI from the per-sample scores
        for length, xs in per_len.items():
            tasks = [v[0] for k, v in s["ruler"].items() if k.endswith(f"@{length}")]
            s["avg"][length] = (sum(tasks) / len(tasks), mean_ci(xs)[1], len(xs))
        s["kept"] = ({n: 1.0 for n in per_len} if r["spec"]["backend"] == "triton"
                     else kept_by_length(r["stats"]["ruler"], lengths_of))
        if dense is not None and r is not dense:
            s["fidelity"] = fidelity(dense["phases"]["fidelity"], ph["fidelity"])
        for mode in ("separate", "conversation"):
            rows = ph.get(f"multiturn_{mode}", [])
            acc = {}
            for x in rows:
                if "output" in x:
                    acc.setdefault(x["turn"], []).append((100.0 if x["answer"] in x["output"] else 0.0, x["cached"]))
            kept = {x["turn"]: x["kept"] for x in rows if "kept" in x}
            s["mt"][mode] = {t: (mean_ci([a for a, _ in v]), sum(c for _, c in v) / len(v),
                                 1.0 if r["spec"]["backend"] == "triton" else kept.get(t)) for t, v in acc.items()}
        out[name] = s
    return out


def paired(a: dict, b: dict, length: int) -> tuple[float, float, int]:
    """Mean per-prompt RULER score difference a - b at one length over the prompts both ran, with its 95% CI."""
    sa, sb = a["samples"].get(length, {}), b["samples"].get(length, {})
    return mean_ci([sa[k] - sb[k] for k in sa if k in sb])


def paired_rows(summ: dict, length: int = 8192) -> list[tuple[str, str, tuple]]:
    """(run, baseline, difference) for each TCA run against dense, against StreamingLLM at its KV share (made from
    the same budgets file) and against the peers at its eps: uniform and random without observe (the calibration
    ablation); uniform with observe and TCA without for a run with observe (with a dense observing prefill: uniform
    with the same, and TCA with observe's sparse prefill). A run with a widened window (spec
    "streaming_peer") against dense and the StreamingLLM run whose share it matches."""
    out = []
    dense = next((n for n, s in summ.items() if s["spec"]["backend"] == "triton"), None)
    for name, s in summ.items():
        sp, kind = s["spec"], name.split()[0]
        if kind.startswith("tca") and sp.get("streaming_peer"):
            out += [(name, b, paired(s, summ[b], length)) for b in (dense, sp["streaming_peer"]) if b in summ]
            continue
        if not kind.startswith("tca") or "w=" in name:
            continue
        if kind == "tca":
            peers = ("uniform", "random")
        elif sp.get("observe_prefill") == "dense":
            peers = (f"uniform+obs{sp['observe']}+dense", "tca", f"tca+obs{sp['observe']}")
        else:
            peers = (f"uniform+obs{sp['observe']}", "tca")
        bases = [dense] + [n for n, t in summ.items()
                           if t["spec"].get("policy") == "streaming" and t["spec"].get("budgets") == sp["budgets"]]
        bases += [n for n, t in summ.items() if n != name and sp.get("eps") is not None
                  and t["spec"].get("eps") == sp["eps"] and n.split()[0] in peers and "w=" not in n]
        out += [(name, b, paired(s, summ[b], length)) for b in bases if b is not None]
    return out


def fidelity(dense_rows, rows) -> dict:
    """Per length: teacher-forced top-1 agreement with dense, mean NLL difference (nats/token), and greedy
    continuation agreement (share of the CONTINUATION positions whose token equals dense's)."""
    by = {}
    for d, r in zip(dense_rows, rows):
        assert (d["length"], d["index"]) == (r["length"], r["index"])
        e = by.setdefault(d["length"], {"agree": [], "dnll": [], "cont": []})
        e["agree"] += [float(a == b) for a, b in zip(d["argmax"], r["argmax"])]
        e["dnll"].append(-(sum(r["logprobs"]) - sum(d["logprobs"])) / len(d["logprobs"]))
        e["cont"].append(sum(a == b for a, b in zip(d["continuation"], r["continuation"])) / len(d["continuation"]))
    return {n: {k: mean_ci(v) for k, v in e.items()} for n, e in by.items()}


def report(args) -> None:
    results = []
    for d in args.runs:
        for p in sorted(Path(d).glob("*.json*")):
            with (lzma.open(p, "rt") if p.suffix == ".xz" else open(p)) as f:
                results.append(json.load(f))
    if not results:
        raise SystemExit(f"error: no run results (*.json or *.json.xz) in {args.runs}")
    order = {r["name"]: i for i, r in enumerate(plan(Path(args.budgets_dir)))}
    results.sort(key=lambda r: order.get(r["spec"]["name"], 99))
    summ = summarize(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_smollm2.md").write_text(markdown(results, summ))
    plots(summ, out)
    print((out / "eval_smollm2.md").read_text())


def _f(x, digits=1):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(results: list[dict], summ: dict) -> str:
    from bench import ruler

    def values(key):                                   # the runs' distinct values of a meta field
        return ", ".join(sorted({str(r.get(key)) for r in results}))

    lines = [f"# Quality through SGLang: TCA vs dense and baselines, SmolLM2-135M-Instruct (embedded)\n",
             f"- date: {values('date')} (each run's own in its raw file); device: {values('device')}; sglang "
             f"{values('sglang')}, torch {values('torch')}",
             "- commands: `python bench/eval_budgets.py` (CPU), `python bench/eval_suite.py prepare` (CPU), "
             "`SKIP_GPU_TESTS=1 bash bench/gpu_smollm2.sh bench/eval_suite.py run` (GPU), "
             "`python bench/eval_suite.py report --runs DIR` (CPU)",
             "- every run is one SGLang Engine (chunked prefill, radix cache, overlap scheduler, decode CUDA graphs); "
             "greedy decoding; KV kept = share of the prompt's KV its last token sees (sink + kept + window), mean "
             "over layers, KV heads and prompts, measured by the backend; ± = 95% CI half-width\n",
             "## RULER average (mean over the 8 tasks) and KV kept, per length\n",
             "| run | " + " | ".join(f"{n // 1024}K score | {n // 1024}K kept" for n in LENGTHS) + " | n per length |",
             "|---|" + "---|---|" * len(LENGTHS) + "---|"]
    for name, s in summ.items():
        cells = []
        for n in LENGTHS:
            a = s["avg"].get(n, (float("nan"), float("nan"), 0))
            cells += [f"{_f(a[0])} ± {_f(a[1])}", _f(s["kept"].get(n), 3)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {max((a[2] for a in s['avg'].values()), default=0)} |")
    for n in LENGTHS:
        lines += [f"\n## RULER per task at {n // 1024}K (score ± 95% CI)\n",
                  "| run | " + " | ".join(ruler.TASKS) + " |", "|---|" + "---|" * len(ruler.TASKS)]
        for name, s in summ.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{_f(s['ruler'][f'{t}@{n}'][0])} ± {_f(s['ruler'][f'{t}@{n}'][1])}" if f"{t}@{n}" in s["ruler"] else "-"
                for t in ruler.TASKS) + " |")
    lines += ["\n## Paired differences at 8K (the same prompts: mean per-prompt RULER score difference ± 95% CI)\n",
              "| run | minus | difference | n |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {_f(d[0])} ± {_f(d[1])} | {d[2]} |" for a, b, d in paired_rows(summ)]
    lines += ["\n## Fidelity to dense on held-out essays (teacher-forced top-1 agreement, NLL increase in nats/token, "
              f"greedy {CONTINUATION}-token continuation agreement)\n",
              "| run | " + " | ".join(f"{n // 1024}K top-1 | {n // 1024}K dNLL | {n // 1024}K cont." for n in LENGTHS) + " |",
              "|---|" + "---|---|---|" * len(LENGTHS)]
    for name, s in summ.items():
        if s["fidelity"]:
            f = s["fidelity"]
            dense_pf = s["spec"].get("observe_prefill") == "dense"    # teacher-forced prompt positions run dense
            lines.append(f"| {name} | " + " | ".join(
                ("(dense) | (dense)" if dense_pf else f"{_f(f[n]['agree'][0], 3)} | {_f(f[n]['dnll'][0], 4)}")
                + f" | {_f(f[n]['cont'][0], 3)}" if n in f else "- | - | -" for n in LENGTHS) + " |")
    if any(s["spec"].get("observe_prefill") == "dense" for s in summ.values()):
        lines.append("\n(dense): with --tca-observe-prefill dense the teacher-forced positions (the end of an observing "
                     "prompt) attend densely, so top-1 and dNLL are dense's by construction; the continuation, decoded "
                     "from the pruned cache, is what such a run is measured by.")
    for mode in ("separate", "conversation"):
        lines += [f"\n## Shared context, {mode} ({MT_TURNS} questions per document, radix cache on): accuracy per "
                  "turn (mean cached tokens, KV kept), all lengths\n",
                  "| run | " + " | ".join(f"turn {t + 1}" for t in range(MT_TURNS)) + " |", "|---|" + "---|" * MT_TURNS]
        for name, s in summ.items():
            mt = s["mt"].get(mode, {})
            lines.append(f"| {name} | " + " | ".join(
                f"{_f(mt[t][0][0])} ± {_f(mt[t][0][1])} ({mt[t][1]:.0f}, {_f(mt[t][2], 3)})" if t in mt else "-"
                for t in range(MT_TURNS)) + " |")
    lines += ["\n## TTFT (s, one request, cache flushed; median of 3 after a first one)\n",
              "| run | 4K | 8K |", "|---|---|---|"]
    for name, s in summ.items():
        t = s["ttft"] or {}
        lines.append(f"| {name} | " + " | ".join(_f(t.get(str(n), {}).get("median_rest"), 4) for n in (4096, 8192)) + " |")
    return "\n".join(lines) + "\n"


def plots(summ: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    for name, s in summ.items():
        kind = name.split()[0]
        a = s["avg"].get(8192)
        if a is None:
            continue
        kept = s["kept"].get(8192, float("nan"))
        ttft = (s["ttft"] or {}).get("8192", {}).get("median_rest", float("nan"))
        style = {"dense": "k*", "tca": "bo", "uniform": "gs", "streaming": "r^", "random": "mv",
                 f"tca+obs{OBSERVE}": "cD", f"uniform+obs{OBSERVE}": "yD", f"tca+obs{OBSERVE}+dense": "cP",
                 f"uniform+obs{OBSERVE}+dense": "yP"}.get(kind, "kx")
        for ax, x in zip(axes, (kept, ttft)):
            ax.errorbar([x], [a[0]], yerr=[a[1]], fmt=style, capsize=3, label=name)
    axes[0].set_xlabel("KV kept at 8K (share of dense)")
    axes[1].set_xlabel("TTFT at 8K (s)")
    for ax in axes:
        ax.set_ylabel("RULER average at 8K")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("SmolLM2-135M-Instruct through SGLang: accuracy vs KV kept and vs TTFT")
    fig.tight_layout()
    fig.savefig(out / "eval_smollm2.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF model folder (run)")
    ap.add_argument("--out", help="output folder (run: $OUT; report: bench/results; prepare: the prompts file)")
    ap.add_argument("--budgets-dir", default=str(BUDGETS_DIR))
    sub = ap.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--n", type=int, default=40, help="RULER samples per (task, length)")
    p.add_argument("--docs", type=int, default=8, help="fidelity windows and multi-turn documents per length")
    p.add_argument("--seed", type=int, default=42)
    r = sub.add_parser("run")
    r.add_argument("--prompts", default=str(PROMPTS))
    r.add_argument("--only", nargs="+", help="run names to run, in this order (default: the whole plan)")
    r.add_argument("--deadline", type=float, default=480, help="start no new run after this many seconds")
    r.add_argument("--log-level", default="error", choices=("error", "warning", "info"),
                   help="the Engines' log level (info: SGLang's per-batch prefill and decode lines, for timing)")
    g = sub.add_parser("report")
    g.add_argument("--runs", nargs="+", required=True, help="folders with run results (*.json)")
    args = ap.parse_args(argv)
    if args.step == "prepare":
        args.out = args.out or str(PROMPTS)
        prepare(args)
    elif args.step == "run":
        if not args.model or not args.out:
            ap.error("run needs --model and --out")
        run(args)
    else:
        args.out = args.out or str(ROOT / "bench" / "results")
        report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
