"""--report-to: the step metrics of metrics.jsonl, every one of every step, also in TensorBoard's event files."""

import json
import sys
from pathlib import Path

from typer.testing import CliRunner

from tsopsd.cli import app
from tsopsd.errors import ExitCode

runner = CliRunner()
TINY = Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml"


def _args(ckpt, prompts, out):
    return ["reheat", str(ckpt), "--prompts", str(prompts), "--out", str(out), "--config", str(TINY), "--steps", "3",
            "--set", "output.eval_prompts=0", "--quiet"]


def events(log_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the event files under `log_dir`, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_every_metric_of_every_step(collapsed, tmp_path):
    ckpt, prompts = collapsed
    out = tmp_path / "o"
    res = runner.invoke(app, [*_args(ckpt, prompts, out)[:-1], "--report-to", "tensorboard"])  # not --quiet
    assert res.exit_code == ExitCode.GOAL_NOT_MET, res.output  # 3 steps: written, not converged
    assert f"step metrics to tensorboard in {(tmp_path / 'o.logs' / 'tensorboard').resolve()}" in res.stderr
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]  # the N-th step is step N, as the console says
    got = events(tmp_path / "o.logs" / "tensorboard")
    expected = {k for m in lines for k, v in m.items() if k != "step" and isinstance(v, (int, float))}
    assert set(got) == expected and "train/loss" in got and "train/tau" in got
    for m in lines:
        for key in expected:
            assert abs(got[key][m["step"]] - m[key]) <= 1e-6 * max(1.0, abs(m[key])), (key, m["step"])  # float32


def test_report_to_bad_name_or_missing_package_is_one_line_before_any_work(collapsed, tmp_path, monkeypatch):
    ckpt, prompts = collapsed
    res = runner.invoke(app, [*_args(ckpt, prompts, tmp_path / "a"), "--report-to", "mlflow"])
    assert res.exit_code == 2 and "output.report_to: unknown mlflow" in res.stderr
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    res = runner.invoke(app, [*_args(ckpt, prompts, tmp_path / "b"), "--report-to", "tensorboard"])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().splitlines() == ["tsopsd: error: --report-to tensorboard needs the tensorboard package: "
                                               "pip install 'tsopsd[tensorboard]'"]
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.logs").exists()


def test_wandb_follows_the_users_setup_with_project_and_run_name(tmp_path, monkeypatch):
    """No hard-coded offline mode (WANDB_MODE and the login decide, as in TRL and verl); project and name passed."""
    import types

    from tsopsd.trackers import open_trackers

    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or types.SimpleNamespace(
        log=lambda *a, **k: None, finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    open_trackers("wandb", tmp_path / "logs", resume_step=0, config={"seed": 0}, name="my-run",
                  project="rl-reheat").close()
    open_trackers("wandb", tmp_path / "logs", resume_step=3, config={}, name="x").close()
    assert "mode" not in calls[0] and calls[0]["project"] == "rl-reheat" and calls[0]["name"] == "my-run"
    assert "project" not in calls[1] and calls[1]["id"] == calls[0]["id"] and calls[1]["resume"] == "allow"
