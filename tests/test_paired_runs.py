"""bench/paired_runs.py, the runner of the TCA-vs-dense benchmarks: records per (part, backend), parts skipped at
the deadline, failures recorded and TCA's first failure ending the job; reports pair backends within one file."""
import json
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from paired_runs import load_runs, paired, run_parts  # noqa: E402


def args(tmp_path, parts, deadline_s=1e9, backends=("tca", "flashinfer")):
    return types.SimpleNamespace(parts=parts, backends=list(backends), deadline_s=deadline_s, out=str(tmp_path))


def records(tmp_path):
    return [json.loads(x) for x in (tmp_path / "x_runs.jsonl").read_text().splitlines()]


def test_every_part_and_backend_in_order_with_the_base_fields(tmp_path):
    calls = []
    run_parts("x", args(tmp_path, ["a", "b"]), {"a": {"tca": 1, "flashinfer": 1}, "b": {"tca": 1, "flashinfer": 1}},
              lambda part, backend, i: calls.append((part, backend, i)) or {"value": i},
              lambda part, backend: {"flag": part})
    assert calls == [("a", "tca", 0), ("a", "flashinfer", 1), ("b", "tca", 0), ("b", "flashinfer", 1)]
    recs = records(tmp_path)
    assert [(r["part"], r["backend"], r["value"], r["flag"]) for r in recs] == [
        ("a", "tca", 0, "a"), ("a", "flashinfer", 1, "a"), ("b", "tca", 0, "b"), ("b", "flashinfer", 1, "b")]
    assert all(r["device"] and r["date"] for r in recs)


def test_a_part_that_would_pass_the_deadline_is_skipped(tmp_path, capsys):
    est = {"short": {"tca": 1, "flashinfer": 1}, "long": {"tca": 500, "flashinfer": 600}}
    run_parts("x", args(tmp_path, ["long", "short"], deadline_s=100), est, lambda *a: {}, lambda *a: {})
    assert [r["part"] for r in records(tmp_path)] == ["short", "short"]
    assert "skipping long" in capsys.readouterr().out


def test_dense_failure_is_recorded_and_tca_failure_ends_the_job(tmp_path):
    est = {"a": {"tca": 1, "flashinfer": 1}, "b": {"tca": 1, "flashinfer": 1}}

    def one(part, backend, i):
        if (part, backend) in (("a", "flashinfer"), ("b", "tca")):
            raise RuntimeError(f"{part} {backend} broke")
        return {"ok": True}

    with pytest.raises(SystemExit, match="TCA failed in part b"):
        run_parts("x", args(tmp_path, ["a", "b", "c"]), {**est, "c": est["a"]}, one, lambda *a: {})
    recs = records(tmp_path)
    assert [(r["part"], r["backend"]) for r in recs] == [("a", "tca"), ("a", "flashinfer"), ("b", "tca")]
    assert "a flashinfer broke" in recs[1]["error"] and "b tca broke" in recs[2]["error"]
    loaded, _ = load_runs([tmp_path / "x_runs.jsonl"])
    assert paired(loaded, "a") is None and ("a", "tca") in loaded             # errors are not results


def test_a_later_file_with_one_backend_does_not_unpair_a_complete_run(tmp_path):
    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    write("a.jsonl", [{"part": "p", "backend": "tca", "v": 1}, {"part": "p", "backend": "flashinfer", "v": 2}])
    write("b.jsonl", [{"part": "p", "backend": "tca", "v": 3}])                   # its flashinfer part was lost
    recs, sources = load_runs([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
    t, d = paired(recs, "p")
    assert (t["v"], d["v"]) == (1, 2) and t["_source"] == d["_source"] == sources[0]
    write("c.jsonl", [{"part": "p", "backend": "flashinfer", "v": 4}, {"part": "p", "backend": "tca", "v": 5}])
    t, d = paired(load_runs([tmp_path / f for f in ("a.jsonl", "b.jsonl", "c.jsonl")])[0], "p")
    assert (t["v"], d["v"]) == (5, 4)                                             # the last complete run wins
