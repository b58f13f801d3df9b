"""The reheat loop end to end on a small collapsed model (CPU, seconds)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tsopsd.config import load_config
from tsopsd.errors import TrainingStopped, TsopsdError
from tsopsd.loop import finish, reheat, run_dir_for, setup, train

TINY = Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml"


def cfg_for(collapsed, out, **overrides):
    ckpt, prompts = collapsed
    base = {"model.path": str(ckpt), "data.prompts": str(prompts), "output.out": str(out), "output.eval_prompts": 6}
    return load_config(TINY, {**base, **overrides})


def steps_of(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def first_and_last(metrics, key, n=5):
    """Mean of `key` over the first and the last n steps (single steps are noisy)."""
    vals = [m[key] for m in metrics]
    return sum(vals[:n]) / n, sum(vals[-n:]) / n


def base_weights(policy) -> dict:
    """The teacher's weights under the input's names: the frozen copy (full) or the base with the adapter off."""
    model = policy.teacher.model
    if policy.mode == "lora":
        model = model.get_base_model()
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("mode, lr", [("lora", 2e-3), ("full", 3e-4)])
def test_reheat_raises_entropy_and_keeps_top1(collapsed, tmp_path, mode, lr):
    ckpt, _ = collapsed
    out = tmp_path / "out"
    input_weights = load_file(ckpt / "model.safetensors")
    run = setup(cfg_for(collapsed, out, **{"train.mode": mode, "train.lr": lr, "train.steps": 80,
                                           "stop.entropy_tolerance": 0.0, "train.max_lr_factor": 1}))  # the method at this lr
    train(run, show_progress=False)
    trained = {n: p.detach().clone() for n, p in run.policy.student.named_parameters() if p.requires_grad}
    teacher = base_weights(run.policy)
    report = finish(run)
    metrics = steps_of(out)
    h_student0, h_student1 = first_and_last(metrics, "train/student_entropy")
    h_teacher, _ = first_and_last(metrics, "train/teacher_entropy")
    # at least half of the entropy gap to the teacher is closed, on the training rollouts...
    assert h_student1 - h_student0 >= 0.5 * (h_teacher - h_student0), (h_student0, h_student1, h_teacher)
    assert min(m["train/top1_agreement"] for m in metrics) >= 0.9
    # ...and on the held-out before/after report (prompts that never trained)
    before, after = report["before"], report["after"]
    print(f"{mode}: train H {h_student0:.4f} -> {h_student1:.4f} (teacher {h_teacher:.4f}); held-out H "
          f"{before['entropy']['mean']:.4f} -> {after['entropy']['mean']:.4f}, agreement "
          f"{after['reference']['top1_agreement']:.3f}")
    assert report["eval_prompts"] == 6 and before["prompts"] == 6
    assert report["rollout_compile"] == {"setting": "auto", "on": False, "compile_s": 0.0,
                                         "why": "auto: off on cpu (measured not to pay there: bench/decode.py)"}
    assert after["entropy"]["mean"] - before["entropy"]["mean"] >= 0.5 * (h_teacher - before["entropy"]["mean"])
    assert after["reference"]["top1_agreement"] >= 0.9
    # the output behaves like the input sampled hotter, and the report says how much hotter
    assert report["effective_temperature"] == after["reference"]["effective_temperature"] > 1.05
    layers = after["reference"]["layers"]  # representations measured against the frozen input, layer by layer
    assert len(layers["cosine"]) == 2 and all(0.5 < c < 1 for c in layers["cosine"]), layers
    # the teacher never moved: after 80 steps it is still bit for bit the input file (the frozen copy in
    # full mode, the base under the adapter in LoRA mode), and the input file itself is unchanged
    assert set(teacher) == set(input_weights)
    assert all(torch.equal(teacher[k], input_weights[k]) for k in input_weights)
    assert all(torch.equal(v, load_file(ckpt / "model.safetensors")[k]) for k, v in input_weights.items())
    # every trainable parameter changed
    for name, value in trained.items():
        if mode == "full":
            assert not torch.equal(value, input_weights[name]), name
        else:
            assert "lora_" in name and value.abs().sum() > 0, name
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "config.yaml", "metrics.jsonl",
            "reheat_report.json", "README.md"} <= files
    assert not run_dir_for(out).exists()


def test_held_out_prompts_never_train(collapsed, tmp_path):
    from tsopsd.run import prompts_for_step

    run = setup(cfg_for(collapsed, tmp_path / "o", **{"train.steps": 1}))
    held = {p.ids for p in run.eval_prompts}
    assert len(held) == 6 and not held & {p.ids for p in run.prompts} and len(run.prompts) == 17 - 6
    seen = {i for step in range(20) for i in prompts_for_step(len(run.prompts), 4, step, 0)}
    assert seen == set(range(len(run.prompts)))  # training reads only (and all of) the rest
    with pytest.raises(TsopsdError, match="17 prompts leave 1 for training after holding out 16 for the report"):
        setup(cfg_for(collapsed, tmp_path / "o2", **{"output.eval_prompts": 16}))


PLAIN_LOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
kind, path = sys.argv[1], sys.argv[2]
if kind == "adapter":
    from peft import AutoPeftModelForCausalLM
    model = AutoPeftModelForCausalLM.from_pretrained(path)
else:
    model = AutoModelForCausalLM.from_pretrained(path)
ids = torch.tensor([[5, 9, 14, 3, 7, 11]])
with torch.no_grad():
    print(json.dumps(model.eval()(input_ids=ids).logits[0].tolist()))
assert not any(m.startswith("tsopsd") for m in sys.modules)
"""


