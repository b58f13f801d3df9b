"""Data-parallel reheating under torchrun on CPU (gloo): same result as one process with the same global batch."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import signals
import torch
from safetensors.torch import load_file

from tsopsd.errors import ExitCode

TINY = Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml"
# 2 ranks x 2 prompts x 2 samples = one process with 4 prompts; sampling batches of 4 rows either way
COMMON = ["--config", str(TINY), "--steps", "4", "--samples-per-prompt", "2", "--set", "rollout.batch_size=4",
          "--set", "train.micro_batch=4", "--set", "output.eval_prompts=0", "--set", "stop.entropy_tolerance=0",
          "--seed", "3", "--quiet"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def torchrun(*args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "tsopsd",
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)


def single(*args):
    return subprocess.run([sys.executable, "-m", "tsopsd", *map(str, args)], capture_output=True, text=True,
                          env=_env(), timeout=300)


def used_every_step(p, *, launcher: bool = True) -> bool:
    """These runs never converge (stop.entropy_tolerance 0): OUT written, the goal not met, one line saying so; exit
    4, which torchrun (and accelerate) report as their own 1, as they do any rank's non-zero exit."""
    ours = [line for line in p.stderr.splitlines() if line.startswith("tsopsd: error:")]
    return len(ours) == 1 and "goal not met" in ours[0] and p.returncode == (1 if launcher else ExitCode.GOAL_NOT_MET)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def two_ranks_and_one_process(collapsed, tmp_path, name, args, *, launch=(), weights="model.safetensors"):
    """Run 2 ranks x 2 prompts and 1 process x 4 prompts; assert the same completions, losses and weights.

    Returns the per-step metrics of both runs (ranks first).
    """
    ckpt, prompts = collapsed
    d = torchrun("reheat", ckpt, "--prompts", prompts, "--out", tmp_path / name, "--prompts-per-step", "2",
                 *launch, *args)
    assert used_every_step(d), d.stderr[-12000:]
    s = single("reheat", ckpt, "--prompts", prompts, "--out", tmp_path / "one", "--prompts-per-step", "4", *args)
    assert used_every_step(s, launcher=False), s.stderr[-12000:]
    md, ms = metrics(tmp_path / name), metrics(tmp_path / "one")
    assert len(md) == len(ms) == 4
    for a, b in zip(md, ms):
        assert a["train/tokens"] == b["train/tokens"]  # the same completions were sampled
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4, abs=1e-6)
        assert a["train/tau"] == pytest.approx(b["train/tau"], rel=1e-5)  # a target is solved on all ranks' tokens
    for folder in [""] + sorted(p.name for p in (tmp_path / "one").glob("checkpoint-*")):  # OUT, then its checkpoints
        wd, ws = load_file(tmp_path / name / folder / weights), load_file(tmp_path / "one" / folder / weights)
        assert set(wd) == set(ws) and len(ws) > 0, folder
        assert all(torch.allclose(wd[k], ws[k], atol=1e-5) for k in ws), folder
    return md, ms


def test_two_ranks_match_one_process(collapsed, tmp_path):
    md, ms = two_ranks_and_one_process(collapsed, tmp_path, "ddp", [*COMMON, "--target-entropy", "0.35",
                                                                    "--checkpoint-every", "2"])
    assert (tmp_path / "ddp" / "checkpoint-2" / "model.safetensors").is_file()  # rank 0 wrote it, compared above
    assert len({m["train/tau"] for m in md}) == len(md)  # tau re-solved on every step
    for a, b in zip(md, ms):
        assert a["train/student_entropy"] == pytest.approx(b["train/student_entropy"], rel=1e-4)
    # one output, written by rank 0, loadable like any other
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "one"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "ddp"))


@pytest.mark.slow  # 9 s; the same refusal with one process is in test_bad_input_and_signals' bad-input matrix
def test_too_few_prompts_for_the_ranks(collapsed, tmp_path):
    ckpt, prompts = collapsed
    d = torchrun("reheat", ckpt, "--prompts", prompts, "--out", tmp_path / "o", "--prompts-per-step", "9", *COMMON)
    assert d.returncode != 0
    assert "17 prompts are fewer than 2 rank(s) x 9 prompts per step" in d.stderr
    assert "Traceback" not in d.stderr.split("tsopsd: error:")[0][-200:]


@pytest.mark.slow  # 14 s; the refusal itself is `_resume`'s first check, one line of code
def test_resume_with_another_world_size_is_refused(collapsed, tmp_path):
    ckpt, prompts = collapsed
    args = ["reheat", ckpt, "--prompts", prompts, "--out", tmp_path / "o", "--prompts-per-step", "2",
            "--config", str(TINY), "--set", "output.eval_prompts=0"]
    r = signals.run_and_signal(args, when=lambda line: "step 1/" in line)
    assert r.signalled and r.returncode == 130 and (tmp_path / "o.tsopsd-run" / "state.json").is_file(), r.stderr
    d = torchrun(*args, "--resume", "--quiet")
    assert d.returncode != 0
    assert "saved with 1 rank(s), this launch has 2" in d.stderr


