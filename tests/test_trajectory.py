"""A run's entropy trajectory: checkpoints found in step order, each measured as `measure-entropy` measures one."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from tsopsd.cli import app
from tsopsd.errors import TsopsdError
from tsopsd.trajectory import collapse_point, find_checkpoints

runner = CliRunner()


def _model(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def test_find_checkpoints_orders_by_step_and_knows_trl_and_verl_layouts(tmp_path):
    run = tmp_path / "run"
    trl = [_model(run / f"checkpoint-{n}") for n in (100, 20, 3)]
    verl = _model(run / "global_step_50" / "actor" / "huggingface")
    (run / "logs").mkdir()  # not a checkpoint: ignored
    _model(run / ".checkpoint-9.tmp")  # a checkpoint being written (hidden until renamed): never read
    (run / "global_step_60" / "actor").mkdir(parents=True)  # an empty actor folder: not a checkpoint
    sharded = run / "global_step_70" / "actor"  # verl rank shards, huggingface/ without weights: the actor is one
    _model(sharded / "huggingface")
    (sharded / "fsdp_config.json").write_text('{"FSDP_version": 2, "world_size": 2}')
    found = find_checkpoints([run])
    assert found == [(3, trl[2]), (20, trl[1]), (50, verl.parent), (70, sharded), (100, trl[0])]  # the actor loads
    assert find_checkpoints([trl[0]]) == []  # one model folder: the single-checkpoint measurement
    assert find_checkpoints([sharded.parent]) == []  # one verl step folder too
    # paths given keep their order (the user's); only checkpoint-N and global_step_N name a step
    assert find_checkpoints([trl[0], trl[2]]) == [(100, trl[0]), (3, trl[2])]
    plain = _model(tmp_path / "final")
    assert find_checkpoints([plain, trl[1]]) == [(None, plain), (20, trl[1])]
    sft, reheated2 = _model(tmp_path / "gpt2-sft"), _model(tmp_path / "reheated2")  # the name's 2 is no step
    given = [sft, trl[1], trl[0], reheated2]
    assert find_checkpoints(given) == [(None, sft), (20, trl[1]), (100, trl[0]), (None, reheated2)]
    inside = tmp_path / "mixed"
    names = [_model(inside / n) for n in ("step_9", "checkpoint-5", "global_step_2")]
    assert find_checkpoints([inside]) == [(2, names[2]), (5, names[1]), (None, names[0])]
    assert find_checkpoints([tmp_path / "run" / "logs"]) == []  # one path, nothing in it: the loader says why
    with pytest.raises(TsopsdError, match="no checkpoint in"):
        find_checkpoints([plain, run / "logs"])
    with pytest.raises(TsopsdError, match="not found"):
        find_checkpoints([plain, tmp_path / "nowhere"])


def test_collapse_point_by_hand():
    assert collapse_point([0.8, 0.6, 0.41, 0.39, 0.2], 0.5) == 3
    assert collapse_point([0.8, 0.7, 0.5], 0.5) is None
    assert collapse_point([1.0, 0.5], 0.5) is None  # at the line is not below it
    assert collapse_point([], 0.5) is None


@pytest.fixture(scope="module")
def rl_run(quick_demo, tmp_path_factory):
    """A tiny RL run folder: the quick demo's SFT model as checkpoint-0, then GRPO saving every 15 steps."""
    from tsopsd.checkpoint import load_checkpoint
    from tsopsd.lab.demo import verifier
    from tsopsd.lab.grpo import grpo
    from tsopsd.prompts import load_prompts

    demo, _ = quick_demo
    run = tmp_path_factory.mktemp("rl") / "run"
    shutil.copytree(demo / "sft", run / "checkpoint-0")
    ck = load_checkpoint(demo / "sft", device="cpu")
    prompts = load_prompts(demo / "prompts.jsonl", ck.tokenizer)

    def save(step, record):
        if (step + 1) % 15 == 0:
            ck.model.save_pretrained(run / f"checkpoint-{step + 1}")
            ck.tokenizer.save_pretrained(run / f"checkpoint-{step + 1}")

    grpo(ck.model, ck.tokenizer, prompts, verifier(prompts), steps=60, group_size=16, lr=1e-3, seed=0, on_step=save)
    (run / "runs").mkdir()  # a TensorBoard folder, say: not a checkpoint
    return run, demo / "prompts.jsonl"


