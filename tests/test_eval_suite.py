"""The evaluation report (bench/eval_suite.py) on synthetic run results: scores, KV kept matched from the backend's
statistics, fidelity to dense, multi-turn and the plot. The GPU step itself runs on the device machine."""
import json

import pytest

from bench import eval_suite, ruler


@pytest.fixture(scope="module")
def samples(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    return [s for t in ("niah_single", "qa_squad") for s in ruler.build(t, 2048, 3, tok)]


def fake_run(name, backend, samples, right: bool, kept=None, fid_shift=0, **spec):
    keys = ("task", "length", "index", "answers", "metric")
    ruler_rows = [{**{k: s[k] for k in keys}, "n_tokens": s["n_tokens"],
                   "output": " ".join(s["answers"]) if right else "no idea"} for s in samples]
    fid = [{"length": 2048, "index": i, "logprobs": [-1.0 - fid_shift] * 4, "argmax": [1, 2, 3, 4 + fid_shift],
            "continuation": [5, 6, 7, 8 + fid_shift]} for i in range(2)]
    mt = [{"length": 2048, "index": 0, "turn": t, "output": "1234567" if right else "?", "answer": "1234567",
           "cached": 100 * t, "prompt_tokens": 1500 + t} for t in range(eval_suite.MT_TURNS)]
    mt += [{"turn": t, "kept": kept} for t in range(eval_suite.MT_TURNS)]
    stats = [{"seq_len": s["n_tokens"], "kept": kept} for s in samples] + [{"seq_len": 7, "kept": 0.9}]
    return {"spec": {"name": name, "backend": backend, **spec}, "device": "test", "date": "today",
            "phases": {"ruler": ruler_rows, "fidelity": fid, "multiturn_separate": mt, "multiturn_conversation": mt,
                       "ttft": {"4096": {"first": 1, "median_rest": 0.1}, "8192": {"first": 1, "median_rest": 0.2}}},
            "stats": {"ruler": stats if backend == "tca" else []}}


def test_report_scores_kept_fidelity_and_plot(samples, tmp_path):
    runs = [fake_run("dense", "triton", samples, True), fake_run("tca eps=0.1", "tca", samples, True, 0.3),
            fake_run("streaming w=2048", "tca", samples, False, 0.25, fid_shift=1)]
    summ = eval_suite.summarize(runs)
    assert summ["dense"]["avg"][2048][0] == 100 and summ["dense"]["kept"][2048] == 1.0
    assert summ["tca eps=0.1"]["avg"][2048][0] == 100 and summ["tca eps=0.1"]["kept"] == {2048: 0.3}
    assert summ["streaming w=2048"]["avg"][2048][:3:2] == (0, 6)                    # score 0, n = 6 samples
    f_same, f_off = summ["tca eps=0.1"]["fidelity"][2048], summ["streaming w=2048"]["fidelity"][2048]
    assert f_same["agree"][0] == 1 and f_same["dnll"][0] == 0 and f_same["cont"][0] == 1
    assert f_off["agree"][0] == 0.75 and f_off["dnll"][0] == pytest.approx(1.0) and f_off["cont"][0] == 0.75
    mt = summ["streaming w=2048"]["mt"]["separate"]
    assert mt[0][0][0] == 0 and mt[3][1] == 300 and mt[3][2] == 0.25
    runs[1]["date"] = "tomorrow"
    md = eval_suite.markdown(runs, summ)
    assert "| tca eps=0.1 | 100.0 ± 0.0 | 0.300 |" in md and "- date: today, tomorrow " in md
    s8 = {k: {**v, "avg": {8192: v["avg"][2048]}, "kept": {8192: v["kept"].get(2048)}} for k, v in summ.items()}
    eval_suite.plots(s8, tmp_path)
    assert (tmp_path / "eval_smollm2.png").stat().st_size > 10_000
    json.dumps(summ)                                                                 # the summary is plain data


def test_paired_differences_match_runs_to_their_baselines(samples):
    """Each TCA run is compared, prompt by prompt, with dense and the StreamingLLM run made from its budgets file, and
    with its peers at its eps: uniform and random without observe; TCA and uniform+observe for an observe run; runs
    at another eps are not baselines."""
    half = [s["index"] < 2 for s in samples]                         # right on 4 of the 6 prompts
    run = fake_run("tca+obs32 eps=0.1", "tca", samples, True, 0.3, budgets="b0.1", eps=0.1, observe=32)
    run["phases"]["ruler"] = [r if h else {**r, "output": "no idea"} for r, h in zip(run["phases"]["ruler"], half)]
    runs = [fake_run("dense", "triton", samples, True), run,
            fake_run("tca eps=0.1", "tca", samples, False, 0.3, budgets="b0.1", eps=0.1),
            fake_run("uniform+obs32 eps=0.1", "tca", samples, False, 0.3, budgets="u0.1", eps=0.1, observe=32),
            fake_run("streaming w=1984", "tca", samples, False, 0.3, budgets="b0.1", policy="streaming", window=1984),
            fake_run("streaming w=3200", "tca", samples, False, 0.4, budgets="b0.05", policy="streaming", window=3200),
            fake_run("tca eps=0.05", "tca", samples, False, 0.4, budgets="b0.05", eps=0.05),
            fake_run("uniform eps=0.1", "tca", samples, False, 0.3, budgets="u0.1", eps=0.1),
            fake_run("random eps=0.1", "tca", samples, True, 0.3, budgets="b0.1", eps=0.1, policy="random")]
    rows = {(a, b): d for a, b, d in eval_suite.paired_rows(eval_suite.summarize(runs), length=2048)}
    assert set(rows) == {("tca+obs32 eps=0.1", b) for b in ("dense", "tca eps=0.1", "uniform+obs32 eps=0.1",
                                                            "streaming w=1984")} | {
        ("tca eps=0.1", b) for b in ("dense", "streaming w=1984", "uniform eps=0.1", "random eps=0.1")} | {
        ("tca eps=0.05", b) for b in ("dense", "streaming w=3200")}
    assert rows[("tca eps=0.1", "random eps=0.1")][0] == pytest.approx(-100)
    d = rows[("tca+obs32 eps=0.1", "dense")]
    assert d[0] == pytest.approx(-100 / 3) and d[2] == 6 and d[1] > 0
    assert rows[("tca+obs32 eps=0.1", "streaming w=1984")][0] == pytest.approx(200 / 3)
    assert rows[("tca eps=0.1", "streaming w=1984")][0] == pytest.approx(0)


def test_paired_rows_of_a_dense_observing_prefill_run(samples):
    """A run with --tca-observe-prefill dense is compared with uniform budgets under the same, TCA without observe and
    TCA with observe's sparse prefill (not with uniform under the sparse one)."""
    runs = [fake_run("dense", "triton", samples, True),
            fake_run("tca+obs32+dense eps=0.1", "tca", samples, True, 0.3, budgets="b0.1", eps=0.1, observe=32,
                     observe_prefill="dense"),
            *[fake_run(n, "tca", samples, False, 0.3, budgets=b, eps=0.1, **kw) for n, b, kw in (
                ("tca+obs32 eps=0.1", "b0.1", {"observe": 32}), ("uniform+obs32 eps=0.1", "u0.1", {"observe": 32}),
                ("uniform+obs32+dense eps=0.1", "u0.1", {"observe": 32, "observe_prefill": "dense"}),
                ("tca eps=0.1", "b0.1", {}))]]
    rows = {(a, b): d for a, b, d in eval_suite.paired_rows(eval_suite.summarize(runs), length=2048)
            if a == "tca+obs32+dense eps=0.1"}
    assert set(rows) == {("tca+obs32+dense eps=0.1", b) for b in (
        "dense", "tca+obs32 eps=0.1", "uniform+obs32+dense eps=0.1", "tca eps=0.1")}
    assert rows[("tca+obs32+dense eps=0.1", "tca+obs32 eps=0.1")][0] == pytest.approx(100)
    md = eval_suite.markdown(runs, eval_suite.summarize(runs))        # teacher-forced fidelity is dense's there
    fid = {line.split(" | ")[0][2:]: line for line in md.split("## Fidelity")[1].split("\n## ")[0].splitlines()
           if line.startswith("| ")}
    assert fid["tca+obs32+dense eps=0.1"].startswith("| tca+obs32+dense eps=0.1 | (dense) | (dense) | 1.000 |")
    assert "(dense)" not in fid["tca+obs32 eps=0.1"] and "by construction" in md


def test_plan_widens_the_window_to_the_streaming_peers_share():
    """The wide-window runs keep at most the share of the StreamingLLM run they are paired with (expected at 8K),
    with a window wider than their budgets' own; the observe runs come first, at the peer budgets; --only picks runs
    in its order and refuses unknown names."""
    from sglang_tca.budgets import Budgets

    runs = eval_suite.plan(eval_suite.BUDGETS_DIR)
    by = {r["name"]: r for r in runs}
    wide = [r for r in runs if r.get("streaming_peer")]
    assert len(wide) == 3
    for r in wide:
        peer, b = by[r["streaming_peer"]], Budgets.load(r["budgets"])
        assert peer["policy"] == "streaming" and r["window"] > b.window and r["window"] % b.block == 0
        cap = b.expected_kept(8192, window=peer["window"], rho=0.0)
        assert b.expected_kept(8192, window=r["window"]) <= cap < b.expected_kept(8192, window=r["window"] + b.block)
        assert r["name"] == f"tca w={r['window']} eps={r['eps']}"
    observing = [r for r in runs if r.get("observe")]       # on freed memory since --tca-observe works there
    assert {r["name"] for r in observing} == {f"{k}+obs32{d} eps={e}" for k in ("tca", "uniform")
                                              for d in ("", "+dense") for e in (0.07, 0.1)} | {"tca+obs32 eps=0.05"}
    assert [r["name"] for r in runs[1:5]] == ["tca+obs32 eps=0.07", "uniform+obs32 eps=0.07",
                                              "tca+obs32+dense eps=0.07", "uniform+obs32+dense eps=0.07"]
    assert by["tca eps=0.07"]["budgets"] == runs[1]["budgets"] == runs[3]["budgets"]
    assert by["uniform+obs32 eps=0.07"]["budgets"].endswith("uniform_w1024_eps0.07.json")
    assert {r["name"] for r in observing if r.get("observe_prefill") == "dense"} == {
        n for n in by if "+dense" in n}
    names = [wide[1]["name"], "dense"]
    assert [r["name"] for r in eval_suite.select_runs(runs, names)] == names
    with pytest.raises(SystemExit, match="no run of the plan.*'tca eps=9'"):
        eval_suite.select_runs(runs, ["dense", "tca eps=9"])


def test_paired_rows_of_a_wide_window_run(samples):
    half = [s["index"] < 2 for s in samples]
    wide = fake_run("tca w=2240 eps=0.2", "tca", samples, True, 0.32, budgets="b0.2", eps=0.2, window=2240,
                    streaming_peer="streaming w=2560")
    wide["phases"]["ruler"] = [r if h else {**r, "output": "no idea"} for r, h in zip(wide["phases"]["ruler"], half)]
    runs = [fake_run("dense", "triton", samples, True), wide,
            fake_run("streaming w=2560", "tca", samples, False, 0.32, budgets="b0.07", policy="streaming",
                     window=2560),
            fake_run("tca eps=0.2", "tca", samples, False, 0.18, budgets="b0.2", eps=0.2)]
    rows = {(a, b): d for a, b, d in eval_suite.paired_rows(eval_suite.summarize(runs), length=2048)
            if a == wide["spec"]["name"]}
    assert set(rows) == {(wide["spec"]["name"], "dense"), (wide["spec"]["name"], "streaming w=2560")}
    assert rows[(wide["spec"]["name"], "streaming w=2560")][0] == pytest.approx(200 / 3)
