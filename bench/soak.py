"""HTTP soak of `python launch.py`: TCA on the embedded SmolLM2, calibrated budgets, freed KV memory, for 10 minutes.

    bash bench/gpu_smollm2.sh bench/soak.py [--duration-s 600] [--concurrency 40] [--seed 0] [...]
        (= python3 bench/soak.py --model /tmp/smollm2 --out $OUT ...; it outlasts one device call, so on the lent
         machine: source .gpu/env.sh && SKIP_GPU_TESTS=1 bash bench/gpu_detached.sh start bash bench/gpu_smollm2.sh
         bench/soak.py, then bash bench/gpu_detached.sh wait until the job has ended; see README)

Server (`server_flags`): launch.py with the shipped budgets, chunked prefill 1024 (long prompts span up to 8
chunks), --max-running-requests 32 and a KV budget of --max-total-tokens 100000 dense tokens, which TCA splits into
a dense pool for 32 windows and a compressed store of about 76K tokens at the budgets' kept share: 40 clients with
prompts up to 7.5K tokens overfill it, so the radix cache evicts and decoding requests are retracted. SGLang's
memory invariant check is strict at idle (its default, set explicitly): a pool that does not add up raises in the
scheduler, which takes the server down. Its busy check stays at its default, off: in SGLang 0.5.17 it counts the
tokens of requests in the last and the running batch only, and under memory pressure a hybrid-SWA scheduler keeps
its chunked request out of the batch (`PrefillAdder.add_chunked_req` returns it unscheduled when no tokens remain),
so the partly filled last page that request holds reads as a leak (the first soak, 2026-12-02: 64 tokens in both
pools, the server stopped 25 s in). A real leak outlives the busy period and is caught at idle, by SGLang's check
and by the soak's own.

Traffic: --concurrency clients send the requests of one fixed-seed schedule (`schedule`, kinds in ROUND): short and
long prompts (20-200 / 3K-7.5K tokens of the held-out essays) on /generate and /v1/chat/completions, streamed or
not; shared documents asked different questions and multi-turn conversations (radix hits); /abort_request before
the first token and after a few streamed events; clients that disconnect at the same two points; malformed requests
(prompt longer than the context, max_new_tokens 10**9, out-of-range sampling parameters, bodies that are not
JSON). Every --idle-every-s the clients stop; once /v1/loads shows nothing running or waiting, the pools are read,
/flush_cache is called and they are read again (`idle_check`: a token in use at idle that no cache holds, or anything
in use after the flush, is a leak). /health is polled every 2 s throughout; the server log is searched for SGLang's
leak reports, process exceptions and retractions.

Results under --out: soak.json, soak.md (verdict and tables), server.log. Pass (`failures`): no crash (the server
process alive and /health never failing for more than 30 s), /health green throughout, no leak (in the idle checks
or SGLang's log), no 5xx, no client-side errors, and every request answered as its kind expects (EXPECTED). What
the load did not reach (no retraction, no eviction, ...) is listed apart (`coverage_gaps`).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import random
import re
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from http_check import start, stop  # noqa: E402
from paired_runs import positive  # noqa: E402

from sglang_tca.config import EMBEDDED_BUDGETS  # noqa: E402

SERVER_ENV = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}      # not DURING_BUSY: see the docstring
ROUND = {                      # kind: requests of that kind in each shuffled round of the schedule
    "short": 6,                # 20-200 prompt tokens on /generate
    "short_stream": 3,
    "chat": 3,                 # /v1/chat/completions, a 20-200 token message
    "chat_stream": 3,
    "long": 5,                 # 3K-7.5K prompt tokens, up to 512 new tokens with ignore_eos (decode grows: retraction)
    "long_stream": 2,
    "shared_prefix": 5,        # one of the corpus' documents + one of QUESTIONS
    "multi_turn": 2,           # 2-3 turns, each resending the conversation so far
    "abort_prefill": 2,        # streamed 5K-7.5K prompt, /abort_request 20-300 ms after sending
    "abort_decode": 2,         # streamed, /abort_request after 2-8 events
    "disconnect_prefill": 2,   # 5K-7.5K prompt, connection closed 30-100 ms after sending
    "disconnect_decode": 2,    # streamed, connection closed after 2-8 events
    "bad_too_long": 1,         # prompt longer than the context
    "bad_huge_max_new": 1,     # max_new_tokens 10**9 or 2**31 - 1
    "bad_sampling": 1,         # an out-of-range sampling parameter (BAD_SAMPLING)
    "bad_json": 1,             # a body that is no JSON request (BAD_BODIES)
}
MALFORMED = ("bad_too_long", "bad_huge_max_new", "bad_sampling", "bad_json")
DECODE_HEAVY = ("long", "long_stream", "abort_decode", "disconnect_decode")     # ignore_eos: they decode max_new
CATEGORIES = ("completed", "aborted", "disconnected", "refused_4xx", "http_5xx", "error")
EXPECTED = {kind: {"completed"} for kind in ROUND}
EXPECTED.update({
    # an abort or a disconnect may come after the request has finished (or, for /abort_request, before the server
    # knows the rid, which it then ignores)
    "abort_prefill": {"aborted", "completed"}, "abort_decode": {"aborted", "completed"},
    "disconnect_prefill": {"disconnected", "completed"}, "disconnect_decode": {"disconnected", "completed"},
    "bad_too_long": {"refused_4xx"}, "bad_sampling": {"refused_4xx"}, "bad_json": {"refused_4xx"},
    # SGLang refuses prompt + max_new_tokens above the context, or clips max_new_tokens with --allow-auto-truncate
    "bad_huge_max_new": {"refused_4xx", "completed"},
})
BAD_SAMPLING = ({"temperature": -1.0}, {"top_p": 2.0}, {"top_k": 0}, {"min_p": 1.5}, {"frequency_penalty": 5.0},
                {"repetition_penalty": 0.0}, {"max_new_tokens": -3}, {"min_new_tokens": 16, "max_new_tokens": 4})
BAD_SAMPLING_CHAT = ({"temperature": -1.0}, {"top_p": 2.0}, {"max_completion_tokens": -3})
BAD_BODIES = (
    ("/generate", b'{"text": "Hello", "sampling_params": {"max_new_tokens": 8'),
    ("/generate", b"text=Hello&max_new_tokens=8"),
    ("/generate", b""),
    ("/generate", b'{"text": "Hello", "sampling_params": {"max_new_tokens": 8}}}'),
    ("/v1/chat/completions", b'{"model": "default", "messages": [{"role": "user", "content": "Hi"}'),
    ("/v1/chat/completions", b'["model", "default"]'),
)
DOC_LENS = (3000, 3800, 4600, 5400)       # shared documents, from the start of the held-out text
QUESTIONS = ("What is the main topic of the text above?", "Who is the author talking to?",
             "Give one example the text uses.", "Summarize the last paragraph in one sentence.",
             "What does the author recommend?", "Name one person the text mentions.",
             "What is the tone of the text?", "What question does the text leave open?")
METRICS = ("sglang:prompt_tokens_total", "sglang:cached_tokens_total", "sglang:num_retracted_requests_total",
           "sglang:evicted_tokens_total", "sglang:num_aborted_requests_total")
LOG_PATTERNS = {               # counted in the server log
    "retraction_events": r"KV cache pool is full\. Retract requests\.",        # scheduler.update_running_batch
    "leak_lines": r"memory leak detected|Mem Leak Detected|KV double free|use-after-free",   # invariant_checker
    "exception_lines": r"hit an exception",          # a scheduler / tokenizer / detokenizer process died
    "tracebacks": r"Traceback \(most recent call last\)",
    "health_check_failed": r"Health check failed",
}
TCA_FIELDS = ("dense_tokens", "dense_used_tokens", "dense_evictable_tokens", "store_pages", "store_used_pages",
              "store_reserved_pages", "records", "logical_tokens", "logical_used_tokens", "store_capacity_tokens")
ZERO_AFTER_FLUSH = ("logical_used_tokens", "dense_used_tokens", "dense_evictable_tokens", "store_used_pages",
                    "store_reserved_pages", "records")
SERVER_ARG_KEYS = ("attention_backend", "page_size", "radix_cache_backend", "disable_radix_cache",
                   "chunked_prefill_size", "max_total_tokens", "max_running_requests", "mem_fraction_static",
                   "context_length", "enable_metrics", "disable_overlap_schedule")
JSON_HEADERS = {"Content-Type": "application/json"}
LOG_LIMIT = 12 * 2 ** 20       # the server log kept under --out (a device call brings back files up to 16 MiB)


@dataclasses.dataclass
class Config:
    duration_s: float = 600.0
    idle_every_s: float = 75.0       # traffic between idle checks
    concurrency: int = 40
    seed: int = 0
    request_timeout_s: float = 180.0
    settle_s: float = 5.0            # after the clients stop: SGLang aborts a disconnected request 2 s later
                                     # (streams) or at its next 4 s wait (tokenizer_manager._wait_one_response)
    idle_wait_s: float = 120.0       # then the longest wait for the server to go idle
    idle_poll_s: float = 0.5         # /v1/loads while waiting for idle
    full_check_wait_s: float = 1.5   # then this long: > TCARadixCache.full_check_after_s, so the server's full store
                                     # check runs on the idle state before the pools are read
    health_every_s: float = 2.0
    health_timeout_s: float = 25.0   # SGLang's /health answers 503 after 20 s without a scheduler output
    health_fail_s: float = 30.0      # /health failing this long counts as a crash
    progress_every_s: float = 30.0


# ---------------------------------------------------------------- schedule and request bodies (pure)

@dataclasses.dataclass(frozen=True)
class Spec:
    """One scheduled request (a multi-turn spec sends `turns`). Its tokens come from the corpus when it is sent
    (`plan`), so the schedule depends on the seed and the context length alone."""
    seq: int
    kind: str
    prompt_len: int = 0
    offset: int = 0              # where the prompt starts in the corpus (modulo its length)
    max_new: int = 8
    stream: bool = False
    chat: bool = False
    doc: int = 0                 # shared_prefix, multi_turn: document and first question
    question: int = 0
    turns: int = 1
    delay_s: float = 0.0         # abort_prefill, disconnect_prefill: act this long after sending
    after_events: int = 0        # abort_decode, disconnect_decode: act after this many streamed events
    variant: int = 0             # bad_sampling, bad_json: which bad parameter or body


def make_spec(rng: random.Random, seq: int, kind: str, context_len: int) -> Spec:
    off = rng.randrange(1 << 30)
    long_max = min(7500, context_len - 512 - 64)
    if kind in ("short", "short_stream", "chat", "chat_stream"):
        return Spec(seq, kind, rng.randint(20, 200), off, rng.choice((8, 32, 64, 128)),
                    stream=kind.endswith("_stream"), chat=kind.startswith("chat"))
    if kind in ("long", "long_stream"):
        return Spec(seq, kind, rng.randint(3000, long_max), off, rng.choice((16, 128, 256, 512)),
                    stream=kind == "long_stream")
    if kind in ("shared_prefix", "multi_turn"):
        return Spec(seq, kind, max_new=rng.choice((16, 32, 48)), doc=rng.randrange(len(DOC_LENS)),
                    question=rng.randrange(len(QUESTIONS)), turns=rng.randint(2, 3) if kind == "multi_turn" else 1)
    if kind in ("abort_prefill", "disconnect_prefill"):
        delay = rng.uniform(0.02, 0.3) if kind == "abort_prefill" else rng.uniform(0.03, 0.1)
        stream = kind == "abort_prefill" or rng.random() < 0.5
        return Spec(seq, kind, rng.randint(5000, long_max), off, 256, stream=stream, delay_s=round(delay, 3))
    if kind in ("abort_decode", "disconnect_decode"):
        return Spec(seq, kind, rng.randint(200, 4000), off, 512, stream=True,
                    chat=kind == "disconnect_decode" and rng.random() < 0.3, after_events=rng.randint(2, 8))
    chat, stream = rng.random() < 0.3, rng.random() < 0.3
    if kind == "bad_too_long":
        return Spec(seq, kind, context_len + rng.randint(200, 2000), off, 8, stream=stream, chat=chat)
    if kind == "bad_huge_max_new":
        return Spec(seq, kind, rng.randint(20, 200), off, rng.choice((10 ** 9, 2 ** 31 - 1)), stream=stream, chat=chat)
    if kind == "bad_sampling":
        return Spec(seq, kind, rng.randint(20, 200), off, 8, stream=stream, chat=chat,
                    variant=rng.randrange(len(BAD_SAMPLING_CHAT if chat else BAD_SAMPLING)))
    if kind == "bad_json":
        return Spec(seq, kind, variant=rng.randrange(len(BAD_BODIES)))
    raise ValueError(f"unknown request kind {kind!r}")


def schedule(seed: int, context_len: int) -> Iterator[Spec]:
    """The endless request schedule of `seed`: rounds of ROUND's kinds, each round shuffled, so every round holds
    every kind."""
    rng = random.Random(seed)
    seq = 0
    while True:
        kinds = [kind for kind, n in ROUND.items() for _ in range(n)]
        rng.shuffle(kinds)
        for kind in kinds:
            yield make_spec(rng, seq, kind, context_len)
            seq += 1


@dataclasses.dataclass
class Corpus:
    ids: list[int]                          # token ids of the held-out essays
    decode: Callable[[list[int]], str]
    docs: list[list[int]]
    questions: list[list[int]]
    context_len: int

    def slice(self, offset: int, n: int) -> list[int]:
        if n > len(self.ids):
            raise ValueError(f"a {n}-token prompt from a corpus of {len(self.ids)} tokens")
        start = offset % (len(self.ids) - n + 1)
        return self.ids[start:start + n]


def make_corpus(ids: list[int], decode, encode, context_len: int) -> Corpus:
    docs = [ids[i * 6000:i * 6000 + n] for i, n in enumerate(DOC_LENS)]
    return Corpus(ids, decode, docs, [encode(f"\n\nQuestion: {q} Answer:") for q in QUESTIONS], context_len)


@dataclasses.dataclass
class Plan:
    path: str
    body: dict | bytes           # bytes: sent as is (bad_json)
    stream: bool
    rid: str | None = None


def plan(spec: Spec, corpus: Corpus, ids: list[int] | None = None) -> Plan:
    """The HTTP request of `spec`; `ids` is the prompt of a multi-turn spec's later turn."""
    if spec.kind == "bad_json":
        path, raw = BAD_BODIES[spec.variant]
        return Plan(path, raw, False)
    if ids is None:
        ids = (corpus.docs[spec.doc] + corpus.questions[spec.question] if spec.kind in ("shared_prefix", "multi_turn")
               else corpus.slice(spec.offset, spec.prompt_len))
    rid = f"soak-{spec.seq}" if spec.kind.startswith("abort_") else None
    extra = {"ignore_eos": True} if spec.kind in DECODE_HEAVY else {}
    if spec.chat:
        body = {"model": "default", "messages": [{"role": "user", "content": corpus.decode(ids)}],
                "max_completion_tokens": spec.max_new, "stream": spec.stream, **extra}
        body.update(BAD_SAMPLING_CHAT[spec.variant] if spec.kind == "bad_sampling" else {"temperature": 0})
        return Plan("/v1/chat/completions", body, spec.stream, rid)
    sampling = {"max_new_tokens": spec.max_new, **extra}
    # bad_sampling keeps SGLang's default temperature: at temperature 0 it would set top_k to 1 before checking
    sampling.update(BAD_SAMPLING[spec.variant] if spec.kind == "bad_sampling" else {"temperature": 0})
    body = {"input_ids": ids, "sampling_params": sampling, "stream": spec.stream}
    if rid is not None:
        body["rid"] = rid
    return Plan("/generate", body, spec.stream, rid)


