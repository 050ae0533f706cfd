"""bench/ruler.py: RULER-style prompts are deterministic, fit their length, carry their answers, use only the haystack
split, and score as RULER does."""
from __future__ import annotations

import collections
import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import ruler  # noqa: E402

LENGTHS = (2048, 4096)
NEEDLE = r"One of the special magic numbers for .+? is: \d{7}\."
N = 3


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def built(tok):
    return {(t, n): ruler.build(t, n, N, tok) for t in ruler.TASKS for n in LENGTHS}


def _user(sample):
    """The user message of the chat-formatted prompt."""
    return sample["text"].split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]


def _collapsed(text):
    return re.sub(r"\s+", " ", text).strip()


def test_deterministic_and_prefix(tok, built):
    for task in ("niah_multikey", "cwe", "qa_squad"):
        assert ruler.build(task, 2048, N, tok) == built[task, 2048]
        assert ruler.build(task, 2048, N + 2, tok)[:N] == built[task, 2048]
    assert ruler.build("niah_single", 2048, 1, tok, seed=7)[0]["answers"] != built["niah_single", 2048][0]["answers"]
    assert all(len({s["text"] for s in samples}) == N for samples in built.values())


def test_fields_and_length_bounds(tok, built):
    for (task, length), samples in built.items():
        assert [s["index"] for s in samples] == list(range(N))
        for s in samples:
            assert s["task"] == task and s["length"] == length and s["metric"] in ("all", "part")
            assert s["n_tokens"] == len(tok(s["text"]).input_ids)
            assert 0.9 * length <= s["n_tokens"] + s["max_new_tokens"] <= length, (task, length, s["n_tokens"])
            prefix = s["text"].rsplit("<|im_start|>assistant\n", 1)[1]          # RULER's answer prefix, lstripped
            assert prefix.startswith(("Answer:", "The special magic number")) and s["answers"]
            json.dumps(s)


def test_niah_needles_and_haystack_split(built):
    from sglang_tca.essays import essay_split

    hay = _collapsed(essay_split("haystack"))
    calib = _collapsed(essay_split("calibration"))[:200]
    depths = []
    for task in ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"):
        for length in LENGTHS:
            for s in built[task, length]:
                body = _user(s).split("\n", 1)[1].rsplit("\n", 1)[0]    # between the intro line and the question
                needles = re.findall(r"One of the special magic numbers for (.+?) is: (\d{7})\.", body)
                assert len(needles) == {"niah_single": 1, "niah_multivalue": 4}.get(task, 4)
                for a in s["answers"]:
                    assert a in [v for _, v in needles]
                question = _user(s).rsplit("\n", 1)[1]
                assert all(k in question for k, v in needles if v in s["answers"])
                hay_part = _collapsed(re.sub(NEEDLE, " ", body))
                assert len(hay_part) > 2 * s["n_tokens"] and hay.startswith(hay_part)
                assert calib not in s["text"]
                for m in re.finditer(r"One of the special magic", body):
                    depths.append(m.start() / len(body))
                    at_end = re.fullmatch(rf"(?:{NEEDLE} ?)+", body[m.start():])  # depth 100, after a cut sentence
                    assert m.start() == 0 or at_end or re.search(r"""[.!?]["')\]]* $""", body[:m.start()])
    assert min(depths) < 0.2 and max(depths) > 0.8 and 0.3 < sum(depths) / len(depths) < 0.7


def test_vt_chain_leads_to_answers(built):
    spans = []
    for length in LENGTHS:
        for s in built["vt", length]:
            main = _user(s).rsplit("Memorize and track", 1)[1]
            value = re.search(r"assigned the value (\d+)", main).group(1)
            found, frontier = [], [value]
            while frontier:
                src = frontier.pop()
                for m in re.finditer(rf"VAR ([A-Z]+) = (?:VAR )?{src}\b", main):
                    found.append(m.group(1))
                    frontier.append(m.group(1))
            assert found == s["answers"] and len(set(found)) == 5
            lines = main.split("\n")
            at = [i / len(lines) for i, line in enumerate(lines) if "VAR " in line]
            spans.append(max(at) - min(at))
    assert sum(spans) / len(spans) > 0.3           # the chain is spread over the noise


def test_cwe_answers_are_most_common(built):
    for length in LENGTHS:
        for s in built["cwe", length]:
            listing = _user(s).rsplit("Memorize the ones that appear most often.\n", 1)[1].split("\nQuestion:")[0]
            words = re.split(r"(?:^| )\d+\. ", listing)[1:]
            counts = collections.Counter(words)
            top = sorted(counts.values(), reverse=True)
            assert sorted(s["answers"]) == sorted(w for w, c in counts.items() if c >= top[9]) and top[9] > top[10]


def test_qa_gold_in_documents(built):
    qas, docs = ruler.qa_data("hotpotqa")
    for length in LENGTHS:
        for s in built["qa_squad", length]:
            assert all(a in _user(s) for a in s["answers"])
        for s in built["qa_hotpot", length]:
            assert all(docs[i] in _user(s) for i in qas[s["index"]]["gold"])
            assert s["answers"] == qas[s["index"]]["outputs"]


def test_score_matches_ruler():
    from long_context_eval.eval.synthetic.constants import string_match_all_per_sample, string_match_part_per_sample

    s_all = {"answers": ["1234567", "7654321"], "metric": "all"}
    s_part = {"answers": ["Paris", "City of Paris"], "metric": "part"}
    assert ruler.score(" 1234567 and 7654321.", s_all) == 100.0
    assert ruler.score(" 1234567 only", s_all) == 50.0
    assert ruler.score(" nothing", s_all) == 0.0
    assert ruler.score(" paris", s_part) == 100.0 and ruler.score(" London", s_part) == 0.0
    for pred in (" 1234567 and 7654321.", " 7654321", "", " PARIS", "city of paris"):
        assert ruler.score(pred, s_all) == string_match_all_per_sample([pred], [s_all["answers"]])[0]
        assert ruler.score(pred, s_part) == string_match_part_per_sample([pred], [s_part["answers"]])[0]


def test_bad_input(tok, capsys):
    with pytest.raises(ValueError, match="unknown task"):
        ruler.build("niah_single_2", 2048, 1, tok)
    with pytest.raises(ValueError, match="too small"):
        ruler.build("niah_single", 200, 1, tok)
    with pytest.raises(ValueError, match="too small"):
        ruler.build("vt", 600, 1, tok)
    assert ruler.main(["--out", "/tmp/x.jsonl", "--tasks", "nope"]) == 2
    assert ruler.main(["--out", "/tmp/x.jsonl", "--lengths", "abc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)


def test_cli_writes_jsonl(smollm2_dir, tmp_path, built):
    out = tmp_path / "r.jsonl"
    assert ruler.main(["--out", str(out), "--tasks", "cwe", "--lengths", "2048", "--n", "2",
                       "--model", str(smollm2_dir)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == built["cwe", 2048][:2]
