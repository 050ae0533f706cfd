"""Move the embedded SmolLM2 GGUF (~94 MiB) to the GPU machine, whose calls carry at most 64 MiB each.

Here:   .venv/bin/python bench/gguf_parts.py split          -> .gguf-a/part, .gguf-b/part (git-ignored), sha256
There:  call 1 carries [".gguf-a"]: python3 bench/gguf_parts.py stash .gguf-a      (copies the part to /tmp)
        call 2 carries [".gguf-b"]: python3 bench/gguf_parts.py stash .gguf-b
        call 3 carries [".gpu"]:    python3 bench/gguf_parts.py join OUT_DIR           (joins, checks sha256, converts
                                                                                         to an HF folder in OUT_DIR)
Back-to-back calls: the machine keeps /tmp only while it stays warm (~30 s after a call).
`stash DIR` works for any carried folder (e.g. `.eval`: /tmp/gguf-parts/.eval.prompts.jsonl.xz), so a detached job
started earlier can wait for it (README: several jobs on one machine start).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sglang_tca.embedded_model import convert_gguf, file_sha256, gguf_path  # noqa: E402
PARTS = (".gguf-a", ".gguf-b")
STASH = Path("/tmp/gguf-parts")


def split() -> None:
    src = gguf_path()
    data = src.read_bytes()
    half = (len(data) + 1) // 2
    for name, piece in zip(PARTS, (data[:half], data[half:])):
        (ROOT / name).mkdir(exist_ok=True)
        (ROOT / name / "part").write_bytes(piece)
    (ROOT / PARTS[0] / "sha256").write_text(file_sha256(src))
    print(f"split {src.name} ({len(data) / 2**20:.1f} MiB) into {PARTS}")


def stash(part_dir: str) -> None:
    STASH.mkdir(parents=True, exist_ok=True)
    for f in Path(part_dir).iterdir():         # copy, then rename: a job waiting for the parts never sees half of one
        dst = STASH / f"{Path(part_dir).name}.{f.name}"
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copy(f, tmp)
        tmp.rename(dst)
    print(f"stashed {part_dir} in {STASH}: {sorted(p.name for p in STASH.iterdir())}")


def join(out_dir: str) -> None:
    want = (STASH / f"{PARTS[0]}.sha256").read_text().strip()
    gguf = STASH / "model.gguf"
    with open(gguf, "wb") as out:
        for name in PARTS:
            out.write((STASH / f"{name}.part").read_bytes())
    got = file_sha256(gguf)
    if got != want:
        sys.exit(f"error: joined GGUF sha256 {got} != {want}")
    convert_gguf(gguf, out_dir)
    print(f"GGUF ok ({got[:16]}), HF folder in {out_dir}")


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:] or ["help"]
    {"split": split, "stash": stash, "join": join}.get(cmd, lambda *_: sys.exit(__doc__))(*rest)