ARGS = ["--max-new-tokens", "8", "--samples-per-prompt", "4", "--limit", "24", "--quiet"]


@pytest.mark.xdist_group("quick_demo")
def test_run_folder_gives_the_trajectory_each_row_as_measured_alone(rl_run, tmp_path):
    from tsopsd.metrics import measure_checkpoint

    run, prompts = rl_run
    png = tmp_path / "entropy.png"
    res = runner.invoke(app, ["measure-entropy", str(run), "--prompts", str(prompts), *ARGS, "--json",
                              "--plot", str(png)])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    rows = result["checkpoints"]
    assert [r["step"] for r in rows] == [0, 15, 30, 45, 60]
    assert result["reference"] == str(run / "checkpoint-0")
    assert rows[0]["metrics"]["reference"]["top1_agreement"] == 1.0
    assert rows[0]["metrics"]["reference"]["kl_model_ref"] == pytest.approx(0, abs=1e-6)
    for r in (rows[0], rows[2], rows[4]):  # the same numbers as measuring that checkpoint alone against the first
        alone = measure_checkpoint(r["checkpoint"], prompts, samples_per_prompt=4, max_new_tokens=8, limit=24,
                                   reference=run / "checkpoint-0", precision=0.05, show_progress=False)["metrics"]
        assert r["metrics"]["entropy"] == alone["entropy"]
        assert r["metrics"]["intervals"] == json.loads(json.dumps(alone["intervals"]))  # JSON: lists for tuples
        assert r["metrics"]["reference"]["kl_model_ref"] == alone["reference"]["kl_model_ref"]
    entropies = [r["metrics"]["entropy"]["mean"] for r in rows]
    print("entropy over steps", [round(h, 3) for h in entropies])
    assert entropies[-1] < entropies[0]  # GRPO collapses the SFT model
    at = collapse_point(entropies, 0.5)
    assert result["collapse"]["index"] == at
    assert result["reheat"]["checkpoint"] == (rows[at]["checkpoint"] if at is not None else None)
    assert png.is_file() and png.stat().st_size > 0 and result["plot"] == str(png)
    # a stricter ratio moves the mark; the table names every checkpoint and the advice
    res = runner.invoke(app, ["measure-entropy", str(run), "--prompts", str(prompts), *ARGS,
                              "--collapse-ratio", "0.95"])
    assert res.exit_code == 0, res.output
    assert all(f"checkpoint-{n}" in res.stdout for n in (0, 15, 30, 45, 60)) and "reheat:" in res.stdout
    assert ("collapsed" in res.stdout) == (collapse_point(entropies, 0.95) is not None)
    # the advice is a command, printed beneath the table, that runs as it stands
    import shlex

    chosen = rows[collapse_point(entropies, 0.95)]["checkpoint"]
    line = res.stdout.split("next: reheat the collapsed checkpoint")[1].splitlines()[1].strip()
    argv = shlex.split(line)
    assert argv[:3] == ["tsopsd", "reheat", chosen] and argv[argv.index("--target-entropy-from") + 1] == rows[0]["checkpoint"]
    dry = runner.invoke(app, argv[1:] + ["--dry-run", "--json", "--set", "rollout.max_new_tokens=8"])
    assert dry.exit_code == 0, dry.output


def test_plot_needs_several_checkpoints_and_ratio_must_be_a_fraction(ckpt, prompts_file, tmp_path):
    res = runner.invoke(app, ["measure-entropy", str(ckpt), "--prompts", str(prompts_file), "--plot",
                              str(tmp_path / "p.png"), "--quiet"])
    assert res.exit_code == 2 and res.stderr.startswith("tsopsd: error: --plot draws entropy over several")
    res = runner.invoke(app, ["measure-entropy", str(ckpt), str(ckpt), "--prompts", str(prompts_file),
                              "--collapse-ratio", "1.5", "--quiet"])
    assert res.exit_code == 2 and "--collapse-ratio must be in (0, 1)" in res.stderr
