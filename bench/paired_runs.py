"""What the TCA-vs-dense benchmarks share (bench/memory_bench.py, bench/speed_bench.py and their reports).

A benchmark is a list of parts; each part runs for TCA first, then the dense backend, one after the other on one
machine in one job, and leaves one JSON line per (part, backend) in DIR/<name>_runs.jsonl. A part is skipped when
less than its estimate is left before the deadline, and the job stops at TCA's first failure (its numbers would have
nothing to compare with). A report reads run files and pairs the two backends of a part only within one file.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def positive(kind: Callable = int) -> Callable[[str], object]:
    """An argparse type: a number of `kind` above 0, with a one-line error otherwise."""
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
        return v
    return parse


def run_parts(name: str, args, estimate_s: dict, one: Callable[[str, str, int], dict], base: Callable[[str, str], dict]):
    """For each part of args.parts and each backend of args.backends: the record base(part, backend) (device, date
    and `base`'s fields) updated with one(part, backend, index), or with "error" when `one` raised."""
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device, t_start = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", time.time()
    for part in args.parts:
        left, need = args.deadline_s - (time.time() - t_start), sum(estimate_s[part][b] for b in args.backends)
        if left < need:
            print(f"[{name}] skipping {part}: {left:.0f}s left, needs ~{need}s", flush=True)
            continue
        for i, backend in enumerate(args.backends):
            rec = {"part": part, "backend": backend, "device": device, "date": str(datetime.date.today()),
                   **base(part, backend)}
            try:
                rec.update(one(part, backend, i))
            except Exception as e:  # noqa: BLE001 - recorded, and TCA's failure ends the run
                rec["error"] = f"{type(e).__name__}: {e}"[-4000:]
            with open(out / f"{name}_runs.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps({k: v for k, v in rec.items() if not isinstance(v, dict)})[:3000], flush=True)
            if "error" in rec and backend == "tca":
                sys.exit(f"[{name}] TCA failed in part {part}; stopping")


def cli(doc: str, name: str, parts: list[str], run: Callable, report: Callable, required_parts: bool = False,
        extra: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """`run --parts ... [--backends] [--deadline-s] [--out]` calls run(args); `report --runs FILE...` report(paths)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--parts", nargs="+", choices=parts, required=required_parts,
                   **({} if required_parts else {"default": parts}))
    r.add_argument("--backends", nargs="+", default=["tca", "flashinfer"])
    r.add_argument("--deadline-s", type=float, default=1e9, help="skip parts that would not end before this")
    r.add_argument("--out", default=os.environ.get("OUT", f"/tmp/{name}"))
    if extra is not None:
        extra(r)
    sub.add_parser("report").add_argument("--runs", nargs="+", required=True)
    args = ap.parse_args()
    if args.cmd == "run":
        run(args)
    else:
        report([Path(p) for p in args.runs])


def load_runs(run_files: list[Path]) -> tuple[dict, list[str]]:
    """({(part, backend): the last record without an error, with "_source" = its file}, the files as given, relative
    to the repository where inside it). A part's records come from the last file that holds both backends' (one
    job), so a later file with one backend only (a job cut short) does not unpair an earlier complete run."""
    recs, by_file, sources = {}, {}, []
    for f in run_files:
        sources.append(str(f.relative_to(ROOT)) if f.is_absolute() and ROOT in f.parents else str(f))
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if "error" not in r:
                recs[(r["part"], r["backend"])] = by_file[(r["part"], r["backend"], sources[-1])] = \
                    {**r, "_source": sources[-1]}
    for part in {p for p, _ in recs}:
        both = [s for s in sources if (part, "tca", s) in by_file and (part, "flashinfer", s) in by_file]
        if both:
            for b in ("tca", "flashinfer"):
                recs[(part, b)] = by_file[(part, b, both[-1])]
    return recs, sources


def paired(recs: dict, part: str) -> tuple[dict, dict] | None:
    """(TCA's record, flashinfer's) of a part when one run file holds both, else None."""
    t, d = recs.get((part, "tca")), recs.get((part, "flashinfer"))
    return (t, d) if t and d and t["_source"] == d["_source"] else None
