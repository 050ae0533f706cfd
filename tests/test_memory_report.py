"""bench/memory_report.py: the issue's fields from the committed run, and parts without both backends stay null."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from memory_report import report  # noqa: E402

RUNS = ROOT / "bench" / "results" / "memory_runs"
RUN = RUNS / "h200_2026-12-01.jsonl"                 # the memory part
BENCH_RUN = RUNS / "h200_2026-12-02.jsonl"           # both bench_serving parts (random is still from here)
GSP_RUN = RUNS / "h200_2026-12-02b.jsonl"            # gsp at a cap where dense is memory-bound; random failed
TCA_ONLY_RUN = RUNS / "h200_2026-12-03_random_tca_only.jsonl"   # random, flashinfer's part lost: does not unpair
LONG_RUN = RUNS / "h200_2026-12-03_random_long.jsonl"             # random_long (4096 output tokens)
H100_LONG_RUN = RUNS / "h100_2026-12-07_random_long.jsonl"        # random_long, 36 prompts, on an H100


def test_report_of_the_committed_runs_matches_memory_json(tmp_path):
    got = report([RUN, BENCH_RUN, GSP_RUN, TCA_ONLY_RUN, LONG_RUN, H100_LONG_RUN], tmp_path)
    assert json.loads((tmp_path / "memory.json").read_text()) == json.loads(
        (ROOT / "bench" / "results" / "memory.json").read_text())
    for key in ("device", "date", "kv_bytes_per_token_ratio_128k", "max_concurrent_128k", "memory_bound_req_s",
                "agent_req_s"):
        assert key in got
    assert got["max_concurrent_128k"]["flashinfer"] == 845617 // (128 * 1024 - 256 + 64)
    assert got["memory_bound_req_s"] == {"tca": pytest.approx(0.9601, abs=1e-4),
                                         "flashinfer": pytest.approx(0.7531, abs=1e-4)}
    assert got["memory_bound_long_req_s"] == {"tca": pytest.approx(0.2710, abs=1e-4),        # the latest pair
                                              "flashinfer": pytest.approx(0.1860, abs=1e-4)}
    assert got["random_long_bench_serving"]["num_prompts"] == 36 and "H100" in got["random_long_bench_serving"]["device"]
    assert got["agent_req_s"] == {"tca": pytest.approx(0.9846, abs=1e-4), "flashinfer": pytest.approx(0.5945, abs=1e-4)}
    assert got["cache_hit_rate_gsp"] == {"tca": 0.5862, "flashinfer": 0.4735}
    assert got["gsp_bench_serving"]["source"].endswith("h200_2026-12-02b.jsonl")
    assert (tmp_path / "memory.md").read_text() == (ROOT / "bench" / "results" / "memory.md").read_text()


def test_a_part_is_never_paired_across_run_files(tmp_path):
    recs = [json.loads(x) for x in BENCH_RUN.read_text().splitlines()]
    only_tca = tmp_path / "tca.jsonl"
    only_tca.write_text("".join(json.dumps(r) + "\n" for r in recs if r["backend"] == "tca"))
    only_fi = tmp_path / "fi.jsonl"
    only_fi.write_text("".join(json.dumps(r) + "\n" for r in recs if r["backend"] == "flashinfer"))
    got = report([RUN, only_tca, only_fi], tmp_path / "out")
    assert got["memory_bound_req_s"]["tca"] is None and "not run" in got["memory_bound_req_s"]["note"]
    assert got["random_bench_serving"] is None and got["cache_hit_rate_gsp"] is None


def test_a_part_with_one_backend_is_not_run_and_errors_are_skipped(tmp_path):
    recs = [json.loads(x) for x in RUN.read_text().splitlines()]
    recs.append({"part": "random", "backend": "tca", "request_throughput": 1.5})
    recs.append({"part": "gsp", "backend": "tca", "request_throughput": 2.0, "cache_hit_rate": 0.7})
    recs.append({"part": "gsp", "backend": "flashinfer", "error": "RuntimeError: boom"})
    f = tmp_path / "runs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    got = report([f], tmp_path / "out")
    assert got["memory_bound_req_s"]["tca"] is None and got["agent_req_s"]["tca"] is None
    recs.append({"part": "gsp", "backend": "flashinfer", "request_throughput": 1.0, "cache_hit_rate": 0.5})
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    got = report([f], tmp_path / "out")
    assert got["memory_bound_long_req_s"]["tca"] is None
    assert got["agent_req_s"] == {"tca": 2.0, "flashinfer": 1.0} and got["cache_hit_rate_gsp"]["tca"] == 0.7


def test_no_memory_part_is_an_error(tmp_path):
    f = tmp_path / "runs.jsonl"
    f.write_text(json.dumps({"part": "gsp", "backend": "tca", "request_throughput": 2.0}) + "\n")
    with pytest.raises(SystemExit, match="no memory part"):
        report([f], tmp_path / "out")


def test_memory_bench_sends_the_number_of_prompts_asked_and_scales_its_estimates():
    import memory_bench as mb

    flags = mb.bench_flags("random_long", 36)
    assert flags[flags.index("--num-prompts") + 1] == "36" and mb.BENCH_FLAGS["random_long"] != flags
    assert mb.bench_flags("gsp", 36) == mb.BENCH_FLAGS["gsp"]
    assert mb.scaled_estimates(128) == mb.ESTIMATE_S
    half = mb.scaled_estimates(64)
    assert half["random_long"]["flashinfer"] == 200 + (700 - 200) // 2 and half["gsp"] == mb.ESTIMATE_S["gsp"]