@pytest.mark.parametrize("save", ["adapter", "merged"])
def test_output_loads_with_plain_libraries_and_reproduces_logits(collapsed, tmp_path, save):
    out = tmp_path / save
    run = setup(cfg_for(collapsed, out, **{"train.steps": 6, "output.save": save, "output.eval_prompts": 0}))
    train(run, show_progress=False)
    with torch.no_grad():
        trained = run.policy.student(input_ids=torch.tensor([[5, 9, 14, 3, 7, 11]])).logits[0]
    finish(run)
    if save == "adapter":
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert Path(cfg["base_model_name_or_path"]) == collapsed[0].resolve()
        assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    loaded = plain_logits(out, save, tmp_path)
    # fp32 throughout; merging LoRA changes the summation order only
    assert torch.allclose(loaded, trained, atol=1e-4), (loaded - trained).abs().max()


def plain_logits(out, kind, cwd) -> torch.Tensor:
    """Logits of the written output, loaded by plain transformers/peft in a fresh process."""
    p = subprocess.run([sys.executable, "-c", PLAIN_LOAD, kind, str(out)], capture_output=True, text=True,
                       cwd=cwd, timeout=120)
    assert p.returncode == 0, p.stderr
    return torch.tensor(json.loads(p.stdout.strip().splitlines()[-1]))


def test_target_entropy_lands_within_two_percent(collapsed, tmp_path):
    target = 0.35
    report = reheat(cfg_for(collapsed, tmp_path / "o", **{
        "teacher.temperature": None, "teacher.target_entropy": target, "train.steps": 1, "output.eval_prompts": 0}),
        show_progress=False)
    first = steps_of(tmp_path / "o")[0]
    assert report["teacher_temperature_source"] == "target_entropy"
    assert abs(first["train/teacher_entropy"] - target) <= 0.02 * target
    assert report["teacher_temperature"] > 1


def test_target_entropy_from_checkpoint(collapsed, tmp_path, ckpts):
    # a checkpoint of the same tokenizer but much higher entropy: the collapsed model itself, heated by
    # scaling the final norm (so its entropy at T=1 is the collapsed one's at T=1.25)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsopsd.lab.tiny import sharpen_

    ckpt, _ = collapsed
    hot = tmp_path / "hot"
    m = AutoModelForCausalLM.from_pretrained(str(ckpt))
    sharpen_(m, 1 / 1.25)
    m.save_pretrained(str(hot))
    AutoTokenizer.from_pretrained(str(ckpt)).save_pretrained(str(hot))
    report = reheat(cfg_for(collapsed, tmp_path / "o", **{
        "teacher.temperature": None, "teacher.target_entropy_from": str(hot), "train.steps": 1,
        "output.eval_prompts": 6}), show_progress=False)
    # the same prompts sampled from a different model give a different batch: tau lands near 1.25, not on it
    assert report["teacher_temperature"] == pytest.approx(1.25, rel=0.15)
    # measured on every prompt (it is not trained: held-out and training prompts alike), with its interval
    measured = report["target"]["measured"]
    assert measured["entropy"] == report["target_entropy"] and measured["prompts"] == 17
    assert measured["interval"][0] < measured["entropy"] < measured["interval"][1]
    assert measured["precision"]["asked"] == 0.05 and measured["precision"]["outcome"]
    with pytest.raises(TsopsdError, match="tokenizer differs"):
        reheat(cfg_for(collapsed, tmp_path / "o2", **{"teacher.temperature": None,
                                                       "teacher.target_entropy_from": str(ckpts["qwen3"])}),
               show_progress=False)


