"""`tsopsd watch`: follow a run folder's checkpoints; reheat where the entropy collapsed; exit codes for scripts."""

import copy
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from tsopsd.cli import app
from tsopsd.errors import ExitCode
from tsopsd.trajectory import collapse_point

runner = CliRunner()


def test_the_collapse_rule_needs_its_run_of_low_checkpoints():
    h = [1.0, 0.9, 0.4, 0.6, 0.3, 0.2]
    assert collapse_point(h, 0.5, min_entropy=None, consecutive=1) == 2
    assert collapse_point(h, 0.5, min_entropy=None, consecutive=2) == 5  # 0.4 alone, then 0.6 breaks the run
    assert collapse_point(h, 0.5, min_entropy=0.7, consecutive=2) == 3  # the absolute floor is the higher one
    assert collapse_point(h, 0.1, min_entropy=None, consecutive=1) is None
    assert collapse_point([], 0.5, min_entropy=None, consecutive=1) is None


@pytest.fixture
def run_dir(collapsed, tmp_path):
    """A TRL-shaped run folder of three checkpoints: two hot (the collapsed model's logits / 2.5 and / 2), the last
    the collapsed model itself, with a trainer state beside its weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsopsd.closed_form import scale_logits_

    ckpt, prompts = collapsed
    run = tmp_path / "run"
    tok = AutoTokenizer.from_pretrained(ckpt)
    for step, tau in ((1, 2.5), (2, 2.0)):
        model = AutoModelForCausalLM.from_pretrained(ckpt)
        scale_logits_(model, tau, copy.deepcopy(model))
        model.save_pretrained(run / f"checkpoint-{step}")
        tok.save_pretrained(run / f"checkpoint-{step}")
    shutil.copytree(ckpt, run / "checkpoint-3")
    (run / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    return run, prompts


def test_watch_once_reheats_the_collapsed_checkpoint_then_has_nothing_to_do(run_dir):
    run, prompts = run_dir
    args = ["watch", str(run), "--prompts", str(prompts), "--once", "--settle", "0", "--samples-per-prompt", "4",
            "--max-new-tokens", "8", "--quiet"]
    first = runner.invoke(app, args)
    out = run / "checkpoint-3-reheated"
    assert first.exit_code == ExitCode.REHEATED, first.output
    assert f"resume_from_checkpoint='{out}'" in first.stdout and f"-> {out}" in first.stdout
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3",
                                                     "checkpoint-3-reheated"]  # nothing else left behind
    assert json.loads((out / "trainer_state.json").read_text()) == {"global_step": 3}  # TRL resumes at its step
    report = json.loads((out / "reheat_report.json").read_text())
    assert report["method"] == "scale" and report["status"] == "met"
    from transformers import AutoModelForCausalLM

    hot = AutoModelForCausalLM.from_pretrained(out)  # loads as any checkpoint, hotter than the one it came from
    cold = AutoModelForCausalLM.from_pretrained(run / "checkpoint-3")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(hot(ids).logits * report["teacher_temperature"], cold(ids).logits, atol=1e-4)
    again = runner.invoke(app, [*args, "--json"])
    assert again.exit_code == ExitCode.DONE, again.output
    result = json.loads(again.stdout)
    assert result["status"] == "already" and result["reheated"] == str(out)
    assert sorted(p.name for p in run.iterdir())[-1] == "checkpoint-3-reheated" and len(list(run.iterdir())) == 4


def test_watch_once_without_a_collapse_exits_0_and_writes_nothing(run_dir):
    run, prompts = run_dir
    shutil.rmtree(run / "checkpoint-3")
    res = runner.invoke(app, ["watch", str(run), "--prompts", str(prompts), "--once", "--settle", "0", "--json",
                              "--samples-per-prompt", "2", "--max-new-tokens", "8", "--quiet"])
    assert res.exit_code == ExitCode.DONE, res.output
    assert json.loads(res.stdout)["status"] == "nothing" and len(list(run.iterdir())) == 2


def test_a_checkpoint_still_being_written_waits(run_dir):
    """--settle: a checkpoint whose files changed within it is not measured yet (here: all of them)."""
    run, prompts = run_dir
    res = runner.invoke(app, ["watch", str(run), "--prompts", str(prompts), "--once", "--settle", "3600", "--json",
                              "--quiet"])
    assert res.exit_code == ExitCode.DONE, res.output
    result = json.loads(res.stdout)
    assert result["status"] == "nothing" and len(result["waiting"]) == 3 and not result["checkpoints"]


def test_watch_bad_input_is_one_line(tmp_path, collapsed):
    _, prompts = collapsed
    res = runner.invoke(app, ["watch", str(tmp_path / "nope"), "--prompts", str(prompts), "--once"])
    assert res.exit_code == ExitCode.BAD_INPUT
    assert res.stderr.strip().splitlines() == [f"tsopsd: error: watch: {tmp_path / 'nope'} is not a folder (give the "
                                               "run folder that holds checkpoint-N or global_step_N folders)"]
