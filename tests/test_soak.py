"""bench/soak.py without a GPU: the schedule, the request bodies, outcome classification, the idle checks' leak
accounting, the verdict, the report files, and a 3-second soak against a fake SGLang HTTP server."""
import asyncio
import json
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import islice
from pathlib import Path
from typing import ClassVar

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import soak  # noqa: E402

CONTEXT = 8192
REQUIRED_FIELDS = ("date", "device", "duration_s", "requests", "completed", "aborted", "disconnected", "refused_4xx",
                   "http_5xx", "errors", "unexpected", "crashes", "leaked_tokens", "leaked_store_pages",
                   "health_failures", "health_longest_gap_s", "retraction_events", "retracted_requests",
                   "evicted_tokens", "cache_hit_rate", "per_kind", "idle_checks", "server_flags", "command",
                   "sglang_version", "verdict")          # the fields of soak.json, and the brief's
CLEAN = dict.fromkeys(soak.TCA_FIELDS, 0) | {"dense_tokens": 75776, "store_pages": 33331, "logical_tokens": 228352}


def corpus():
    return soak.make_corpus(list(range(1000, 31000)), lambda ids: " ".join(map(str, ids)),
                            lambda s: [ord(c) for c in s], CONTEXT)


def specs(seed, n):
    return list(islice(soak.schedule(seed, CONTEXT), n))


