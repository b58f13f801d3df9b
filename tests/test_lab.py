"""The lab's statistics, its shifted reward, GRPO's entropy bonus and the exploration suite's plumbing."""

import itertools
import json
import math
import shutil

import pytest

from tsopsd.lab import exploration
from tsopsd.lab.stats import interval, paired, pass_at_k
from tsopsd.lab.sumtask import is_correct, larger_first


def test_pass_at_k_is_the_chance_that_k_draws_hold_a_correct_one():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                draws = list(itertools.combinations([True] * c + [False] * (n - c), k))
                expect = sum(any(d) for d in draws) / len(draws)  # every k-subset, equally likely
                assert pass_at_k(n, c, k) == pytest.approx(expect, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_bootstrap_interval_matches_the_exact_resampling_distribution():
    xs = [0.1, 0.5, 0.9]
    # every one of the 27 equally likely resamples, exactly
    means = sorted(sum(r) / 3 for r in itertools.product(xs, repeat=3))
    got = interval(xs, level=0.5)
    # the 25th and 75th percentiles of the exact distribution, to within the Monte Carlo error
    assert got["low"] == pytest.approx(means[math.floor(0.25 * 27)], abs=0.03)
    assert got["high"] == pytest.approx(means[math.ceil(0.75 * 27) - 1], abs=0.03)
    assert got["mean"] == pytest.approx(0.5)
    assert interval(xs) == interval(xs)  # seeded
    assert interval([0.3] * 8) == {"mean": 0.3, "low": 0.3, "high": 0.3, "n": 8}


def test_paired_difference_is_real_only_when_its_interval_excludes_zero():
    base = [0.2, 0.9, 0.4, 0.7, 0.1, 0.6, 0.3, 0.8]  # large spread between seeds...
    shifted = [b + 0.05 for b in base]  # ...but the same small gain on every seed
    d = paired(shifted, base)
    assert d["real"] and d["low"] == pytest.approx(0.05) and d["high"] == pytest.approx(0.05)
    assert not paired(base, base)["real"]
    noise = [b + (0.05 if i % 2 else -0.05) for i, b in enumerate(base)]
    assert not paired(noise, base)["real"]
    # unpaired, the same gain would be lost in the spread between seeds
    assert interval(shifted)["low"] < interval(base)["high"]
    with pytest.raises(ValueError):
        paired([1.0], [1.0, 2.0])


def test_shifted_reward_by_hand():
    assert larger_first(12, " 7 5") and is_correct(12, " 5 7") and not larger_first(12, " 5 7")
    assert not larger_first(12, " 6 6") and not larger_first(12, " 8 5") and not larger_first(12, "7 5 x")


def test_entropy_bonus_raises_grpo_entropy(collapsed):
    from tsopsd.checkpoint import load_checkpoint
    from tsopsd.lab.grpo import grpo
    from tsopsd.lab.sumtask import parse_target
    from tsopsd.prompts import load_prompts

    ckpt, prompts_file = collapsed
    ends, firsts = {}, []
    for coeff in (0.0, 0.5):
        ck = load_checkpoint(ckpt, device="cpu")
        prompts = load_prompts(prompts_file, ck.tokenizer)
        history = grpo(ck.model, ck.tokenizer, prompts, lambda i, t, ps=prompts: is_correct(parse_target(ps[i].text), t),
                       steps=15, group_size=4, lr=3e-3, entropy_coeff=coeff, seed=1)
        ends[coeff] = sum(h["entropy"] for h in history[-5:]) / 5
        firsts.append(history[0]["entropy"])
    assert firsts[0] == pytest.approx(firsts[1], rel=1e-5)  # the first rollouts come before any update: the same
    assert ends[0.5] > ends[0.0] + 0.05, ends


def test_steps_to_threshold_and_bold_only_with_enough_seeds():
    budget = exploration.Budget(rl_steps=30, eval_every=10)
    curve = [{"step": s, "pass@1": p} for s, p in ((0, 0.5), (10, 0.85), (20, 0.92), (30, 0.8))]
    assert exploration.steps_to(curve, 0.9, budget) == (20, True)
    assert exploration.steps_to(curve, 0.95, budget) == (40, False)
    real = {"mean": 0.1, "low": 0.05, "high": 0.15, "real": True}
    assert exploration._diff({**real, "n": 8}).startswith("**")
    assert not exploration._diff({**real, "n": 2}).startswith("**")


@pytest.mark.xdist_group("quick_demo")
def test_exploration_suite_runs_paired_and_writes_its_results(quick_demo, tmp_path):
    """A tiny budget end to end (the real GRPO, evaluation, statistics and files). Directions are checked only
    where they are robust: every start from the same checkpoint sees the same step-0 evaluation (paired
    seeds), and the reheated checkpoints start with more entropy than the collapsed one."""
    demo, _ = quick_demo
    work = tmp_path / "lab"
    work.mkdir()
    for stage in ("sft", "collapsed", "reheated"):
        shutil.copytree(demo / stage, work / stage)
    shutil.copytree(demo / "reheated", work / f"reheated-tau{exploration.TAU:g}")  # stands in for the fixed-tau reheat
    shutil.copytree(demo / "reheated", work / "reheated-forking")  # and for the selective one (the closed form and
    # SSD are built: seconds)
    budget = exploration.Budget(rl_steps=4, eval_every=2, eval_samples=2, final_samples=4)
    done = []
    result = exploration.run_suite(work, budget, seeds=2, quick=True, on_done=lambda i, n, r: done.append((i, n)))
    assert done[-1] == (32, 32) and len(result["runs"]) == 32  # 8 starts x 2 rewards x 2 seeds
    for reward in ("same", "shifted"):
        for seed in range(2):
            runs = {r["start"]: r for r in result["runs"] if r["reward"] == reward and r["seed"] == seed}
            from_collapsed = [runs[s.label]["curve"][0] for s in exploration.STARTS if s.checkpoint == "collapsed"]
            assert len(from_collapsed) == 3 and all(c == from_collapsed[0] for c in from_collapsed)
            assert [p["step"] for p in runs[exploration.STARTS[0].label]["curve"]] == [0, 2, 4]
            reheated = runs[exploration.STARTS[4].label]["curve"][0]["entropy"]
            assert reheated > from_collapsed[0]["entropy"] + 0.05
        s = result["summary"][reward]
        for row in s["starts"].values():
            for m in (m for m in exploration.METRICS if m in row):  # pass@64 needs 64 samples (4 here)
                assert row[m]["low"] <= row[m]["mean"] + 1e-12 and row[m]["mean"] <= row[m]["high"] + 1e-12
        a, e = exploration.STARTS[0].label, exploration.STARTS[4].label
        diff = s["differences"][f"{e} - {a}"]["entropy"]
        assert diff["mean"] == pytest.approx(s["starts"][e]["entropy"]["mean"] - s["starts"][a]["entropy"]["mean"])
        assert set(s["starts"][a]["pass@k"]) == {"1", "2", "4"}  # unbiased pass@k for every k the samples allow
    closed = json.loads((work / "scaled" / "reheat_report.json").read_text())
    assert closed["method"] == "scale" and closed["steps_run"] == 0
    assert json.loads((work / "ssd" / "ssd.json").read_text())["temperature"] == closed["teacher_temperature"]
    layers = result["checkpoints"]["collapsed"]["vs_collapsed"]["layers"]["cosine"]
    assert layers == pytest.approx([1.0] * len(layers))
    files = exploration.write_results(result, tmp_path / "results", "test")
    assert {f.name for f in files} >= {"results.md", "results.json", "continued_rl_same.png", "continued_rl_shifted.png"}
    text = (tmp_path / "results" / "results.md").read_text()
    assert "smoke run, not evidence" in text and "**" not in text.split("## Checkpoints")[1]
    assert json.loads((tmp_path / "results" / "results.json").read_text())["seeds"] == 2