# Resume after a signal at any moment (SIGINT, SIGTERM, SIGKILL; mid-step, at a periodic save, around
# the output's rename) equals an uninterrupted run: tests/test_bad_input_and_signals.py.


def test_existing_output_refused_without_overwrite(collapsed, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(TsopsdError, match="output folder exists.*--overwrite"):
        reheat(cfg_for(collapsed, out, **{"train.steps": 1}), show_progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    reheat(cfg_for(collapsed, out, **{"train.steps": 1, "output.overwrite": True, "output.eval_prompts": 0}),
           show_progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_nan_loss_stops_and_keeps_last_good_state(collapsed, tmp_path, monkeypatch):
    import tsopsd.loss as loss_mod

    common = {"output.eval_prompts": 0, "train.micro_batch": 64, "stop.entropy_tolerance": 0.0}
    real = loss_mod.divergence_and_grad
    calls = {"n": 0}

    def poisoned(student_logits, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # steps 1-3 fine (one chunk each), then the student's logits blow up
            student_logits = student_logits * float("nan")
        return real(student_logits, *args, **kwargs)

    monkeypatch.setattr(loss_mod, "divergence_and_grad", poisoned)
    out = tmp_path / "o"
    with pytest.raises(TrainingStopped, match="non-finite loss at step 4; rolled back to the weights after step 2"):
        reheat(cfg_for(collapsed, out, **{"train.steps": 10, **common}), show_progress=False)
    monkeypatch.setattr(loss_mod, "divergence_and_grad", real)
    report = json.loads((out / "reheat_report.json").read_text())
    assert report["steps_run"] == 3 and report["weights_after_step"] == 2 and "non-finite" in report["stop_reason"]
    assert len(steps_of(out)) == 3
    # what was written is the state at the start of the last step that passed (step 3): a clean 2-step run
    reheat(cfg_for(collapsed, tmp_path / "clean", **{"train.steps": 2, **common}), show_progress=False)
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "clean" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in a.values()) and all(torch.equal(a[k], b[k]) for k in a)


def test_drift_guard_stops_and_rolls_back(collapsed, tmp_path):
    common = {"train.lr": 0.005, "teacher.temperature": 2.0, "stop.entropy_tolerance": 0.0, "output.eval_prompts": 0}
    out = tmp_path / "o"
    with pytest.raises(TrainingStopped, match="drift guard") as stopped:  # a guard stopped it: exit 1, output written
        reheat(cfg_for(collapsed, out, **{"train.steps": 30, **common}), show_progress=False)
    report = stopped.value.report
    assert report == json.loads((out / "reheat_report.json").read_text())
    assert report["stop_reason"].startswith("drift guard"), report["stop_reason"]
    kept = report["weights_after_step"]
    assert "rolled back to the weights after step" in report["stop_reason"] and 0 < kept < report["steps_run"]
    # what was written is the last state that passed: a clean run of `kept` steps, bit for bit (the same
    # seeds; it ends before the weights that failed were even made)
    clean = reheat(cfg_for(collapsed, tmp_path / "clean", **{"train.steps": kept, **common}), show_progress=False)
    assert clean["stop_reason"] == f"completed {kept} steps"
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "clean" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # without rollback the weights that failed are written, and they differ
    with pytest.raises(TrainingStopped) as stopped:
        reheat(cfg_for(collapsed, tmp_path / "u", **{"train.steps": 30, "stop.rollback": False, **common}),
               show_progress=False)
    unrolled = stopped.value.report
    assert "stop.rollback is off" in unrolled["stop_reason"]
    c = load_file(tmp_path / "u" / "model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_random_weights_are_refused(ckpts, tmp_path, collapsed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, prompts = collapsed
    rnd = tmp_path / "random"
    m = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(str(ckpt)).config)
    m.save_pretrained(str(rnd))
    AutoTokenizer.from_pretrained(str(ckpt)).save_pretrained(str(rnd))
    with pytest.raises(TsopsdError, match="near uniform"):
        reheat(cfg_for((rnd, prompts), tmp_path / "o"), show_progress=False)
    assert not (tmp_path / "o").exists()


def test_teacher_check_catches_a_wrong_training_path(collapsed):
    from tsopsd.checkpoint import load_checkpoint
    from tsopsd.prompts import load_prompts
    from tsopsd.rollout import sample_rollouts
    from tsopsd.scoring import Scorer
    from tsopsd.teacher import check_teacher

    ckpt, prompts = collapsed
    ck = load_checkpoint(ckpt, device="cpu")
    items = load_prompts(prompts, ck.tokenizer)[:4]
    r = sample_rollouts(ck.model, ck.tokenizer, items, samples_per_prompt=2, max_new_tokens=6)
    good = check_teacher(Scorer(ck.model), r, 1.5)
    assert good["entropy_tau"] > good["entropy_t1"] and good["log_vocab"] == pytest.approx(math.log(len(ck.tokenizer)),
                                                                                            abs=0.01)
    check_teacher(Scorer(ck.model), r, 1.5, measured_teacher_entropy=good["entropy_tau"])
    with pytest.raises(RuntimeError, match="teacher check failed"):
        check_teacher(Scorer(ck.model), r, 1.5, measured_teacher_entropy=good["entropy_tau"] * 1.01)


def test_share_prompts_false_runs_every_rows_prompt_everywhere(collapsed, tmp_path, monkeypatch):
    """`train.share_prompts: false` reaches every pass: the rollout's prefill, the tau solve's teacher
    states (target entropy) and the loss's teacher and student passes. With it on, they share."""
    import tsopsd.rollout
    import tsopsd.scoring

    calls = {"prefill": 0, "hidden": 0}
    prefill, hidden = tsopsd.rollout._prefill, tsopsd.scoring.shared_prompt_hidden

    def counted_prefill(model, prompt_ids, pad_id, device, share=True):
        calls["prefill"] += share and len({tuple(p) for p in prompt_ids}) < len(prompt_ids)
        return prefill(model, prompt_ids, pad_id, device, share)

    def counted_hidden(*a, **k):
        calls["hidden"] += 1
        return hidden(*a, **k)

    monkeypatch.setattr(tsopsd.rollout, "_prefill", counted_prefill)
    monkeypatch.setattr(tsopsd.scoring, "shared_prompt_hidden", counted_hidden)
    common = {"teacher.temperature": None, "teacher.target_entropy": 0.35, "train.steps": 2, "output.eval_prompts": 0}
    reheat(cfg_for(collapsed, tmp_path / "off", **common, **{"train.share_prompts": False}), show_progress=False)
    assert calls == {"prefill": 0, "hidden": 0}
    reheat(cfg_for(collapsed, tmp_path / "on", **common), show_progress=False)
    assert calls["prefill"] > 0 and calls["hidden"] > 0


@pytest.mark.slow
def test_a_compiled_run_trains_what_an_eager_run_trains(collapsed, tmp_path, compile_state):
    """`rollout.compile: true` end to end: compiled once for the run (the report says so and how long),
    and the run's rollouts and losses are the eager run's to float rounding."""
    common = {"train.steps": 3, "output.eval_prompts": 0}
    eager = reheat(cfg_for(collapsed, tmp_path / "eager", **common, **{"rollout.compile": "false"}),
                   show_progress=False)
    compiled = reheat(cfg_for(collapsed, tmp_path / "compiled", **common, **{"rollout.compile": "true"}),
                      show_progress=False)
    assert eager["rollout_compile"]["on"] is False and eager["rollout_compile"]["compile_s"] == 0
    assert compiled["rollout_compile"]["on"] is True and compiled["rollout_compile"]["compile_s"] > 0
    a, b = steps_of(tmp_path / "eager"), steps_of(tmp_path / "compiled")
    for key in ("train/tokens", "train/completion_length"):
        assert [m[key] for m in a] == [m[key] for m in b], key
    for key in ("train/loss", "train/student_entropy"):
        assert [m[key] for m in a] == pytest.approx([m[key] for m in b], rel=1e-4), key


def test_each_step_logs_its_phases_and_the_report_its_medians(collapsed, tmp_path):
    """metrics.jsonl: seconds per phase for every step (the step-0 check takes time on step 0 only), within the step's;
    the report: the median step and phases. (On a GPU each step also logs its peak allocated and reserved bytes,
    and the report sets `tsopsd plan` of the run beside them: bench/gpu.sh.)"""
    out = tmp_path / "o"
    report = reheat(cfg_for(collapsed, out, **{"train.steps": 3, "output.eval_prompts": 0}), show_progress=False)
    rows = steps_of(out)
    for row in rows:
        phases = {k.removeprefix("time/"): v for k, v in row.items() if k.startswith("time/")}
        assert phases.keys() == {"heldout", "rollout", "solve", "teacher", "student", "check", "optimizer"}  # same columns
        assert (phases["check"] > 0) == (row["step"] == 1) and phases["student"] > 0
        assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= row["train/seconds"]
        assert not any(k.startswith("memory/") for k in row)  # a CPU run has no device peak to report
    measured = report["measured"]
    assert measured["steps"] == 3 and measured["step_seconds_median"] == sorted(r["train/seconds"] for r in rows)[1]
    assert measured["phase_seconds_median"]["student"] > 0 and report["planned"] is None


def test_by_default_min_16_or_20_percent_are_held_out_or_the_given_file(collapsed, tmp_path):
    from tsopsd.run import held_out_count

    assert [held_out_count(n, None) for n in (4, 20, 79, 80, 1000)] == [0, 4, 15, 16, 16]
    assert held_out_count(20, 0) == 0 and held_out_count(20, 7) == 7
    run = setup(cfg_for(collapsed, tmp_path / "o", **{"train.steps": 1, "output.eval_prompts": None}))
    assert len(run.eval_prompts) == 17 // 5 and len(run.prompts) == 17 - 17 // 5  # the 17-prompt fixture trains
    run.lock.release()
    held = tmp_path / "held.jsonl"
    held.write_text('{"prompt": "sum 99 ="}\n{"prompt": "pair for 98 ="}\n')
    run = setup(cfg_for(collapsed, tmp_path / "o2", **{"train.steps": 1, "output.eval_prompts": None,
                                                        "data.eval_prompts": str(held)}))
    assert [p.text for p in run.eval_prompts] == ["sum 99 =", "pair for 98 ="] and len(run.prompts) == 17
    run.lock.release()


@pytest.mark.parametrize("save", ["merged", "adapter"])
def test_checkpoint_every_writes_loadable_checkpoints(collapsed, tmp_path, save):
    """`output.checkpoint_every`: OUT/checkpoint-2 of a 4-step run is an ordinary checkpoint
    (or adapter) that plain transformers/peft load, holding exactly what a 2-step run writes as its output."""
    from transformers import AutoModelForCausalLM

    ckpt, prompts = collapsed
    common = {"model.path": str(ckpt), "data.prompts": str(prompts), "output.save": save, "output.eval_prompts": 2}
    reheat(load_config(TINY, common | {"output.out": str(tmp_path / "two"), "train.steps": 2}), show_progress=False)
    report = reheat(load_config(TINY, common | {"output.out": str(tmp_path / "four"), "train.steps": 4,
                                                "output.checkpoint_every": 2}), show_progress=False)
    assert report["checkpoints"] == ["checkpoint-2"]
    assert sorted(p.name for p in (tmp_path / "four").iterdir() if p.is_dir()) == ["checkpoint-2"]
    mid = tmp_path / "four" / "checkpoint-2"
    assert (mid / "tokenizer.json").is_file() and not (tmp_path / "four.tsopsd-run").exists()
    if save == "merged":
        got = AutoModelForCausalLM.from_pretrained(mid).state_dict()
        want = AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(ckpt)
        got = PeftModel.from_pretrained(base, mid).state_dict()
        want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt), tmp_path / "two").state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "four") if save == "merged" else None
    assert final is None or not all(torch.equal(final.state_dict()[k], got[k]) for k in got)  # 4 steps differ