def test_schedule_is_deterministic_every_round_holds_every_kind():
    a, b = specs(0, 400), specs(0, 400)
    assert a == b and a != specs(1, 400)
    per_round = sum(soak.ROUND.values())
    for r in range(400 // per_round):
        assert Counter(s.kind for s in a[r * per_round:(r + 1) * per_round]) == Counter(soak.ROUND)
    assert set(soak.MALFORMED) <= {s.kind for s in a[:per_round]}
    assert [s.seq for s in a] == list(range(400))
    assert {s.chat for s in a if s.kind == "bad_sampling"} == {True, False}


def test_plans_fit_the_context_unless_they_must_not():
    c = corpus()
    for spec in specs(0, 600):
        p = soak.plan(spec, c)
        if spec.kind == "bad_json":
            assert isinstance(p.body, bytes) and (p.path, p.body) in soak.BAD_BODIES
            continue
        if p.path == "/generate":
            n, max_new, sampling = len(p.body["input_ids"]), p.body["sampling_params"]["max_new_tokens"], \
                p.body["sampling_params"]
        else:
            n, max_new, sampling = len(p.body["messages"][0]["content"].split()), p.body["max_completion_tokens"], \
                p.body
        assert p.stream == spec.stream == bool(p.body["stream"])
        if spec.kind == "bad_too_long":
            assert n > CONTEXT
        elif spec.kind == "bad_huge_max_new":
            assert max_new >= 10 ** 9
        elif spec.kind == "bad_sampling":
            bad = soak.BAD_SAMPLING_CHAT if spec.chat else soak.BAD_SAMPLING
            assert bad[spec.variant].items() <= sampling.items() and "temperature" not in sampling.keys() - \
                bad[spec.variant].keys()
        else:
            assert n + max_new <= CONTEXT and sampling["temperature"] == 0
        assert (p.rid is not None) == spec.kind.startswith("abort_") and (p.rid is None or p.stream)
        assert sampling.get("ignore_eos", False) == (spec.kind in soak.DECODE_HEAVY)
    shared = [soak.plan(s, c).body["input_ids"] for s in specs(0, 400) if s.kind == "shared_prefix"]
    assert any(a != b and a[:3000] == b[:3000] for a in shared for b in shared)    # one document, other questions


def test_plan_of_a_later_turn_sends_the_conversation():
    spec = next(s for s in specs(0, 100) if s.kind == "multi_turn")
    ids = list(range(5000))
    assert soak.plan(spec, corpus(), ids).body["input_ids"] == ids


def native(reason, **meta):
    return {"text": "x", "output_ids": [5, 6], "meta_info": {"finish_reason": reason, **meta}}


@pytest.mark.parametrize("status, events, error, category", [
    (200, [native({"type": "length"}, cached_tokens=64)], None, "completed"),
    (200, [native(None), native({"type": "stop"})], None, "completed"),
    (200, [native(None), native({"type": "abort", "status_code": None})], None, "aborted"),
    (200, [native({"type": "abort", "status_code": 500, "message": "OOM"})], None, "http_5xx"),
    (200, [native({"type": "abort", "status_code": 400})], None, "refused_4xx"),
    (200, [{"error": {"message": "temperature", "code": 400}}], None, "refused_4xx"),     # refusal inside a stream
    (200, [{"error": {"message": "boom", "code": 503}}], None, "http_5xx"),
    (200, [{"choices": [{"delta": {"content": "a"}, "finish_reason": None}]},
           {"choices": [{"delta": {}, "finish_reason": "stop"}]}], None, "completed"),
    (200, [native(None)], None, "error"),                                                 # stream cut short
    (200, ["<html>"], None, "error"),
    (400, [{"object": "error", "message": "too long", "code": 400}], None, "refused_4xx"),
    (422, ["Unprocessable"], None, "refused_4xx"),
    (500, ["Internal Server Error"], None, "http_5xx"),
    (503, [""], None, "http_5xx"),
    (302, [""], None, "error"),
    (None, [], "ClientConnectorError: refused", "error"),
    (200, [native(None)], "ServerDisconnectedError: gone", "error"),
])
def test_classify(status, events, error, category):
    assert soak.classify(status, events, error).category == category


def test_classify_keeps_cached_tokens_and_output_ids():
    out = soak.classify(200, [native({"type": "length"}, cached_tokens=64)])
    assert (out.cached_tokens, out.output_ids) == (64, [5, 6])
    chat = {"choices": [{"message": {"content": "a"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens_details": {"cached_tokens": 128}}}
    assert soak.classify(200, [chat]).cached_tokens == 128


def test_a_failed_abort_call_is_the_outcome():
    done = soak.Outcome("completed")
    assert soak._with_abort(done, None) is done and soak._with_abort(done, 200) is done
    assert soak._with_abort(done, 500).category == "http_5xx"
    assert soak._with_abort(done, 0).category == "error"


def test_tally_counts_kinds_unexpected_and_radix_hits():
    t = soak.Tally()
    t.add("short", 0, soak.Outcome("completed"))
    t.add("shared_prefix", 1, soak.Outcome("completed", cached_tokens=3008))
    t.add("bad_json", 2, soak.Outcome("refused_4xx", status=400))
    t.add("bad_json", 3, soak.Outcome("completed", status=200))                  # accepted garbage: unexpected
    t.add("long", 4, soak.Outcome("http_5xx", status=500))
    t.add("disconnect_decode", 5, soak.Outcome("disconnected"))
    assert (t.total("sent"), t.total("unexpected"), t.total("http_5xx")) == (6, 2, 1)
    assert t.kinds["shared_prefix"]["radix_hits"] == 1 and t.kinds["shared_prefix"]["cached_tokens"] == 3008
    assert [e["seq"] for e in t.examples["unexpected"]] == [3, 4] and t.examples["http_5xx"][0]["status"] == 500


def test_idle_check_clean_and_each_leak():
    cached = CLEAN | {"logical_used_tokens": 9000, "dense_used_tokens": 2176, "dense_evictable_tokens": 2176,
                      "store_used_pages": 700, "records": 140}
    ok = soak.idle_check(0, cached, CLEAN)
    assert ok["ok"] and (ok["leaked_tokens"], ok["leaked_store_pages"]) == (0, 0) and not ok["problems"]
    assert ok["before"]["store_used_pages"] == 700
    cases = [
        (soak.idle_check(128, cached, CLEAN), 128, 0),                                     # SGLang: tokens in use
        (soak.idle_check(0, cached | {"dense_used_tokens": 2240}, CLEAN), 64, 0),          # a dense page not cached
        (soak.idle_check(0, cached | {"store_reserved_pages": 39}, CLEAN), 0, 39),         # a reservation left
        (soak.idle_check(0, cached, CLEAN | {"logical_used_tokens": 64, "dense_used_tokens": 64}), 128, 0),
        (soak.idle_check(0, cached, CLEAN | {"store_used_pages": 5, "records": 1}), 0, 5),
    ]
    for check, tokens, pages in cases:
        assert not check["ok"] and check["problems"]
        assert (check["leaked_tokens"], check["leaked_store_pages"]) == (tokens, pages)
    refused = soak.idle_check(0, cached, CLEAN, flushed=False)
    assert not refused["ok"] and "flush" in refused["problems"][0]


LOG = """[2026-12-03 10:00:01] Prefill batch, #new-seq: 3
[2026-12-03 10:00:02] KV cache pool is full. Retract requests. #retracted_reqs: 2, #new_tokens_gained: 3200
[2026-12-03 10:00:05] KV cache pool is full. Retract requests. #retracted_reqs: 1, #new_tokens_gained: 900
"""


def test_scan_log_and_prom_sum():
    clean = soak.scan_log(LOG)
    assert (clean["retraction_events"], clean["retracted_requests"], clean["leak_lines"]) == (2, 3, 0)
    assert clean["examples"] == []
    bad = soak.scan_log(LOG + "Scheduler hit an exception: Traceback (most recent call last):\nValueError: pool "
                              "memory leak detected! [full] total=1\n")
    assert (bad["leak_lines"], bad["exception_lines"], bad["tracebacks"]) == (1, 1, 1) and len(bad["examples"]) == 2
    text = ('# HELP sglang:cached_tokens_total x\nsglang:cached_tokens_total{model_name="m"} 120.0\n'
            'sglang:cached_tokens_total{model_name="n"} 30.0\nsglang:prompt_tokens_total 1e3\n')
    assert soak.prom_sum(text, "sglang:cached_tokens_total") == 150.0
    assert soak.prom_sum(text, "sglang:prompt_tokens_total") == 1000.0
    assert soak.prom_sum(text, "sglang:evicted_tokens_total") is None


def report(tally=None, checks=None, run=None, log=None, metrics=None):
    if tally is None:
        tally = soak.Tally()
        for kind in soak.ROUND:
            category = min(soak.EXPECTED[kind] - {"completed"} or {"completed"})      # aborted, disconnected, ...
            tally.add(kind, 0, soak.Outcome(category, cached_tokens=64))
    meta = {"date": "2026-12-03", "device": "NVIDIA H200", "sglang_version": "0.5.17", "budgets": "b.json",
            "server_flags": soak.server_flags(100000, 32), "command": "python bench/soak.py", "server_start_s": 80.0}
    run = {"duration_s": 601.0, "duration_target_s": 600.0, "crash_reason": None, "health_checks": 300,
           "health_failures": 0, "health_longest_gap_s": 2.1} | (run or {})
    checks = [dict(t_s=80.0, **soak.idle_check(0, CLEAN, CLEAN))] if checks is None else checks
    log = soak.scan_log(LOG) if log is None else log
    metrics = {"sglang:evicted_tokens_total": 5000.0, "sglang:prompt_tokens_total": 100.0,
               "sglang:cached_tokens_total": 25.0} if metrics is None else metrics
    return soak.build_report(meta, tally, run, checks, log, metrics)


def test_verdict_passes_a_clean_run_and_fails_each_criterion():
    r = report()
    assert r["verdict"] == {"pass": True, "failures": [], "coverage_gaps": []}
    assert (r["crashes"], r["leaked_tokens"], r["retraction_events"], r["cache_hit_rate"]) == (0, 0, 2, 0.25)
    five = soak.Tally()
    five.add("long", 1, soak.Outcome("http_5xx", status=500))
    leak = [dict(t_s=90.0, **soak.idle_check(64, CLEAN, CLEAN))]
    failing = {
        "crash": report(run={"crash_reason": "server exited with code -9"}),
        "health": report(run={"health_failures": 3}),
        "5xx": report(tally=five),
        "leak": report(checks=leak),
        "log leak": report(log=soak.scan_log(LOG + "token_to_kv_pool_allocator memory leak detected!\n")),
        "no check": report(checks=[]),
        "nothing sent": report(tally=soak.Tally()),
    }
    for name, r in failing.items():
        assert not r["verdict"]["pass"] and r["verdict"]["failures"], name
    assert failing["leak"]["leaked_tokens"] == 64 and failing["crash"]["crashes"] == 1
    quiet = report(log=soak.scan_log(""), metrics={})              # nothing forced: reported, not failed
    assert quiet["verdict"]["pass"] and len(quiet["verdict"]["coverage_gaps"]) == 2
    short = report(run={"duration_s": 579.6})                       # shorter than asked: said, not failed
    assert short["verdict"]["pass"]
    assert short["verdict"]["coverage_gaps"] == ["it ran 579.6 s, less than its target 600.0 s"]


def test_report_files_hold_the_required_fields(tmp_path):
    r = report()
    soak.write_report(r, tmp_path)
    data = json.loads((tmp_path / "soak.json").read_text())
    assert set(REQUIRED_FIELDS) <= data.keys()
    assert data["per_kind"].keys() == soak.ROUND.keys() and len(data["idle_checks"]) == 1
    md = (tmp_path / "soak.md").read_text()
    assert "**Verdict: PASS**" in md and "| shared_prefix | 1 |" in md and "## Idle checks" in md
    failed = report(run={"crash_reason": "server exited with code 1"})
    assert "**Verdict: FAIL**\n- crash: server exited with code 1" in soak.render_md(failed)


def test_cap_log_keeps_head_and_tail(tmp_path):
    log = tmp_path / "server.log"
    log.write_bytes(b"a" * (3 << 20) + b"z" * (3 << 20))
    soak.cap_log(log, limit=4 << 20)
    data = log.read_bytes()
    assert data.startswith(b"a" * (2 << 20)) and data.endswith(b"z" * (2 << 20)) and len(data) < (4 << 20) + 100


def test_command_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        soak.parse_args(["--model", str(tmp_path)])
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    for argv, msg in ((["--concurrency", "0"], "must be > 0"), (["--duration-s", "60"], "at least 120"),
                      (["--idle-every-s", "600"], "no second idle period")):
        with pytest.raises(SystemExit):
            soak.parse_args(["--model", str(tmp_path), *argv])
        assert msg in capsys.readouterr().err
    assert soak.parse_args(["--model", str(tmp_path)]).duration_s == 600.0


# ---------------------------------------------------------------- a fake SGLang server for the client loop

class FakeSGLang(BaseHTTPRequestHandler):
    """Just enough of SGLang's HTTP API: validation like SGLang's (400, or an error event in a native stream),
    latency growing with the prompt, streams of 10 events that stop at /abort_request, idle pools."""
    aborted: ClassVar[set] = set()               # rids sent to /abort_request
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def reply(self, code, obj, ctype="application/json"):
        data = (obj if isinstance(obj, str) else json.dumps(obj)).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        answers = {"/health": {}, "/v1/loads": {"loads": [{"num_running_reqs": 0, "num_waiting_reqs": 0,
                                                           "num_used_tokens": 0}], "accelerator": "Fake GPU",
                                                "version": "0.0-fake"},
                   "/server_info": {"max_total_tokens": 100000, "version": "0.0-fake",
                                    "internal_states": [{"tca": CLEAN}]}}
        if self.path == "/metrics":
            self.reply(200, 'sglang:prompt_tokens_total{m="x"} 10\nsglang:cached_tokens_total{m="x"} 4\n', "text/plain")
        else:
            self.reply(200 if self.path in answers else 404, answers.get(self.path, {}))

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/flush_cache":
            return self.reply(200, "Cache flushed.", "text/plain")
        try:
            body = json.loads(raw)
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            return self.reply(400, {"object": "error", "message": "invalid JSON", "code": 400})
        if self.path == "/abort_request":
            FakeSGLang.aborted.add(body["rid"])
            return self.reply(200, {})
        chat = self.path == "/v1/chat/completions"
        n = len(body["messages"][0]["content"].split()) if chat else len(body["input_ids"])
        params = body if chat else body["sampling_params"]
        max_new = params.get("max_completion_tokens" if chat else "max_new_tokens", 16)
        unknown = set(params) - {"max_new_tokens", "max_completion_tokens", "temperature", "ignore_eos", "model",
                                 "messages", "stream"}
        if n >= CONTEXT or max_new < 0 or n + max_new > CONTEXT or params.get("temperature", 1) < 0 or \
                params.get("top_p", 1) > 1 or unknown:
            if body.get("stream") and not chat:
                return self.stream([{"error": {"message": "invalid", "code": 400}}])
            return self.reply(400, {"object": "error", "message": "invalid request", "code": 400})
        time.sleep(n / 40000)
        done = {"type": "length"}
        last = ({"choices": [{"message": {"content": "x"}, "finish_reason": "length"}]} if chat else
                {"text": "x", "output_ids": [7] * 4, "meta_info": {"finish_reason": done,
                                                                  "cached_tokens": 64 if n > 2000 else 0}})
        if not body.get("stream"):
            return self.reply(200, last)
        self.stream(self.decode(body.get("rid"), chat, last), pause=0.01)

    @staticmethod
    def decode(rid, chat, last):
        for i in range(10):
            if rid in FakeSGLang.aborted:
                yield {"text": "x", "output_ids": [7] * i, "meta_info": {"finish_reason": {"type": "abort"}}}
                return
            yield ({"choices": [{"delta": {"content": "x"}, "finish_reason": None}]} if chat else
                   {"text": "x", "output_ids": [7] * i, "meta_info": {"finish_reason": None}})
        yield last

    def stream(self, events, pause=0.0):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        try:
            for ev in events:
                self.wfile.write(b"data: " + json.dumps(ev).encode() + b"\n\n")
                self.wfile.flush()
                time.sleep(pause)
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            pass                                  # the client disconnected


@pytest.fixture
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSGLang)
    server.daemon_threads = True
    server.handle_error = lambda *args: None      # a client that disconnects mid-request
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_soak_loop_against_a_fake_server(fake_server, tmp_path, capsys):
    cfg = soak.Config(duration_s=3.0, idle_every_s=1.0, concurrency=8, settle_s=0.0,
                      idle_wait_s=5.0, idle_poll_s=0.05, full_check_wait_s=0.0, health_every_s=0.2,
                      progress_every_s=1.0, request_timeout_s=10.0)
    meta, tally, checks, run, metrics = asyncio.run(soak.soak(fake_server, corpus(), cfg, lambda: None))
    assert meta["device"] == "Fake GPU" and meta["server_args"] == {"max_total_tokens": 100000}
    r = soak.build_report({"date": "today", "budgets": "b", "server_flags": [], "command": "test",
                           "server_start_s": 0, **meta}, tally, run, checks, soak.scan_log(""), metrics)
    assert r["requests"] >= sum(soak.ROUND.values()) and all(c["sent"] for c in r["per_kind"].values())
    assert (r["http_5xx"], r["errors"], r["unexpected"], r["crashes"], r["leaked_tokens"]) == (0, 0, 0, 0, 0), \
        r["examples"]
    assert r["per_kind"]["abort_decode"]["aborted"] and r["per_kind"]["disconnect_decode"]["disconnected"]
    assert r["refused_4xx"] == sum(r["per_kind"][k].get("refused_4xx", 0) for k in soak.MALFORMED) > 0
    assert len(checks) >= 2 and all(c["ok"] for c in checks) and r["health_failures"] == 0 < r["health_checks"]
    assert r["verdict"]["pass"] and r["cache_hit_rate"] is None          # the fake's counters do not move
    assert cfg.duration_s <= run["duration_s"] < cfg.duration_s + 3       # the last idle check follows the traffic
    assert "[soak]" in capsys.readouterr().out
