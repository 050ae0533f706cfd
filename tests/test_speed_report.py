"""bench/speed_bench.py's decode window and bench/speed_report.py: the speed issue's fields and ratios from synthetic
run records, targets met or missed, and parts never paired across run files."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from speed_bench import BATCHED, CONTEXTS, batch_shape, context_length, decode_rate  # noqa: E402
from speed_report import report  # noqa: E402


def engine_rec(backend, ttft, decode, tok_s):
    rec = {"part": "engine", "backend": backend, "device": "NVIDIA H200", "date": "2026-12-02",
           "mem_fraction_static": 0.85,
           "contexts": {str(n): {"ttft_s": ttft * n / 1024, "decode_ms": decode} for n in CONTEXTS},
           "batched": {f"{bs}x{n}": {"decode_tok_s": tok_s} for bs, n in BATCHED}}
    if backend == "tca":
        rec["kept"] = {str(n): 0.4 for n in CONTEXTS}
    return rec


def serving_rec(backend, out_tok_s):
    return {"part": "serving", "backend": backend, "device": "NVIDIA H200", "date": "2026-12-02",
            "output_throughput": out_tok_s, "request_throughput": out_tok_s / 512, "median_ttft_ms": 900.0,
            "median_tpot_ms": 10.0, "duration": 60.0, "command": "python -m sglang.bench_serving ..."}


def write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_decode_rate_counts_only_the_window_where_every_request_decodes():
    a = [(1.0, 1), (1.1, 2), (1.2, 3), (1.3, 4)]           # first token at 1.0
    b = [(1.15, 1), (1.25, 2), (1.35, 3), (1.45, 4)]        # its prefill ended later
    secs, toks = decode_rate([a, b])
    assert secs == pytest.approx(1.3 - 1.15)
    assert toks == (4 - 2) + (2 - 1)
    assert decode_rate([a]) == (pytest.approx(0.3), 3)


def test_report_ratios_targets_and_files(tmp_path):
    f = write(tmp_path / "run.jsonl", [engine_rec("tca", 0.1, 10.0, 2000.0), engine_rec("flashinfer", 0.2, 12.0, 1000.0),
                                       serving_rec("tca", 1200.0), serving_rec("flashinfer", 1000.0)])
    got = report([f], tmp_path / "out")
    for n in CONTEXTS:
        row = got["contexts"][str(n)]
        assert row["ttft_ratio"] == pytest.approx(2.0) and row["decode_ratio"] == pytest.approx(1.2)
    assert got["contexts"]["1024"]["ttft_target"] == {"target": 0.95, "met": True}
    assert got["contexts"]["130048"]["ttft_target"] == {"target": 3.0, "met": False}
    assert got["contexts"]["130048"]["decode_target"] == {"target": 1.4, "met": False}
    assert got["contexts"]["16384"]["ttft_target"] is None                   # no target at 16K
    assert got["batched"]["16x32768"]["ratio"] == pytest.approx(2.0)
    assert got["serving"]["ratio"] == pytest.approx(1.2) and got["serving"]["target"]["met"] is False
    assert "ttft 130048" in got["targets_missed"] and "batched 32x4096" in got["targets_met"]
    for key in ("device", "date"):
        assert got[key]
    saved = json.loads((tmp_path / "out" / "speed.json").read_text())
    assert saved["contexts"]["32768"]["ttft_ratio"] == got["contexts"]["32768"]["ttft_ratio"]
    md = (tmp_path / "out" / "speed.md").read_text()
    assert "NVIDIA H200" in md and "| 127K |" in md and "missed: >= 3.0" in md
    assert (tmp_path / "out" / "speed.png").stat().st_size > 1000


def test_parts_are_never_paired_across_run_files(tmp_path):
    a = write(tmp_path / "a.jsonl", [engine_rec("tca", 0.1, 10.0, 2000.0), engine_rec("flashinfer", 0.2, 12.0, 1000.0),
                                     serving_rec("tca", 1200.0)])
    b = write(tmp_path / "b.jsonl", [serving_rec("flashinfer", 1000.0)])
    got = report([a, b], tmp_path / "out")
    assert got["serving"] is None and "not run" in (tmp_path / "out" / "speed.md").read_text()
    only_tca = write(tmp_path / "c.jsonl", [engine_rec("tca", 0.1, 10.0, 2000.0)])
    with pytest.raises(SystemExit, match="no engine part"):
        report([only_tca, b], tmp_path / "out2")


def test_a_failed_record_is_skipped(tmp_path):
    recs = [engine_rec("tca", 0.1, 10.0, 2000.0), engine_rec("flashinfer", 0.2, 12.0, 1000.0),
            {"part": "engine", "backend": "flashinfer", "error": "RuntimeError: boom"}]
    got = report([write(tmp_path / "r.jsonl", recs)], tmp_path / "out")
    assert got["contexts"]["1024"]["ttft_ratio"] == pytest.approx(2.0)


def test_a_shorter_later_run_replaces_only_the_rows_it_measured(tmp_path):
    full = write(tmp_path / "a.jsonl", [engine_rec("tca", 0.1, 10.0, 2000.0), engine_rec("flashinfer", 0.2, 12.0, 1000.0)])
    part = [engine_rec(b, t, 10.0, tok) for b, t, tok in (("tca", 0.3, 1500.0), ("flashinfer", 0.15, 3000.0))]
    for r in part:
        r["date"] = "2026-12-03"
        r["contexts"] = {"1024": r["contexts"]["1024"]}
        r["batched"] = {"32x4096": r["batched"]["32x4096"]}
    later = write(tmp_path / "b.jsonl", part)
    got = report([full, later], tmp_path / "out")
    assert got["contexts"]["1024"]["ttft_ratio"] == pytest.approx(0.5)            # from the later run
    assert got["contexts"]["1024"]["run"]["source"].endswith("b.jsonl")
    assert got["contexts"]["32768"]["ttft_ratio"] == pytest.approx(2.0)           # kept from the full one
    assert got["contexts"]["32768"]["run"]["date"] == "2026-12-02"
    assert got["batched"]["32x4096"]["ratio"] == pytest.approx(0.5)
    assert got["batched"]["16x32768"]["ratio"] == pytest.approx(2.0)
    assert [r["date"] for r in got["runs"]] == ["2026-12-02", "2026-12-03"]
    md = (tmp_path / "out" / "speed.md").read_text()
    assert "| 1K | 0.4 | 0.300 | 0.150 | **0.50** (missed: >= 0.95) |" in md and "| 2026-12-03 |" in md


def test_engine_shape_flags_are_checked():
    import argparse

    assert batch_shape("16x32768") == (16, 32768) and context_length("130048") == 130048
    for bad in ("32-4096", "0x4096", "x", "4x-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="BSxLEN"):
            batch_shape(bad)
    for bad in ("0", "-5", "131072", "4k"):
        with pytest.raises(argparse.ArgumentTypeError, match="context length"):
            context_length(bad)
