"""bench/gpu_detached.sh: a detached job runs in a copy of the tree taken at `start`, so a later call that removes
ignored paths (as the device tool does with paths it does not carry) cannot take them from under it; `wait` brings
back the job's files, its log and its exit status."""
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(tree, out, env, *args):
    return subprocess.run(["bash", str(tree / "bench" / "gpu_detached.sh"), *args], cwd=tree, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env, "OUT": str(out)})


def test_a_detached_job_keeps_the_tree_it_started_with(tmp_path):
    tree = tmp_path / "repo"
    (tree / "bench").mkdir(parents=True)
    shutil.copy(ROOT / "bench" / "gpu_detached.sh", tree / "bench")
    (tree / ".client").mkdir()
    (tree / ".client" / "stub.py").write_text("carried\n")
    env = {"DETACHED_DIR": str(tmp_path / "job"), "WAIT_S": "0"}
    first = tmp_path / "out1"
    first.mkdir()
    r = run(tree, first, env, "start", "bash", "-c", 'sleep 2; cat .client/stub.py > "$OUT/seen"; exit 3')
    assert r.returncode == 0 and "still running" in r.stdout, r.stderr
    shutil.rmtree(tree / ".client")                     # the next call did not carry it
    assert run(tree, first, env, "start", "true").returncode == 2          # one job per machine
    second = tmp_path / "out2"
    second.mkdir()
    r = run(tree, second, {**env, "WAIT_S": "30"}, "wait")
    assert "job ended, rc 3" in r.stdout, r.stdout + r.stderr
    assert (second / "seen").read_text() == "carried\n" and (second / "rc").read_text().strip() == "3"
    assert (second / "job.log").exists()


def test_many_files_come_back_as_one_archive(tmp_path):
    """A device call returns at most 8 files: a job that wrote more comes back as out.tgz (speed_runs.jsonl was
    left out of a 9-file answer on 2026-12-03)."""
    import tarfile

    tree = tmp_path / "repo"
    (tree / "bench").mkdir(parents=True)
    shutil.copy(ROOT / "bench" / "gpu_detached.sh", tree / "bench")
    out = tmp_path / "out"
    out.mkdir()
    env = {"DETACHED_DIR": str(tmp_path / "job"), "WAIT_S": "30"}
    r = run(tree, out, env, "start", "bash", "-c", 'for i in 1 2 3 4 5 6 7 8 9; do echo $i > "$OUT/f$i"; done')
    assert "job ended, rc 0" in r.stdout, r.stdout + r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["job.log", "out.tgz", "rc"]
    with tarfile.open(out / "out.tgz") as t:
        assert sorted(n for n in t.getnames() if "f" in n) == [f"./f{i}" for i in range(1, 10)]
