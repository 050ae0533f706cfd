"""RULER-style long-context prompts and RULER's scoring, built on the CPU with a fixed seed.

    python -m bench.ruler --out FILE.jsonl [--tasks ...] [--lengths 2048 4096 8192] [--n 50] [--seed 42] [--model DIR]

Eight of RULER's synthetic tasks (settings from RULER's synthetic.yaml, shipped in `nvidia-long-context-eval==26.3`):

    niah_single      niah_single_2    essay haystack, word key, 7-digit number value
    niah_multikey    niah_multikey_1  4 needles with different keys, one asked
    niah_multivalue  niah_multivalue  4 values for one key, all asked
    niah_multiquery  niah_multiquery  4 needles, 4 keys asked
    vt               vt               variable tracking, 1 chain of 4 hops, with RULER's one-shot example
    cwe              cwe              common words extraction (10 words x 30, others x 3; below 4096 tokens x 6 / x 1)
    qa_squad         qa_1             SQuAD question: gold paragraph + distractor paragraphs
    qa_hotpot        qa_2             HotpotQA question: its 10 paragraphs + distractor paragraphs

RULER's generator scripts are argparse CLIs that need nltk's punkt, so their sampling is re-implemented here, in
RULER's order, from a per-sample `random.Random(f"{seed}/{task}/{length}/{index}")`: each sample is a pure function of
(seed, task, length, index), so n=10 gives the first 10 of n=50. Task templates come from
`long_context_eval.data.synthetic.constants.TASKS`, words from `wonderwords` (as RULER), the essay haystack from
`sglang_tca.essays.essay_split("haystack")` (never the calibration split; as RULER, always its first N words), QA data
from the package's squad.json / hotpotqa.json (sample i asks question i of the file at every length, as RULER).

Length, as RULER: n_tokens + max_new_tokens <= length. `text` is the RULER task prompt as the user message of the
tokenizer's chat template (generation prompt added) followed by RULER's answer prefix with its leading space stripped
(VT's keeps its trailing space), counted as SGLang counts it (`tokenizer(text).input_ids`). Each sample's haystack
size (words, noise lines, list words, documents) is the largest whose prompt fits, or one within 1% of the length,
found by a bracketed secant search on exact token counts (a reference draw gives the first guess, so a sample needs
1-4 tokenizations). With SmolLM2's tokenizer, n_tokens + max_new_tokens is >= 98.8% of the length for NIAH, VT and
CWE, and >= 92% (mean 96-99%) for QA, whose unit is a whole document. 8 tasks x (2048, 4096, 8192) x 50: ~40 s.

Differences from RULER's scripts:
  * RULER's search steps are coarse (500 words, 10 noise lines / words / documents) and set once per task from one
    sample; here every sample is sized on its own, to the unit;
  * keys are drawn as (adjective, noun) rather than from the materialised list of all ~6 M adjective-noun pairs;
  * shuffles RULER does with a fixed `Random(seed)` (needle order, CWE list, QA document order) use the sample's
    generator, so samples do not share one permutation;
  * the VT one-shot example is drawn per sample (RULER draws one and renames its variables per sample); names in a
    chain are redrawn until distinct;
  * QA: documents join in a random order (gold first, then the question's own distractors, then others, so every
    prefix is distributed as RULER's draw of that size); one that would overflow while more than an average
    document's tokens are left is passed over for the next (RULER instead redraws 10 documents fewer);
  * HotpotQA: when a question's 10 paragraphs do not all fit (small lengths, where RULER's script loops forever),
    its 2 gold paragraphs are kept and its own distractors sampled, as RULER does for SQuAD;
  * sentences are split by a small regex (not punkt), and needles leave no empty chunk (RULER's double space).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import random
import re
import string
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "qa_squad", "qa_hotpot")
# task -> (RULER generator, its synthetic.yaml args, rough tokens per haystack unit: only the first guess of the search)
_SPEC = {
    "niah_single": ("niah", dict(num_needle_k=1, num_needle_v=1, num_needle_q=1), 1.3),
    "niah_multikey": ("niah", dict(num_needle_k=4, num_needle_v=1, num_needle_q=1), 1.3),
    "niah_multivalue": ("niah", dict(num_needle_k=1, num_needle_v=4, num_needle_q=1), 1.3),
    "niah_multiquery": ("niah", dict(num_needle_k=1, num_needle_v=1, num_needle_q=4), 1.3),
    "vt": ("variable_tracking", dict(num_chains=1, num_hops=4), 22.0),
    "cwe": ("common_words_extraction", dict(freq_cw=30, freq_ucw=3, num_cw=10), 10.0),
    "qa_squad": ("qa", dict(dataset="squad"), 150.0),
    "qa_hotpot": ("qa", dict(dataset="hotpotqa"), 120.0),
}
METRIC = {"niah": "all", "variable_tracking": "all", "common_words_extraction": "all", "qa": "part"}

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = [round(100 * i / 39) for i in range(40)]      # RULER: np.round(np.linspace(0, 100, 40))
VT_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
DOCUMENT_PROMPT = "Document {i}:\n{document}"
_ABBREV = {"mr", "mrs", "ms", "dr", "st", "vs", "jr", "sr", "prof", "inc", "e.g", "i.e", "u.s", "cf"}
_BOUNDARY = re.compile(r"""[.!?]["')\]]* (?=["'(\[]?[A-Z0-9])""")


def _templates():
    from long_context_eval.data.synthetic.constants import TASKS as T
    return T


def split_sentences(text: str) -> list[str]:
    """Sentences of whitespace-collapsed text (joining them with " " gives the text back)."""
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        word = text[text.rfind(" ", start, m.start()) + 1:m.start()].lower()
        if text[m.start()] == "." and (len(word) <= 1 or word in _ABBREV):   # initials, abbreviations
            continue
        out.append(text[start:m.end() - 1])
        start = m.end()
    return out + [text[start:]] if start < len(text) else out


@functools.lru_cache(maxsize=1)
def haystack_words() -> list[str]:
    """RULER's essay haystack (whitespace-collapsed, split on spaces), from the haystack split only."""
    from sglang_tca.essays import essay_split
    return re.sub(r"\s+", " ", essay_split("haystack")).strip().split(" ")


@functools.lru_cache(maxsize=1)
def wordlists():
    with warnings.catch_warnings():         # wonderwords 2.2 reads its lists with a deprecated importlib call
        warnings.simplefilter("ignore", DeprecationWarning)
        from wonderwords import random_word as rw
        nouns, adjs, verbs = (rw._get_words_from_text_file(f"{x}list.txt") for x in ("noun", "adjective", "verb"))
    return sorted(set(adjs)), sorted(set(nouns)), sorted(set(nouns + adjs + verbs))


def with_needles(sents: list[str], needles: list[str], depths: list[int]) -> str:
    """The sentences joined by spaces, needles[i] placed before the sentence at depths[i] percent (ascending)."""
    cuts = [0] + [int(len(sents) * d / 100) for d in depths] + [len(sents)]
    parts = []
    for i in range(1, len(cuts)):
        parts += sents[cuts[i - 1]:cuts[i]] + needles[i - 1:i]
    return " ".join(parts)


# ---- niah.py -------------------------------------------------------------------------------------------------------
def _niah(args, length, seed, count):
    T = _templates()["niah"]
    tpl, pre, type_v = T["template"], T["answer_prefix"], "numbers"
    k, v, q = max(args["num_needle_k"], args["num_needle_q"]), args["num_needle_v"], args["num_needle_q"]
    if q * v == 1:      # RULER's singular wording
        for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            tpl, pre = tpl.replace(a, b), pre.replace(a, b)
        type_v = "number"
    adjs, nouns, _ = wordlists()
    words = haystack_words()

    def sample(sid, index):
        def render(size):
            rng = random.Random(sid)
            keys, values, needles = [], [], []
            for _ in range(k):
                keys.append(f"{rng.choice(adjs)}-{rng.choice(nouns)}")
                values.append([str(rng.randint(10 ** 6, 10 ** 7 - 1)) for _ in range(v)])
                needles += [NEEDLE.format(type_needle_v="numbers", key=keys[-1], value=x) for x in values[-1]]
            rng.shuffle(needles)
            sents = split_sentences(" ".join(words[:size]))
            context = with_needles(sents, needles, sorted(rng.sample(DEPTHS, len(needles))))
            asked = rng.sample(range(k), q)
            queries, answers = [keys[i] for i in asked], [a for i in asked for a in values[i]]
            query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
            fill = dict(type_needle_v=type_v, context=context, query=query)
            return tpl.format(**fill), pre.format(**fill), answers
        return render, 1, len(words)
    return sample


# ---- variable_tracking.py ------------------------------------------------------------------------------------------
def _vt_example(rng, n_noise, hops, name_len):
    T = _templates()["variable_tracking"]
    while True:
        names = ["".join(rng.choices(string.ascii_uppercase, k=name_len)) for _ in range(hops + 1)]
        if len(set(names)) == len(names):
            break
    value = rng.randint(10000, 99998)          # np.random.randint(10000, 99999)
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    sentences = [VT_NOISE] * n_noise
    for j, p in enumerate(sorted(rng.sample(range(n_noise), len(chain)))):
        sentences.insert(p + j, chain[j])
    fill = dict(context=" ".join(sentences).replace(". \n", ".\n"), query=value, num_v=hops + 1)
    return T["template"].format(**fill), T["answer_prefix"].format(**fill), names


def _vt(args, length, seed, count):
    hops = args["num_hops"]
    n_icl = 5                 # RULER sizes its one-shot example (3-letter names) to 500 tokens, in steps of 5 noises
    while True:
        u, p, names = _vt_example(random.Random(f"{seed}/vt-icl/{n_icl + 5}"), n_icl + 5, hops, 3)
        if count(f"{u}{p} {names}") + 30 > 500:
            break
        n_icl += 5

    def sample(sid, index):
        def render(size):
            rng = random.Random(sid)
            icl_u, icl_p, icl_names = _vt_example(rng, n_icl, hops, 3)
            u, p, names = _vt_example(rng, size, hops, 5)
            return f"{icl_u}{icl_p} {' '.join(icl_names)}\n\n\n\n{u}", p, names   # RULER's spacing
        return render, hops + 2, 100 * length
    return sample


# ---- common_words_extraction.py ------------------------------------------------------------------------------------
def _cwe(args, length, seed, count):
    T = _templates()["common_words_extraction"]
    words = wordlists()[2]
    nc = args["num_cw"]
    if length < 4096:          # RULER lowers the repeats at small lengths
        ex, reps = (20, 3, 1), (6, 1)
    else:
        ex, reps = (40, 10, 3), (args["freq_cw"], args["freq_ucw"])

    def example(rng, num_words, cr, ur):
        full = rng.sample(words, num_words)
        lst = full[:nc] * cr + full[nc:] * ur
        rng.shuffle(lst)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(lst)), full[:nc]

    def sample(sid, index):
        def render(size):
            rng = random.Random(sid)
            ctx_ex, ans_ex = example(rng, *ex)
            ctx, ans = example(rng, size, *reps)
            shot = T["template"].format(context=ctx_ex, query="") + T["answer_prefix"] + " " + " ".join(
                f"{i + 1}. {w}" for i, w in enumerate(ans_ex))
            return shot + "\n" + T["template"].format(context=ctx, query=""), T["answer_prefix"], ans
        return render, nc, len(words)
    return sample


