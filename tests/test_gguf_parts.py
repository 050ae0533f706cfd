"""bench/gguf_parts.py's stash: each part lands under the name `join` reads (copied under a temporary name, then
renamed, so a job waiting for the parts never reads half of one), with no temporary file left behind."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("gguf_parts", ROOT / "bench" / "gguf_parts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stash_copies_each_part_whole_under_its_final_name(tmp_path, monkeypatch):
    mod = load()
    monkeypatch.setattr(mod, "STASH", tmp_path / "stash")
    part = tmp_path / ".gguf-a"
    part.mkdir()
    (part / "part").write_bytes(b"x" * 100_000)
    (part / "sha256").write_text("abc")
    mod.stash(str(part))
    got = {p.name: p.read_bytes() for p in (tmp_path / "stash").iterdir()}
    assert got == {".gguf-a.part": b"x" * 100_000, ".gguf-a.sha256": b"abc"}    # no .tmp left behind
