"""bench/ablation_hf.py's variants of the reference TCA on a tiny random Llama (block 8, window 32), and its report."""
import json

import pytest
import torch

from bench import ablation_hf
from bench.ablation_hf import Variant, answer_scores, teacher_forced
from calibration.calibrate import calibrate
from sglang_tca.params import dense_start
from sglang_tca.hf_attention import Dense, attention_policy

L = 200


@pytest.fixture(scope="module")
def budgets(tiny_llama):
    ids = torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(1))
    return calibrate(tiny_llama, ids, eps=0.3, block=8, window=32, scoring="block_last", n_rows=32)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 128, (1, L), generator=torch.Generator().manual_seed(2))


def prompt_logits(model, ids, policy):
    with attention_policy(policy), torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits[0]


def test_dense_prefill_is_dense_and_sparse_prefill_is_not(tiny_llama, budgets, prompt):
    dense = prompt_logits(tiny_llama, prompt, Dense())
    torch.testing.assert_close(prompt_logits(tiny_llama, prompt, Variant(budgets, observe=8, dense_prefill=True)), dense)
    assert not torch.allclose(prompt_logits(tiny_llama, prompt, Variant(budgets)), dense, atol=1e-4)


def test_dense_tail_opens_only_the_last_rows(budgets):
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(4, L, 16, generator=g), torch.randn(2, L, 16, generator=g)
    pos = torch.arange(L)
    sparse = Variant(budgets, observe=8).mask(0, q, k, pos, 0.25)
    tail = Variant(budgets, observe=8, dense_tail=4).mask(0, q, k, pos, 0.25)
    causal = pos[None, :] <= pos[:, None]
    assert torch.equal(tail[:, :-4], sparse[:, :-4]) and not torch.equal(sparse[:, -4:], tail[:, -4:])
    assert torch.equal(tail[:, -4:], causal[-4:].expand(2, -1, -1))


def test_observed_counts_per_head_joint_and_global(tiny_llama, budgets, prompt):
    """Per head the observed choice keeps the prefix-pure count of each head; joint keeps each layer's total over
    its heads; global (decode) keeps the total over all layers."""
    b = budgets.block
    ds = int(dense_start(L, b, budgets.window))
    per_head, joint, glob = Variant(budgets, observe=8), Variant(budgets, observe=8, joint=True), Variant(budgets, observe=8, global_=True)
    prefix = Variant(budgets)
    for v in (per_head, joint, prefix):
        prompt_logits(tiny_llama, prompt, v)
    target = torch.tensor([5, 6, 7])
    teacher_forced(tiny_llama, prompt, target, glob)
    for layer in range(2):
        counts = prefix.counts[layer][:, 1:ds // b].sum(-1)                     # prefix-pure kept tokens per head
        assert torch.equal(per_head.observed[layer].sum(-1), counts)
        assert int(joint.observed[layer].sum()) == int(counts.sum())
    assert sum(int(glob.observed[i].sum()) for i in range(2)) == sum(int(per_head.observed[i].sum()) for i in range(2))
    assert not glob.scores                                                       # consumed by the first decode step


def test_oracle_ranks_by_the_answers_queries(tiny_llama, budgets, prompt):
    """With a one-token answer the oracle's queries are the prompt's last one, so on a dense prefill it chooses what
    observe 1 chooses; a longer answer's queries choose differently (same counts)."""
    def observed(v, target):
        if v.oracle:
            v.answer_scores = answer_scores(tiny_llama, prompt, target, v.params)
        prompt_logits(tiny_llama, prompt, v)
        return v.observed

    ds = int(dense_start(L, budgets.block, budgets.window))
    obs1 = observed(Variant(budgets, observe=1, dense_prefill=True), None)
    one = observed(Variant(budgets, observe=1, oracle=True, dense_prefill=True), torch.tensor([5]))
    five = observed(Variant(budgets, observe=1, oracle=True, dense_prefill=True), torch.tensor([5, 9, 17, 3, 40]))
    for layer in range(2):
        assert one[layer].shape == (2, ds - budgets.block)
        assert torch.equal(one[layer], obs1[layer])
        assert torch.equal(five[layer].sum(-1), obs1[layer].sum(-1))
    assert any(not torch.equal(five[i], obs1[i]) for i in range(2))


def test_teacher_forced_dense_reproduces_greedy(tiny_llama, prompt):
    with attention_policy(Dense()), torch.no_grad():
        gen = tiny_llama.generate(prompt, max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(prompt))
    target = gen[0, L:]
    assert torch.equal(teacher_forced(tiny_llama, prompt, target, Dense()), target)


def test_report_counts_answers_reproduced(tmp_path):
    rows = [{"task": "niah_single", "index": 0, "dense_score": 100.0, "kept": {"dense": 1.0, "v": 0.3},
             "agree": {"dense": 1.0, "v": 0.5}, "prefix_score": {"dense": 100.0, "v": 100.0}},
            {"task": "niah_single", "index": 1, "dense_score": 100.0, "kept": {"dense": 1.0, "v": 0.3},
             "agree": {"dense": 1.0, "v": 0.0}, "prefix_score": {"dense": 100.0, "v": 0.0}},
            {"task": "vt", "index": 0, "dense_score": 0.0, "kept": {"dense": 1.0, "v": 0.2},
             "agree": {"dense": 1.0, "v": 1.0}, "prefix_score": {"dense": 0.0, "v": 0.0}}]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ablation_hf.report([path], tmp_path / "a.md")
    md = (tmp_path / "a.md").read_text()
    assert "| v | 0.267 | 0.50 [0.09, 0.91] | 33.3 | 0.500 |" in md
    assert "| v | 0.50 | 0.00 |" in md
    more = tmp_path / "b.jsonl"                        # pooled with a disjoint run that lacks variant v
    more.write_text(json.dumps({**rows[0], "index": 7, "kept": {"dense": 1.0}, "agree": {"dense": 1.0},
                                "prefix_score": {"dense": 100.0}}) + "\n")
    ablation_hf.report([path, more], tmp_path / "c.md")
    md = (tmp_path / "c.md").read_text()
    assert "retained (of 3 dense-correct)" in md and "| v |" not in md and "| dense | 1.000 | 1.00 [0.44, 1.00]" in md
    with pytest.raises(SystemExit, match="twice"):
        ablation_hf.report([path, path], tmp_path / "d.md")


def test_wilson_interval():
    assert ablation_hf.wilson(0, 10)[0] == pytest.approx(0, abs=1e-12) and ablation_hf.wilson(10, 10)[1] == pytest.approx(1)
    lo, hi = ablation_hf.wilson(26, 29)
    assert lo == pytest.approx(0.7357, abs=1e-3) and hi == pytest.approx(0.9642, abs=1e-3)