# ---- qa.py ---------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def qa_data(dataset: str):
    """(questions, documents) as RULER reads them; a question: query, outputs, gold and more (same-source) doc ids."""
    import long_context_eval.data.synthetic as pkg
    with open(Path(pkg.__file__).parent / "json" / f"{dataset}.json", encoding="utf-8") as f:
        data = json.load(f)
    if dataset == "squad":
        paras = [p for d in data["data"] for p in d["paragraphs"]]
        docs = sorted({p["context"] for p in paras})
        ids = {c: i for i, c in enumerate(docs)}
        qas = []
        for d in data["data"]:
            article = [ids[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                gold = ids[p["context"]]
                qas += [dict(query=qa["question"], outputs=[a["text"] for a in qa["answers"]], gold=[gold],
                             more=[i for i in article if i != gold]) for qa in p["qas"] if not qa["is_impossible"]]
        return qas, docs
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    ids = {c: i for i, c in enumerate(docs)}
    qas = []
    for d in data:
        support = {t for t, _ in d["supporting_facts"]}
        own = [(t in support, ids[f"{t}\n{''.join(p)}"]) for t, p in d["context"]]
        qas.append(dict(query=d["question"], outputs=[d["answer"]], gold=[i for s, i in own if s],
                        more=[i for s, i in own if not s]))
    return qas, docs


def _qa(args, length, seed, count):
    T = _templates()["qa"]
    qas, docs = qa_data(args["dataset"])

    def sample(sid, index):
        if index >= len(qas):
            raise ValueError(f"{args['dataset']} has {len(qas)} questions; sample {index} does not exist")
        qa, rng = qas[index], random.Random(sid)
        # Documents in the order they join as the size grows; any prefix is distributed as RULER's draw of that size.
        more = rng.sample(qa["more"], len(qa["more"]))
        taken = set(qa["gold"] + more)
        m = min(len(docs), length // 8 + len(taken))
        seq = qa["gold"] + more + [i for i in rng.sample(range(len(docs)), m) if i not in taken]

        def render(size):
            chosen = [docs[i] for i in seq[:size]]
            random.Random(f"{sid}/order").shuffle(chosen)
            ctx = "\n\n".join(DOCUMENT_PROMPT.format(i=i + 1, document=d) for i, d in enumerate(chosen))
            return T["template"].format(context=ctx, query=qa["query"]), T["answer_prefix"], qa["outputs"]
        render.skip = seq.pop          # drops the next document (one too long to fit): see iter_samples
        return render, len(qa["gold"]), len(seq)
    return sample


_GENERATORS = {"niah": _niah, "variable_tracking": _vt, "common_words_extraction": _cwe, "qa": _qa}


def _fit(measure, budget, lo, hi, guess, rate, slack, fit=None):
    """(size, n_tokens, sample) for the largest size in [lo, hi] whose prompt fits `budget` tokens, or one within
    `slack` of it: secant steps on exact counts inside a shrinking bracket (fit < size < bad).
    `fit`: a known fitting (size, n_tokens, sample). (None, n_tokens at lo, None) if even lo does not fit."""
    bad, last = hi + 1, None
    size = min(max(guess, lo), hi)
    while True:
        n, out = measure(size)
        if n <= budget:
            fit = (size, n, out)
        else:
            bad = size
        if fit is None and size == lo:
            return None, n, None
        if fit and (bad - fit[0] <= 1 or budget - fit[1] <= slack):
            return fit
        if last and (n - last[1]) * (size - last[0]) > 0:
            rate = (n - last[1]) / (size - last[0])
        last = (size, n)
        size = min(max(size + math.floor((budget - n) / rate), fit[0] + 1 if fit else lo), bad - 1)


def iter_samples(task: str, length: int, n: int, tokenizer, seed: int = 42):
    """The samples of `build`, one at a time."""
    if task not in _SPEC:
        raise ValueError(f"unknown task {task!r}; one of {', '.join(TASKS)}")
    if not isinstance(length, int) or length <= 0 or not isinstance(n, int) or n < 0:
        raise ValueError(f"length must be a positive int and n a non-negative int, got {length!r}, {n!r}")
    kind, args, rate = _SPEC[task]
    max_new = _templates()[kind]["tokens_to_generate"]
    budget, slack = length - max_new, length // 100

    def count(text):
        return len(tokenizer(text, verbose=False).input_ids)

    def measurer(render):
        def measure(size):
            user, prefix, answers = render(size)
            text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                 add_generation_prompt=True) + prefix.lstrip()
            return count(text), (text, answers)
        return measure

    def fit(index, tag, guess=None, rate=rate):
        """(size, n_tokens, (text, answers), tokens per unit); no guess: start from the shortest prompt."""
        render, lo, hi = sample(f"{seed}/{task}/{length}/{tag}", index)
        measure = measurer(render)
        lo_n = measure(lo)[0] if guess is None else None
        if lo_n is not None:
            guess = lo + int((budget - lo_n) / rate)
        size, n_tok, out = _fit(measure, budget, lo, hi, guess, rate, slack)
        if size is None:
            raise ValueError(f"length {length} is too small for {task}: its shortest prompt (sample {index}) takes "
                             f"{n_tok} tokens, and {max_new} more are generated")
        skip = getattr(render, "skip", None)    # QA: pass over a longer-than-average document that does not fit
        while skip and budget - n_tok > rate and size < hi:
            skip(size)
            hi -= 1
            size, n_tok, out = _fit(measure, budget, size, hi, size + 1, rate, slack, (size, n_tok, out))
        return size, n_tok, out, rate if lo_n is None else max((n_tok - lo_n) / max(size - lo, 1), 0.1)

    sample = _GENERATORS[kind](args, length, seed, count)
    # A reference draw (own seed) gives every sample the same first guess and rate, so samples stay independent.
    size, _, _, rate = fit(0, "ref")
    for i in range(n):
        _, n_tok, (text, answers), _ = fit(i, i, size, rate)
        yield dict(task=task, length=length, index=i, text=text, n_tokens=n_tok, answers=list(answers),
                   max_new_tokens=max_new, metric=METRIC[kind])


def build(task: str, length: int, n: int, tokenizer, seed: int = 42) -> list[dict]:
    """`n` samples of `task` (one of TASKS) at `length` tokens (prompt + max_new_tokens), for a HF `tokenizer` with a
    chat template. Each: {"task", "length", "index", "text" (prompt for SGLang /generate), "n_tokens", "answers",
    "max_new_tokens", "metric" ("all" | "part")}. ValueError for an unknown task or a length too small for it."""
    return list(iter_samples(task, length, n, tokenizer, seed))


def score(pred: str, sample: dict) -> float:
    """RULER's per-sample metric in 0..100: string_match_all (share of the answers found in `pred`, case-insensitive)
    or string_match_part (100 if any answer is found). Same formulas as long_context_eval.eval.synthetic.constants,
    written out so that scoring needs no package (the GPU machine has none); tests check they agree."""
    hits = [a.lower() in pred.lower() for a in sample["answers"]]
    return 100.0 * (sum(hits) / len(hits) if sample["metric"] == "all" else float(any(hits)))


def main(argv=None) -> int:
    class Parser(argparse.ArgumentParser):
        def error(self, message):          # one line instead of usage + exit
            raise ValueError(message)

    ap = Parser(prog="python -m bench.ruler", description="Build RULER-style prompts as JSONL (see module doc).")
    ap.add_argument("--out", required=True, help="JSONL file to write")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), metavar="TASK", help=f"default: all of {TASKS}")
    ap.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192])
    ap.add_argument("--n", type=int, default=50, help="samples per (task, length)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--model", help="HF model folder for the tokenizer (default: the embedded SmolLM2-135M-Instruct)")
    try:
        args = ap.parse_args(argv)
        bad = [t for t in args.tasks if t not in TASKS]
        if bad:
            raise ValueError(f"unknown task(s) {bad}; choose from {list(TASKS)}")
        if args.n < 0 or min(args.lengths) <= 0:
            raise ValueError("--n must be >= 0 and --lengths positive")
        out = Path(args.out)
        if not out.parent.is_dir():
            raise ValueError(f"output folder does not exist: {out.parent}")
        if args.model is None:
            from sglang_tca.embedded_model import embedded_model_dir
            args.model = str(embedded_model_dir())
        if not Path(args.model).is_dir():
            raise ValueError(f"--model must be a local Hugging Face model folder, got {args.model}")
        from tqdm import tqdm
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(args.model)
        t0, lines = time.time(), []
        with tqdm(total=len(args.tasks) * len(args.lengths) * args.n, desc="ruler", file=sys.stderr) as bar:
            for task in args.tasks:
                for length in args.lengths:
                    cell = []
                    for s in iter_samples(task, length, args.n, tok, args.seed):
                        cell.append(s)
                        bar.update()
                    mean = sum(s["n_tokens"] for s in cell) / max(len(cell), 1)
                    bar.write(f"{task:16s} {length:6d}: {len(cell)} samples, mean n_tokens {mean:.0f}")
                    lines += [json.dumps(s, ensure_ascii=False) for s in cell]
        out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        print(f"wrote {len(lines)} samples to {out} in {time.time() - t0:.0f} s", file=sys.stderr)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