@pytest.mark.parametrize("mode", ["full", pytest.param("lora", marks=pytest.mark.slow)])  # lora: 15 s, make test-slow
def test_fsdp_two_ranks_match_one_process(collapsed, tmp_path, mode):
    """FSDP2 (layers and trunk sharded, LM head replicated) on CPU/gloo gives the single-process result."""
    args = [*COMMON, "--mode", mode, "--lr", "3e-4" if mode == "full" else "2e-3",
            "--save", "merged" if mode == "full" else "adapter", "--target-entropy", "0.35", "--checkpoint-every", "2"]
    two_ranks_and_one_process(collapsed, tmp_path, "fsdp", args, launch=("--parallel", "fsdp"),
                              weights="model.safetensors" if mode == "full" else "adapter_model.safetensors")
    # the checkpoint along the way was gathered from the shards (compared with one process's above)
    assert (tmp_path / "fsdp" / "checkpoint-2").is_dir()
    if mode == "lora":  # the adapter of a sharded run loads with plain peft, base pointing at the input
        from peft import AutoPeftModelForCausalLM

        AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "fsdp"))
        AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "fsdp" / "checkpoint-2"))


@pytest.mark.slow  # 40 s: FSDP against one process stays in make test (test_fsdp_two_ranks_match_one_process)
def test_fsdp_resume_with_same_ranks(collapsed, tmp_path):
    """Killed (SIGKILL, every process) after its periodic save, a sharded run resumes to the uninterrupted result."""
    ckpt, prompts = collapsed
    args = ["reheat", ckpt, "--prompts", prompts, "--prompts-per-step", "2", *COMMON, "--mode", "full", "--lr",
            "3e-4", "--set", "train.parallel=fsdp", "--set", "output.save_every=2"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tsopsd"]
    state = tmp_path / "f.tsopsd-run" / "state.json"
    r = signals.run_and_signal([*args, "--out", tmp_path / "f"], when_file=state.is_file, sig=signal.SIGKILL,
                               launcher=launcher, tree=True)
    assert r.signalled and r.returncode != 0 and not (tmp_path / "f").exists(), r.stderr[-3000:]
    (shards,) = (tmp_path / "f.tsopsd-run").glob("sharded-*")
    def swap_ranks():  # each rank's part whole and sealed, but the other rank's
        (shards / "rank-0.json").rename(shards / "swap")
        (shards / "rank-1.json").rename(shards / "rank-0.json")
        (shards / "swap").rename(shards / "rank-1.json")

    swap_ranks()
    refused = torchrun(*args, "--out", tmp_path / "f", "--resume")
    assert refused.returncode != 0 and "rank-0.json was altered after tsopsd wrote it" in refused.stderr, refused.stderr
    swap_ranks()
    d = torchrun(*args, "--out", tmp_path / "f", "--resume")
    assert used_every_step(d), d.stderr[-12000:]
    u = torchrun(*args, "--out", tmp_path / "u")
    assert used_every_step(u), u.stderr[-12000:]
    assert [m["train/loss"] for m in metrics(tmp_path / "f")] == pytest.approx(
        [m["train/loss"] for m in metrics(tmp_path / "u")], rel=1e-6)
    wf, wu = load_file(tmp_path / "f" / "model.safetensors"), load_file(tmp_path / "u" / "model.safetensors")
    assert all(torch.allclose(wf[k], wu[k], atol=1e-6) for k in wu)


def test_checkpoint_failure_is_one_line_naming_the_ranks(tmp_path, prompts_file):
    d = torchrun("reheat", tmp_path / "missing", "--prompts", prompts_file, "--out", tmp_path / "o", "--quiet",
                 "--prompts-per-step", "1")
    assert d.returncode != 0
    ours = [line for line in d.stderr.splitlines() if "tsopsd: error:" in line]
    assert len(ours) == 1
    assert "checkpoint failed to load on rank 0: checkpoint not found" in ours[0] and "rank 1:" in ours[0]


@pytest.mark.slow  # 20 s; torchrun covers the same code path in `make test`
def test_accelerate_launch_runs_the_same_job(collapsed, tmp_path):
    """`accelerate launch --multi_gpu` sets the same RANK/WORLD_SIZE variables as torchrun (gloo on a CPU)."""
    ckpt, prompts = collapsed
    launcher = Path(sys.executable).parent / "accelerate"
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", "tsopsd", "reheat", str(ckpt), "--prompts", str(prompts), "--out",
           str(tmp_path / "acc"), "--prompts-per-step", "2", *COMMON]
    d = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert used_every_step(d), d.stderr[-12000:]
    t = torchrun("reheat", ckpt, "--prompts", prompts, "--out", tmp_path / "tr", "--prompts-per-step", "2", *COMMON)
    assert used_every_step(t), t.stderr[-12000:]
    assert [m["train/loss"] for m in metrics(tmp_path / "acc")] == [m["train/loss"] for m in metrics(tmp_path / "tr")]