# ---------------------------------------------------------------- outcomes, accounting and verdict (pure)

@dataclasses.dataclass
class Outcome:
    category: str                # one of CATEGORIES
    detail: str = ""
    status: int | None = None
    cached_tokens: int = 0
    output_ids: list[int] = dataclasses.field(default_factory=list)


def finish_reason(event) -> tuple[str, int | None] | None:
    """(type, status code) of a response's finish reason: native meta_info.finish_reason or OpenAI's
    choices[0].finish_reason; None while unfinished."""
    if not isinstance(event, dict):
        return None
    fr = (event.get("meta_info") or {}).get("finish_reason")
    if isinstance(fr, dict):
        return str(fr.get("type")), fr.get("status_code") if isinstance(fr.get("status_code"), int) else None
    choices = event.get("choices") or [{}]
    fr = choices[0].get("finish_reason") if isinstance(choices[0], dict) else None
    return (str(fr), None) if fr else None


def _brief(events) -> str:
    return json.dumps(events[0] if events else None, default=str)[:300]


def classify(status: int | None, events: list, error: str | None = None) -> Outcome:
    """What a request came to, from its HTTP status and JSON payloads (one for a plain response, one per event of
    a stream) or the client-side error that ended it. A stream that SGLang answered with 200 can still carry a
    refusal ({"error": {"code": ...}}) or an abort with a status code (meta_info.finish_reason.status_code)."""
    if error is not None:
        return Outcome("error", error, status)
    if status is None or not (status == 200 or 400 <= status < 600):
        return Outcome("error", f"HTTP {status}", status)
    if status >= 500:
        return Outcome("http_5xx", _brief(events), status)
    if status >= 400:
        return Outcome("refused_4xx", _brief(events), status)
    for ev in events:
        if isinstance(ev, dict) and "error" in ev:
            err = ev["error"] if isinstance(ev["error"], dict) else {}
            code = err.get("code") if isinstance(err.get("code"), int) else 400
            return Outcome("http_5xx" if code >= 500 else "refused_4xx", json.dumps(ev)[:300], code)
    reasons = [r for r in map(finish_reason, events) if r is not None]
    if not reasons:
        return Outcome("error", "no finish reason (truncated response): " + _brief(events[-1:]), status)
    kind, code = reasons[-1]
    if kind == "abort" and code is not None and code >= 400:
        return Outcome("http_5xx" if code >= 500 else "refused_4xx", f"abort with status {code}", code)
    last = events[-1] if isinstance(events[-1], dict) else {}
    cached = (last.get("meta_info") or {}).get("cached_tokens") or \
        ((last.get("usage") or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return Outcome("aborted" if kind == "abort" else "completed", kind, status, int(cached),
                   list(last.get("output_ids") or []))


class Tally:
    """Counts per request kind: sent, each category, unexpected outcomes (not in EXPECTED), radix hits."""

    def __init__(self):
        self.kinds = {kind: Counter() for kind in ROUND}
        self.examples: dict[str, list] = {"unexpected": [], "http_5xx": [], "error": []}

    def add(self, kind: str, seq: int, out: Outcome) -> None:
        c = self.kinds[kind]
        c["sent"] += 1
        c[out.category] += 1
        if out.cached_tokens:
            c["radix_hits"] += 1
            c["cached_tokens"] += out.cached_tokens
        expected = out.category in EXPECTED[kind]
        c["unexpected"] += not expected
        example = {"kind": kind, "seq": seq, "category": out.category, "status": out.status, "detail": out.detail}
        for key, hit in (("unexpected", not expected), ("http_5xx", out.category == "http_5xx"),
                         ("error", out.category == "error")):
            if hit and len(self.examples[key]) < 20:
                self.examples[key].append(example)

    def total(self, key: str) -> int:
        return sum(c[key] for c in self.kinds.values())


def idle_check(loads_used: int, before: dict, after: dict, flushed: bool = True) -> dict:
    """The pools of one idle server (nothing running or waiting). Before the flush every token in use must be
    cached: SGLang's tokens in use (/v1/loads num_used_tokens: neither free, cached nor held back for the store)
    are 0, TCA's dense slots in use are the radix cache's dense windows, and no store page is reserved. /flush_cache
    resets the radix cache and the pools (SGLang's Scheduler.flush_cache), after which nothing is in use at all.
    leaked_tokens: tokens unaccounted for before the flush plus those in use after it; leaked_store_pages: store
    pages reserved before the flush plus those in use or reserved after it."""
    dense_unaccounted = before["dense_used_tokens"] - before["dense_evictable_tokens"]
    problems = []
    if loads_used:
        problems.append(f"before flush: {loads_used} tokens in use (/v1/loads num_used_tokens)")
    if dense_unaccounted:
        problems.append(f"before flush: {before['dense_used_tokens']} dense slots in use != "
                        f"{before['dense_evictable_tokens']} in cached windows")
    if before["store_reserved_pages"]:
        problems.append(f"before flush: {before['store_reserved_pages']} store pages reserved")
    if not flushed:
        problems.append("/flush_cache refused on an idle server")
    problems += [f"after flush: {k} = {after[k]}" for k in ZERO_AFTER_FLUSH if after.get(k)]
    return {"ok": not problems, "problems": problems, "loads_used_tokens": loads_used,
            "leaked_tokens": max(loads_used, dense_unaccounted, 0) + after["logical_used_tokens"]
            + after["dense_used_tokens"],
            "leaked_store_pages": before["store_reserved_pages"] + after["store_used_pages"]
            + after["store_reserved_pages"],
            "before": {k: before.get(k) for k in TCA_FIELDS}, "after": {k: after.get(k) for k in TCA_FIELDS}}


def scan_log(text: str) -> dict:
    """LOG_PATTERNS' counts in the server log, the requests retracted (#retracted_reqs) and a few example lines."""
    out = {name: len(re.findall(pat, text)) for name, pat in LOG_PATTERNS.items()}
    out["retracted_requests"] = sum(int(n) for n in re.findall(r"#retracted_reqs: (\d+)", text))
    bad = re.compile("|".join(LOG_PATTERNS[k] for k in ("leak_lines", "exception_lines", "tracebacks")))
    out["examples"] = [line[:400] for line in text.splitlines() if bad.search(line)][:10]
    return out


def prom_sum(text: str, name: str) -> float | None:
    """The sum of a Prometheus metric's samples over its label sets; None when absent."""
    values = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([-+0-9.eE]+|NaN)$", text, re.MULTILINE)
    return sum(float(v) for v in values) if values else None


def failures(r: dict) -> list[str]:
    """The issue's pass criteria that the report `r` misses."""
    out = []
    if r["crashes"]:
        out.append(f"crash: {r['crash_reason']}")
    if r["health_failures"]:
        out.append(f"/health failed {r['health_failures']} times (longest gap {r['health_longest_gap_s']} s)")
    if r["leaked_tokens"] or r["leaked_store_pages"]:
        out.append(f"leak: {r['leaked_tokens']} tokens, {r['leaked_store_pages']} store pages")
    out += [f"server log: {r['log'][key]} {key.replace('_', ' ')}"
            for key in ("leak_lines", "exception_lines", "health_check_failed") if r["log"].get(key)]
    out += [f"{r[key]} {what}" for key, what in (
        ("http_5xx", "5xx answers"), ("errors", "client-side errors (connection, timeout, stream cut)"),
        ("unexpected", "answers not as the request kind expects")) if r[key]]
    out += [f"idle check {i} at {c['t_s']} s: {'; '.join(c['problems'])}"
            for i, c in enumerate(r["idle_checks"], 1) if not c["ok"]]
    if not r["crashes"]:
        out += [what for key, what in (("requests", "no request was sent"), ("idle_checks", "no idle check ran"))
                if not r[key]]
    return out


def coverage_gaps(r: dict) -> list[str]:
    """What the load did not exercise: reported, not a failure."""
    kinds = r["per_kind"]
    gaps = [f"no {kind} request was sent" for kind in ROUND if not kinds[kind].get("sent")]
    if not r["crashes"] and r["duration_s"] < r["duration_target_s"]:
        gaps.append(f"it ran {r['duration_s']} s, less than its target {r['duration_target_s']} s")
    if not r["retraction_events"]:
        gaps.append("the load forced no retraction")
    if not r["evicted_tokens"]:
        gaps.append("the radix cache evicted nothing (or sglang:evicted_tokens_total is missing)")
    if not kinds["shared_prefix"].get("radix_hits") and not kinds["multi_turn"].get("radix_hits"):
        gaps.append("no radix hit on shared prefixes or conversations")
    for pair, cat in ((("abort_prefill", "abort_decode"), "aborted"),
                      (("disconnect_prefill", "disconnect_decode"), "disconnected")):
        if not any(kinds[k].get(cat) for k in pair):
            gaps.append(f"no request ended {cat}")
    return gaps


def verdict(r: dict) -> dict:
    failed = failures(r)
    return {"pass": not failed, "failures": failed, "coverage_gaps": coverage_gaps(r) if r["requests"] else []}


def build_report(meta: dict, tally: Tally, run: dict, idle_checks: list, log: dict, metrics: dict) -> dict:
    """soak.json: meta (date, device, sglang_version, server_flags, command, ...), run (duration_s, crash_reason,
    health_*), the tallies, the idle checks, the server log's counts and the server metrics' deltas."""
    r = dict(meta)
    r.update(run)
    r["crashes"] = int(r["crash_reason"] is not None)
    r["requests"] = tally.total("sent")
    for cat in CATEGORIES:
        r["errors" if cat == "error" else cat] = tally.total(cat)
    r["unexpected"] = tally.total("unexpected")
    r["leaked_tokens"] = max((c["leaked_tokens"] for c in idle_checks), default=0)
    r["leaked_store_pages"] = max((c["leaked_store_pages"] for c in idle_checks), default=0)
    r["retraction_events"] = log.get("retraction_events", 0)
    r["retracted_requests"] = log.get("retracted_requests", 0)
    r["evicted_tokens"] = metrics.get("sglang:evicted_tokens_total")
    prompt, cached = metrics.get("sglang:prompt_tokens_total"), metrics.get("sglang:cached_tokens_total")
    r["cache_hit_rate"] = round(cached / prompt, 4) if prompt and cached is not None else None
    r["metrics"] = metrics
    r["per_kind"] = {kind: dict(c) for kind, c in tally.kinds.items()}
    r["examples"] = tally.examples
    r["idle_checks"] = idle_checks
    r["log"] = log
    r["verdict"] = verdict(r)
    return r


def _summary_rows(r: dict) -> list[tuple[str, str]]:
    log = r["log"]
    return [
        ("duration", (f"{r['duration_s']} s of traffic and idle checks (target {r['duration_target_s']} s); "
                      f"server start {r['server_start_s']} s")),
        ("requests sent", (f"{r['requests']}: {r['completed']} completed, {r['aborted']} aborted "
                           f"(/abort_request), {r['disconnected']} client disconnects, {r['refused_4xx']} refused "
                           f"with 4xx, {r['http_5xx']} 5xx, {r['errors']} client-side errors, {r['unexpected']} not "
                           "as expected")),
        ("crashes", f"{r['crashes']}" + (f" ({r['crash_reason']})" if r["crash_reason"] else "")),
        ("/health", (f"{r['health_checks']} probes, {r['health_failures']} failed, longest gap between successes "
                     f"{r['health_longest_gap_s']} s")),
        ("leaks (worst idle check)", (f"{r['leaked_tokens']} tokens, {r['leaked_store_pages']} store pages; server "
                                      f"log: {log.get('leak_lines', 0)} leak lines, {log.get('exception_lines', 0)} "
                                      f"process exceptions, {log.get('tracebacks', 0)} tracebacks")),
        ("retraction", f"{r['retraction_events']} events, {r['retracted_requests']} requests retracted"),
        ("radix cache", (f"hit rate {r['cache_hit_rate']} (cached / prompt tokens), {r['evicted_tokens']} tokens "
                         "evicted (sglang:evicted_tokens_total)")),
        ("TCA memory at start", json.dumps(r.get("tca_start"))),
        ("server arguments", json.dumps(r.get("server_args"))),
    ]


def _idle_row(i: int, c: dict) -> str:
    b, a = c.get("before") or {}, c.get("after") or {}
    after = ", ".join(str(a.get(k)) for k in ("logical_used_tokens", "dense_used_tokens", "store_used_pages",
                                              "records")) if a else "-"
    return (f"| {i} | {c['t_s']} | {c.get('loads_used_tokens', '-')} | {b.get('dense_used_tokens', '-')} / "
            f"{b.get('dense_evictable_tokens', '-')} | {b.get('store_used_pages', '-')} / "
            f"{b.get('store_reserved_pages', '-')} | {b.get('records', '-')} | {after} | "
            f"{'yes' if c['ok'] else 'NO: ' + '; '.join(c['problems'])} |")


def render_md(r: dict) -> str:
    v, cols = r["verdict"], ("sent", *CATEGORIES, "unexpected", "radix_hits")
    env = " ".join(f"{k}={x}" for k, x in SERVER_ENV.items())
    lines = [f"# HTTP soak ({r['date']}, {r['device']}, sglang {r['sglang_version']})", "",
             f"command: `{r['command']}`", "",
             (f"server: `python launch.py --model DIR --tca-budgets {r['budgets']} {' '.join(r['server_flags'])}` "
              f"(started by bench/http_check.start; env {env})"), "",
             f"**Verdict: {'PASS' if v['pass'] else 'FAIL'}**", *(f"- {f}" for f in v["failures"]), ""]
    if v["coverage_gaps"]:
        lines += ["Not exercised: " + "; ".join(v["coverage_gaps"]), ""]
    lines += ["| | |", "|---|---|", *(f"| {a} | {b} |" for a, b in _summary_rows(r)), "",
              "## Requests by kind", "", "| kind | " + " | ".join(cols) + " | expected |",
              "|---|" + "---:|" * len(cols) + "---|"]
    lines += [f"| {k} | " + " | ".join(str(c.get(col, 0)) for col in cols) + f" | {', '.join(sorted(EXPECTED[k]))} |"
              for k, c in r["per_kind"].items()]
    lines += ["", "## Idle checks", "",
              ("Nothing running or waiting. Before /flush_cache: SGLang's tokens in use (/v1/loads num_used_tokens), "
               "TCA's dense slots in use / in cached windows, store pages in use / reserved, records. After it: "
               "logical ids, dense slots, store pages in use and records (all must be 0). Leaked tokens: in use "
               "before the flush but not cached, plus in use after it."), "",
              "| # | t (s) | loads used | dense used / cached | store used / reserved | records | after flush | ok |",
              "|---:|---:|---:|---|---|---:|---|---|", *(_idle_row(i, c) for i, c in enumerate(r["idle_checks"], 1))]
    for key, examples in (r.get("examples") or {}).items():
        if examples:
            lines += ["", f"## First {key} answers", "", *(f"- {json.dumps(e)}" for e in examples)]
    if r["log"].get("examples"):
        lines += ["", "## Server log lines", "", *(f"    {line}" for line in r["log"]["examples"])]
    return "\n".join(lines) + "\n"


def write_report(r: dict, out: Path) -> None:
    (out / "soak.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
    (out / "soak.md").write_text(render_md(r))


# ---------------------------------------------------------------- HTTP client

def _payload(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text[:300]


def _sse(line: bytes):
    line = line.strip()
    if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
        return None
    return json.loads(line[5:])


class Client:
    """The server's HTTP API over one aiohttp session (a new connection per request, so that closing one is a
    disconnect the server sees)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, request_timeout_s: float):
        self.session, self.url = session, url
        self.timeout = aiohttp.ClientTimeout(total=request_timeout_s, sock_connect=10)

    async def send(self, p: Plan, close_after: int | None = None, abort_after: int | None = None) -> Outcome:
        """Send one request; for a stream, close the connection (`close_after`) or call /abort_request
        (`abort_after`) once that many events have come."""
        kw = {"data": p.body, "headers": JSON_HEADERS} if isinstance(p.body, bytes) else {"json": p.body}
        status, events, abort_status = None, [], None
        try:
            async with self.session.post(self.url + p.path, timeout=self.timeout, **kw) as resp:
                status = resp.status
                if not (p.stream and status == 200 and resp.content_type == "text/event-stream"):
                    events = [_payload(await resp.text())]
                else:
                    async for line in resp.content:
                        ev = _sse(line)
                        if ev is None:
                            continue
                        events.append(ev)
                        if len(events) == close_after:
                            resp.close()
                            return Outcome("disconnected", f"closed after {close_after} events", status)
                        if len(events) == abort_after:
                            abort_status = await self.abort(p.rid)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            return classify(status, events, f"{type(e).__name__}: {e}"[:300])
        return _with_abort(classify(status, events), abort_status)

    async def abort(self, rid: str) -> int:
        """/abort_request's HTTP status; 0 when the call itself failed (connection, timeout)."""
        try:
            async with self.session.post(self.url + "/abort_request", json={"rid": rid},
                                         timeout=self.timeout) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return 0

    async def get(self, path: str, timeout: float = 30.0):
        async with self.session.get(self.url + path, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise RuntimeError(f"GET {path}: HTTP {resp.status}: {text[:300]}")
            return _payload(text) if resp.content_type == "application/json" else text

    async def loads(self) -> dict:
        data = await self.get("/v1/loads")
        loads = data.get("loads") or []
        if not loads:
            raise RuntimeError("/v1/loads lists no scheduler")
        return {"running": sum(x.get("num_running_reqs", 0) for x in loads),
                "waiting": sum(x.get("num_waiting_reqs", 0) for x in loads),
                "used_tokens": sum(x.get("num_used_tokens", 0) for x in loads),
                "accelerator": data.get("accelerator"), "version": data.get("version")}

    async def server_info(self) -> dict:
        return await self.get("/server_info")

    async def tca(self) -> dict:
        return (await self.server_info())["internal_states"][0]["tca"]

    async def flush(self, tries: int = 20) -> bool:
        for _ in range(tries):                   # refused (400) while anything runs or waits
            async with self.session.post(self.url + "/flush_cache", timeout=self.timeout) as resp:
                await resp.read()
                if resp.status == 200:
                    return True
            await asyncio.sleep(0.5)
        return False

    async def health(self, timeout: float) -> bool:
        try:
            async with self.session.get(self.url + "/health",
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def metrics(self) -> dict:
        text = await self.get("/metrics")
        return {name: prom_sum(text, name) for name in METRICS}


def _with_abort(out: Outcome, abort_status: int | None) -> Outcome:
    """A failed /abort_request call is the request's outcome."""
    if abort_status in (None, 200):
        return out
    return Outcome("http_5xx" if abort_status >= 500 else "error",
                   f"/abort_request: {f'HTTP {abort_status}' if abort_status else 'no answer'}", abort_status or None)


async def run_spec(client: Client, spec: Spec, corpus: Corpus) -> list[tuple[str, Outcome]]:
    """Send `spec`'s request(s) the way its kind says; (kind, outcome) per HTTP request."""
    p = plan(spec, corpus)
    if spec.kind == "multi_turn":
        outs, ids = [], p.body["input_ids"]
        for turn in range(spec.turns):
            out = await client.send(plan(spec, corpus, ids))
            outs.append((spec.kind, out))
            if out.category != "completed":
                break
            ids = ids + out.output_ids + corpus.questions[(spec.question + turn + 1) % len(corpus.questions)]
        return outs
    if spec.kind == "abort_prefill":
        task = asyncio.create_task(client.send(p))
        await asyncio.sleep(spec.delay_s)
        status = await client.abort(p.rid)
        out = _with_abort(await task, status)
    elif spec.kind == "disconnect_prefill":
        try:
            out = await asyncio.wait_for(client.send(p), spec.delay_s)
        except asyncio.TimeoutError:
            out = Outcome("disconnected", f"closed {spec.delay_s * 1000:.0f} ms after sending")
    elif spec.kind == "abort_decode":
        out = await client.send(p, abort_after=spec.after_events)
    elif spec.kind == "disconnect_decode":
        out = await client.send(p, close_after=spec.after_events)
    else:
        out = await client.send(p)
    return [(spec.kind, out)]


# ---------------------------------------------------------------- the soak

class State:
    """What the clients, the /health poller and the idle checks share."""

    def __init__(self):
        self.crash_reason: str | None = None
        self.crashed = asyncio.Event()
        self.health_lock = asyncio.Lock()      # held by each /health probe, and by an idle check's reads and flush
        self.health_checks = self.health_failures = 0
        self.longest_gap_s = 0.0
        self.last_ok = time.monotonic()
        self.done = False

    def crash(self, reason: str) -> None:
        if self.crash_reason is None:
            self.crash_reason = reason
            print(f"[soak] CRASH: {reason}", flush=True)
        self.crashed.set()


async def health_loop(client: Client, state: State, cfg: Config, alive: Callable[[], str | None]) -> None:
    """/health every cfg.health_every_s; the server process gone, or /health failing for cfg.health_fail_s, is a
    crash."""
    while not state.done:
        reason = alive()
        if reason is not None:
            state.crash(reason)
            return
        t = time.monotonic()
        async with state.health_lock:
            ok = await client.health(cfg.health_timeout_s)
        now = time.monotonic()
        state.health_checks += 1
        if ok:
            state.longest_gap_s = max(state.longest_gap_s, now - state.last_ok)
            state.last_ok = now
        else:
            state.health_failures += 1
            if now - state.last_ok > cfg.health_fail_s:
                state.crash(f"/health failing for {now - state.last_ok:.0f} s")
                return
        await asyncio.sleep(max(0.0, cfg.health_every_s - (now - t)))


async def traffic(client: Client, sched: Iterator[Spec], corpus: Corpus, tally: Tally, until: float, cfg: Config,
                  state: State) -> None:
    """cfg.concurrency clients, each sending the schedule's next request until `until` (or a crash)."""
    async def worker():
        while time.monotonic() < until and not state.crashed.is_set():
            spec = next(sched)
            try:
                outs = await run_spec(client, spec, corpus)
            except Exception as e:  # noqa: BLE001 - a bug of this client: counted as an error, the soak goes on
                outs = [(spec.kind, Outcome("error", f"soak client: {type(e).__name__}: {e}"[:300]))]
            for kind, out in outs:
                tally.add(kind, spec.seq, out)

    workers = asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
    crashed = asyncio.create_task(state.crashed.wait())
    await asyncio.wait([workers, crashed], return_when=asyncio.FIRST_COMPLETED)
    if not workers.done():                       # crashed: requests in flight are not counted
        workers.cancel()
        await asyncio.gather(workers, return_exceptions=True)
    crashed.cancel()


async def wait_idle(client: Client, state: State, timeout_s: float, poll_s: float) -> bool:
    """True once /v1/loads shows nothing running or waiting three times in a row, `poll_s` apart (a request
    between two prefill chunks is in neither count, but not for long)."""
    end, streak = time.monotonic() + timeout_s, 0
    while time.monotonic() < end and not state.crashed.is_set():
        try:
            loads = await client.loads()
            streak = streak + 1 if loads["running"] == 0 and loads["waiting"] == 0 else 0
        except Exception:  # noqa: BLE001 - busy or restarting: poll again
            streak = 0
        if streak >= 3:
            return True
        await asyncio.sleep(poll_s)
    return False


async def idle_period(client: Client, state: State, cfg: Config, t_s: float) -> dict:
    """One idle check (`idle_check`) once the server has gone idle, or why there was none."""
    await asyncio.sleep(cfg.settle_s)
    if not await wait_idle(client, state, cfg.idle_wait_s, cfg.idle_poll_s):
        return {"t_s": t_s, "ok": False, "problems": [f"the server did not go idle in {cfg.idle_wait_s:.0f} s"],
                "leaked_tokens": 0, "leaked_store_pages": 0}
    try:
        async with state.health_lock:            # no /health probe (a 1-token request) between the reads
            await wait_idle(client, state, 10.0, cfg.idle_poll_s)     # the last probe's request
            await asyncio.sleep(cfg.full_check_wait_s)
            loads, before = await client.loads(), await client.tca()
            flushed = await client.flush()
            after = await client.tca()
    except Exception as e:  # noqa: BLE001 - e.g. the server died meanwhile
        return {"t_s": t_s, "ok": False, "problems": [f"reading the pools: {type(e).__name__}: {e}"[:300]],
                "leaked_tokens": 0, "leaked_store_pages": 0}
    check = {"t_s": t_s, **idle_check(loads["used_tokens"], before, after, flushed)}
    print(f"[soak] idle check at {t_s:.0f}s: {'ok' if check['ok'] else check['problems']}; before flush "
          f"{check['before']}", flush=True)
    return check


async def progress_loop(tally: Tally, state: State, checks: list, cfg: Config, t0: float, log_path: Path | None):
    while not state.done:
        await asyncio.sleep(cfg.progress_every_s)
        log = scan_log(await asyncio.to_thread(log_path.read_text, errors="replace")) if log_path else {}
        print(f"[soak] {time.monotonic() - t0:4.0f}s sent {tally.total('sent')}: "
              + ", ".join(f"{c} {tally.total(c)}" for c in CATEGORIES)
              + f", unexpected {tally.total('unexpected')} | /health {state.health_checks} probes, "
              f"{state.health_failures} failed | idle checks {len(checks)} ({sum(not c['ok'] for c in checks)} bad)"
              f" | retractions {log.get('retraction_events', '-')}, leak lines {log.get('leak_lines', '-')}",
              flush=True)


async def soak(url: str, corpus: Corpus, cfg: Config, alive: Callable[[], str | None],
               log_path: Path | None = None) -> tuple[dict, Tally, list, dict, dict]:
    """Traffic and idle checks against a running server for cfg.duration_s. Returns (meta read from the server,
    tally, idle checks, run facts, metrics deltas)."""
    state, tally, checks = State(), Tally(), []
    connector = aiohttp.TCPConnector(force_close=True, limit=cfg.concurrency + 16)
    async with aiohttp.ClientSession(connector=connector, read_bufsize=2 ** 22) as session:
        client = Client(session, url, cfg.request_timeout_s)
        info, loads, metrics0 = await client.server_info(), await client.loads(), await client.metrics()
        meta = {"device": loads["accelerator"] or "unknown", "sglang_version": loads["version"] or info.get("version"),
                "server_args": {k: info[k] for k in SERVER_ARG_KEYS if k in info},
                "tca_start": {k: info["internal_states"][0].get("tca", {}).get(k) for k in TCA_FIELDS}}
        print(f"[soak] {cfg.duration_s:.0f} s, {cfg.concurrency} clients, idle check every {cfg.idle_every_s:.0f} s; "
              f"device {meta['device']}, TCA memory {meta['tca_start']}", flush=True)
        t0 = time.monotonic()
        tasks = [asyncio.create_task(health_loop(client, state, cfg, alive)),
                 asyncio.create_task(progress_loop(tally, state, checks, cfg, t0, log_path))]
        sched = schedule(cfg.seed, corpus.context_len)
        traffic_end = t0 + cfg.duration_s          # the last idle check follows it: the soak lasts at least duration_s
        while not state.crashed.is_set():
            await traffic(client, sched, corpus, tally, min(time.monotonic() + cfg.idle_every_s, traffic_end), cfg,
                          state)
            if state.crashed.is_set():
                break
            check = await idle_period(client, state, cfg, round(time.monotonic() - t0, 1))
            if state.crashed.is_set():           # the crash is the finding, not the check it interrupted
                break
            checks.append(check)
            if time.monotonic() >= traffic_end:
                break
        duration = round(time.monotonic() - t0, 1)
        state.done = True
        state.longest_gap_s = max(state.longest_gap_s, time.monotonic() - state.last_ok)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if state.crash_reason is None and (reason := alive()) is not None:
            state.crash(reason)
        try:
            metrics1 = await client.metrics()
            metrics = {k: None if metrics1[k] is None else metrics1[k] - (metrics0[k] or 0) for k in METRICS}
        except Exception as e:  # noqa: BLE001 - a crashed server has no metrics
            metrics = {"error": f"{type(e).__name__}: {e}"[:300]}
    run = {"duration_s": duration, "duration_target_s": cfg.duration_s, "crash_reason": state.crash_reason,
           "health_checks": state.health_checks, "health_failures": state.health_failures,
           "health_longest_gap_s": round(state.longest_gap_s, 1)}
    return meta, tally, checks, run, metrics


# ---------------------------------------------------------------- server and command line

def server_flags(max_total_tokens: int, max_running_requests: int) -> list[str]:
    # --cuda-graph-max-bs-decode after http_check.start's 8 (the last one counts): every decode batch under a graph
    return ["--chunked-prefill-size", "1024", "--max-total-tokens", str(max_total_tokens),
            "--max-running-requests", str(max_running_requests), "--cuda-graph-max-bs-decode",
            str(max_running_requests), "--enable-metrics"]


def load_corpus(model: str) -> Corpus:
    from transformers import AutoTokenizer

    from sglang_tca.essays import essay_split

    tok = AutoTokenizer.from_pretrained(model)
    context = json.loads((Path(model) / "config.json").read_text()).get("max_position_embeddings", 8192)
    ids = tok(essay_split("heldout"), add_special_tokens=False).input_ids
    return make_corpus(ids, tok.decode, lambda s: tok(s, add_special_tokens=False).input_ids, context)


def cap_log(path: Path, limit: int = LOG_LIMIT) -> None:
    """Keep the first 2 MiB and the rest of `limit` from the end of a log larger than `limit`."""
    data = path.read_bytes()
    if len(data) > limit:
        head = 2 * 2 ** 20
        path.write_bytes(data[:head] + f"\n[... {len(data) - limit} bytes cut by soak.py ...]\n".encode()
                         + data[-(limit - head):])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the converted SmolLM2 folder (gpu_smollm2.sh: /tmp/smollm2)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/soak"), help="where soak.json, soak.md, server.log go")
    ap.add_argument("--budgets", default=str(EMBEDDED_BUDGETS), help="TCA budgets (default: the shipped calibration)")
    ap.add_argument("--duration-s", type=positive(float), default=600.0, help="traffic and idle checks (default 600)")
    ap.add_argument("--idle-every-s", type=positive(float), default=75.0, help="traffic between idle checks")
    ap.add_argument("--concurrency", type=positive(int), default=40, help="clients sending at once (default 40)")
    ap.add_argument("--seed", type=int, default=0, help="the request schedule's seed")
    ap.add_argument("--port", type=positive(int), default=30113)
    ap.add_argument("--max-total-tokens", type=positive(int), default=100000,
                    help="SGLang's KV budget in dense tokens, which TCA splits (default 100000: store ~76K tokens)")
    ap.add_argument("--max-running-requests", type=positive(int), default=32)
    ap.add_argument("--request-timeout-s", type=positive(float), default=180.0)
    args = ap.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        ap.error(f"--model {args.model}: no config.json there (bench/gpu_smollm2.sh joins the model into /tmp/smollm2)")
    if not Path(args.budgets).is_file():
        ap.error(f"--budgets {args.budgets}: no such file")
    if args.duration_s < 120:
        ap.error(f"--duration-s {args.duration_s:g}: at least 120 for two traffic periods and their idle checks")
    if args.idle_every_s >= args.duration_s:
        ap.error(f"--idle-every-s {args.idle_every_s:g} leaves no second idle period in --duration-s "
                 f"{args.duration_s:g}")
    return args


def failed_start(reason: str, cfg: Config) -> tuple[dict, Tally, list, dict, dict]:
    """soak()'s result when no server came up: a crash at start."""
    run = {"duration_s": 0, "duration_target_s": cfg.duration_s, "crash_reason": f"server start: {reason}",
           "health_checks": 0, "health_failures": 0, "health_longest_gap_s": 0}
    return {"device": "unknown", "sglang_version": None}, Tally(), [], run, {}


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = Config(duration_s=args.duration_s, idle_every_s=args.idle_every_s, concurrency=args.concurrency,
                 seed=args.seed, request_timeout_s=args.request_timeout_s)
    flags = server_flags(args.max_total_tokens, args.max_running_requests)
    meta = {"date": str(datetime.date.today()), "budgets": args.budgets, "server_flags": flags,
            "server_env": SERVER_ENV, "seed": args.seed, "concurrency": args.concurrency,
            "command": "python bench/soak.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))}
    corpus = load_corpus(args.model)
    os.environ.update(SERVER_ENV)                # the server process inherits them
    log_path = out / "server.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        try:
            proc, url = start(args.model, args.budgets, args.port, flags, log)
        except RuntimeError as e:
            meta["server_start_s"] = round(time.monotonic() - t0, 1)
            result = failed_start(str(e), cfg)
        else:
            meta["server_start_s"] = round(time.monotonic() - t0, 1)
            print(f"[soak] server up in {meta['server_start_s']} s", flush=True)
            try:
                result = asyncio.run(soak(url, corpus, cfg, lambda: None if proc.poll() is None else
                                          f"server exited with code {proc.returncode}", log_path))
            finally:
                stop(proc)
    server_meta, tally, checks, run, metrics = result
    log_scan = scan_log(log_path.read_text(errors="replace"))
    cap_log(log_path)
    report = build_report({**meta, **server_meta}, tally, run, checks, log_scan, metrics)
    write_report(report, out)
    print(render_md(report), flush=True)
    return 0 if report["verdict"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
