"""Nothing lost, ever: bad input gets one line and changes nothing; a signal at any moment loses nothing.

Two parts:

- **The bad-input matrix**: every way bad input or a fault can get through, each run
  through the real CLI, asserting the exit code, the single `tsopsd: error:` line, no traceback, and
  that nothing was written or lost (the input's files hash the same; no output, run folder, lock or
  temporary is left).
- **Fault injection**: a real `tsopsd reheat` process is signalled (SIGKILL, SIGINT, SIGTERM) at each
  of a fixed list of moments, found from what it prints or writes (no hooks in the product). Then OUT
  must be absent or complete, no temporaries may be left once the recovery ran, the input is
  unchanged, and `--resume` (or a rerun) finishes with weights equal, bit for bit, to an uninterrupted
  run. The report (moment, signal, where it landed, outcome) is printed at the end of `make test`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import signals
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tsopsd.cli import app
from tsopsd.errors import ExitCode

TINY = Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml"
runner = CliRunner()
def report(lines: list[str]) -> None:
    """Add lines to the report conftest prints at the end of the run (from any xdist worker)."""
    with open(os.environ["TSOPSD_TEST_REPORT"], "a") as f:
        f.write("".join(line + "\n" for line in lines))


def tree_hash(*folders) -> str:
    h = hashlib.sha256()
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            h.update(str(p.relative_to(folder)).encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def leftovers(out: Path) -> list[str]:
    """What a run on OUT may leave beside it besides OUT: run folder, lock, temporaries."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith((out.name + ".", "." + out.name + ".")))


def one_line(res, code=2) -> str:
    """The CLI exited `code` with exactly one `tsopsd: error:` line and no traceback or framed box."""
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert res.exit_code == code, res.stderr
    assert len(lines) == 1 and lines[0].startswith("tsopsd: error: "), res.stderr
    assert "Traceback" not in res.stderr and "│" not in res.stderr and res.stdout == ""
    return lines[0]


def reheat_args(world, out, *extra, quiet=True):
    return ["reheat", str(world / "ckpt"), "--prompts", str(world / "prompts.jsonl"), "--out", str(out),
            "--config", str(TINY), "--steps", "2", "--set", "output.eval_prompts=0", *map(str, extra)] + \
        (["--quiet"] if quiet else [])


def unmount(path: Path) -> None:
    import gc

    gc.collect()  # a failed write's traceback may still hold a file open there
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], check=True)


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ---- the bad-input matrix ------------------------------------------------------------------------

def _nan_copy(world, tmp):
    bad = tmp / "nan"
    shutil.copytree(world / "ckpt", bad)
    weights = load_file(bad / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    return bad


def _prompts(tmp, text):
    path = tmp / "p.jsonl"
    path.write_text(text)
    return path


BAD = {
    # case 2: the input destroyed
    "out is the checkpoint": (lambda w, t: reheat_args(w, w / "ckpt", "--overwrite"), "is the checkpoint"),
    "out inside the checkpoint": (lambda w, t: reheat_args(w, w / "ckpt" / "sub"), "lies inside the checkpoint"),
    "out contains the checkpoint": (lambda w, t: reheat_args(w, w, "--overwrite"), "contains the checkpoint"),
    "merge out is the adapter": (lambda w, t: ["merge", str(w / "ckpt"), "--out", str(w / "ckpt"), "--overwrite"],
                                 "is the adapter"),
    # case 3: NaN/inf weights found at load, naming the tensor
    "nan weights, reheat": (lambda w, t: reheat_args(w, t / "o")[:1] + [str(_nan_copy(w, t))] + reheat_args(w, t / "o")[2:],
                            "model.layers.1.mlp.up_proj.weight has 1 NaN/inf"),
    "nan weights, measure": (lambda w, t: ["measure-entropy", str(_nan_copy(w, t)), "--prompts", str(w / "prompts.jsonl"),
                                           "--max-new-tokens", "8"],
                             "model.layers.1.mlp.up_proj.weight has 1 NaN/inf"),
    # case 4: out-of-range flags, our own line instead of a framed box
    "--steps 0": (lambda w, t: reheat_args(w, t / "o", "--steps", "0"), "train.steps: must be >= 1"),
    "--max-new-tokens 0": (lambda w, t: reheat_args(w, t / "o", "--max-new-tokens", "0"), "rollout.max_new_tokens"),
    "--samples-per-prompt 0": (lambda w, t: reheat_args(w, t / "o", "--samples-per-prompt", "0"),
                               "rollout.samples_per_prompt"),
    "--prompts-per-step 0": (lambda w, t: reheat_args(w, t / "o", "--prompts-per-step", "0"), "rollout.prompts_per_step"),
    "more prompts per step than the file has": (lambda w, t: reheat_args(w, t / "o", "--prompts-per-step", "500"),
                                                "prompts per step: lower rollout.prompts_per_step"),
    "--temperature -1": (lambda w, t: reheat_args(w, t / "o", "--temperature", "-1"), "teacher.temperature"),
    "--temperature nan": (lambda w, t: reheat_args(w, t / "o", "--temperature", "nan"), "teacher.temperature"),
    "--lr inf": (lambda w, t: reheat_args(w, t / "o", "--lr", "inf"), "train.lr"),
    "--set data.limit=0": (lambda w, t: reheat_args(w, t / "o", "--set", "data.limit=0"), "data.limit"),
    "measure --limit 0": (lambda w, t: ["measure-entropy", str(w / "ckpt"), "--prompts", str(w / "prompts.jsonl"),
                                        "--limit", "0"], "--limit must be >= 1"),
    "measure --samples-per-prompt 0": (lambda w, t: ["measure-entropy", str(w / "ckpt"), "--prompts",
                                                     str(w / "prompts.jsonl"), "--samples-per-prompt", "0"],
                                       "--samples-per-prompt must be in 1..4096"),
    "measure --temperature nan": (lambda w, t: ["measure-entropy", str(w / "ckpt"), "--prompts", str(w / "prompts.jsonl"),
                                                "--temperature", "nan"], "--temperature must be a number >= 0"),
    "measure --top-p 0": (lambda w, t: ["measure-entropy", str(w / "ckpt"), "--prompts", str(w / "prompts.jsonl"),
                                        "--top-p", "0"], "--top-p must be in (0, 1]"),
    "measure --precision 1": (lambda w, t: ["measure-entropy", str(w / "ckpt"), "--prompts", str(w / "prompts.jsonl"),
                                            "--precision", "1"], "--precision must be in [0, 1)"),
    "measure --max-samples-per-prompt 1": (lambda w, t: ["measure-entropy", str(w / "ckpt"), "--prompts",
                                                         str(w / "prompts.jsonl"), "--max-samples-per-prompt", "1"],
                                           "--max-samples-per-prompt must be in --samples-per-prompt..4096"),
    "--precision 2": (lambda w, t: reheat_args(w, t / "o", "--target-entropy", "0.5", "--precision", "2"),
                      "teacher.precision: must be in [0, 1)"),
    "--eval-prompts a folder": (lambda w, t: reheat_args(w, t / "o", "--eval-prompts", str(t)), "is a folder"),
    "--checkpoint-every -1": (lambda w, t: reheat_args(w, t / "o", "--checkpoint-every", "-1"),
                              "output.checkpoint_every: must be >= 0"),
    # case 5: unwritable output, found before any work
    "out under a file": (lambda w, t: reheat_args(w, _file(t) / "sub"), "is a file, not a folder"),
    "out is a file": (lambda w, t: reheat_args(w, _file(t)), "exists and is not a folder"),
    "measure --out a folder": (lambda w, t: ["measure-entropy", str(w / "ckpt"), "--prompts", str(w / "prompts.jsonl"),
                                             "--out", str(t)], "is a folder: name a file"),
    # case 6: another live run holds OUT
    "another run on OUT": (lambda w, t: _locked(w, t, os.getpid()), f"another run is writing {{out}} (pid {os.getpid()})"),
    # nothing lost: tsopsd deletes only what it can prove it wrote (its run folder's marker) and no longer needs
    "resume onto an OUT it did not write": (lambda w, t: _run_folder(w, t, "--resume", out=True),
                                           "cannot resume into {out}: it exists and this run did not write it"),
    "a checkpoint along the way, no saved state": (lambda w, t: _run_folder(w, t, state=None, checkpoint=True),
                                                   "holds checkpoint-3 from a run stopped before its first saved state"),
    "...and --resume": (lambda w, t: _run_folder(w, t, "--resume", state=None, checkpoint=True),
                        "holds checkpoint-3 from a run stopped before its first saved state"),
    "OUT.tsopsd-run not made by tsopsd": (lambda w, t: _run_folder(w, t, state=None, marker=False),
                                          "in the way of OUT's run folder and was not made by tsopsd"),
    "...with a state file": (lambda w, t: _run_folder(w, t, "--resume", marker=False),
                             "in the way of OUT's run folder and was not made by tsopsd"),
    "state.json a link to /dev/zero": (lambda w, t: _run_folder(w, t, "--resume", state="dev-zero"),
                                       "is damaged (state.json is not a file): left as it is"),
    "state.json a folder": (lambda w, t: _run_folder(w, t, "--resume", state="folder"), "is damaged"),
    "state.json a dangling link": (lambda w, t: _run_folder(w, t, state="dangling"), "is damaged"),
    "merge onto an OUT a reheat writes": (lambda w, t: ["merge", str(_locked(w, t, os.getpid())[1]), "--out",
                                                        str(t / "o")], f"another run is writing {{out}} (pid {os.getpid()})"),
    # numbers a user can type: each refused in one line, before anything loads (not a crash, a hang, an OOM)
    "--seed 10^23": (lambda w, t: reheat_args(w, t / "o", "--seed", 10**23), "seed: must be in 0..2^63-1"),
    "measure --seed 10^23": (lambda w, t: ["measure-entropy", str(w / "ckpt"), "--prompts", str(w / "prompts.jsonl"),
                                          "--seed", str(10**23)], "--seed must be in 0..2^63-1"),
    "weight_decay nan": (lambda w, t: reheat_args(w, t / "o", "--set", "train.weight_decay=nan"),
                         "train.weight_decay: must be a finite number"),
    "max_grad_norm nan": (lambda w, t: reheat_args(w, t / "o", "--set", "train.max_grad_norm=.nan"),
                          "train.max_grad_norm: must be a finite number"),
    "entropy_tolerance nan": (lambda w, t: reheat_args(w, t / "o", "--set", "stop.entropy_tolerance=nan"),
                              "stop.entropy_tolerance: must be a finite number"),
    "--target-entropy inf": (lambda w, t: reheat_args(w, t / "o", "--target-entropy", "inf"),
                             "teacher.target_entropy: must be a finite number"),
    "lora_alpha 0 (trains nothing)": (lambda w, t: reheat_args(w, t / "o", "--set", "train.lora_alpha=0"),
                                      "train.lora_alpha: must be > 0"),
    "lora_r 100000": (lambda w, t: reheat_args(w, t / "o", "--set", "train.lora_r=100000"), "train.lora_r: must be <="),
    "lora_target_modules nope": (lambda w, t: reheat_args(w, t / "o", "--set", "train.lora_target_modules=nope"),
                                 "train.lora_target_modules 'nope'"),
    "eval_samples_per_prompt 10^9": (lambda w, t: reheat_args(w, t / "o", "--set",
                                                              f"output.eval_samples_per_prompt={10**9}"), "must be <= 4096"),
    "heldout_samples_per_prompt 10^9": (lambda w, t: reheat_args(w, t / "o", "--set",
                                                                 f"stop.heldout_samples_per_prompt={10**9}"), "must be <= 4096"),
    "--max-new-tokens 10^9 to --dry-run": (lambda w, t: reheat_args(w, t / "o", "--max-new-tokens", 10**9, "--dry-run"),
                                           "rollout.max_new_tokens: must be <= 1048576"),
    "plan --gpu-memory 1e400GB": (lambda w, t: ["plan", str(w / "ckpt"), "--gpu-memory", "1e400GB"], "under 1 EiB"),
    "plan --gpus 10^20": (lambda w, t: ["plan", str(w / "ckpt"), "--gpus", str(10**20)], "--gpus must be in 1..65536"),
    "plan --prompt-tokens 10^12": (lambda w, t: ["plan", str(w / "ckpt"), "--prompt-tokens", str(10**12)],
                                   "--prompt-tokens must be <="),
    "a YAML alias bomb": (lambda w, t: reheat_args(w, t / "o", "--config", _prompts(t, "a: &a [x, x, x, x, x, x, x, x]\n"
                                                                                       "b: &b [*a, *a, *a, *a, *a, *a]\n"
                                                                                       "c: [*b, *b, *b, *b, *b, *b]\n")),
                          "YAML aliases (*name) are not allowed"),
    # a dry run refuses what the run refuses
    "dry run onto the checkpoint": (lambda w, t: reheat_args(w, w / "ckpt", "--overwrite", "--dry-run"), "is the checkpoint"),
    "dry run, --target-entropy-from missing": (lambda w, t: reheat_args(w, t / "o", "--dry-run", "--target-entropy-from",
                                                                        t / "missing"), "checkpoint not found"),
    "dry run, --eval-prompts missing": (lambda w, t: reheat_args(w, t / "o", "--dry-run", "--eval-prompts",
                                                                 t / "missing.jsonl"), "prompt file not found"),
    "dry run, --resume with nothing to resume": (lambda w, t: reheat_args(w, t / "o", "--dry-run", "--resume"),
                                                 "nothing to resume"),
    # a pickle is never loaded; a damaged record is found before a merge, not after it
    "a legacy pytorch_model.bin": (lambda w, t: ["reheat", str(_legacy(w, t)), *reheat_args(w, t / "o")[2:]],
                                   "holds pytorch_model.bin, a pickle"),
    "merge, the adapter's report damaged": (lambda w, t: ["merge", str(_adapter_with_report(t, "[1, 2]")), "--out",
                                                          str(t / "o")], "reheat_report.json is damaged"),
    "merge onto an existing OUT": (lambda w, t: ["merge", str(_adapter_with_report(t, None)), "--out", str(_folder(t))],
                                   "output folder exists: {out} (pass --overwrite to replace it)"),
    "merge, the adapter's report not JSON": (lambda w, t: ["merge", str(_adapter_with_report(t, "{nope")), "--out",
                                                           str(t / "o")], "reheat_report.json is damaged"),
    # malformed messages
    "unknown chat role": (lambda w, t: ["measure-entropy", str(w / "ckpt"), "--prompts", str(_prompts(
        t, '{"messages": [{"role": "wizard", "content": "sum 7 ="}]}\n')), "--max-new-tokens", "8"],
        "p.jsonl:1: unknown chat role 'wizard'"),
    "messages as a string": (lambda w, t: ["measure-entropy", str(w / "ckpt"), "--prompts", str(_prompts(
        t, '{"prompt": "sum 5 ="}\n{"messages": "sum 7 ="}\n')), "--max-new-tokens", "8"],
        "p.jsonl:2: 'messages' must be a list"),
}


def _file(tmp):
    f = tmp / "a-file"
    f.write_text("not a folder")
    return f


def _run_folder(world, tmp, *extra, state="file", checkpoint=False, marker=True, out=False):
    """`reheat_args` onto tmp/o, with a run folder tmp/o.tsopsd-run made as a run leaves it: its marker (or none: a
    folder tsopsd did not make), `state` ("file", None, "dev-zero", "folder", "dangling"), a loadable checkpoint-3,
    and OUT made by hand beside it."""
    run = tmp / "o.tsopsd-run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    if marker:
        (run / "tsopsd-run.json").write_text('{"run_id": "5f0c", "pid": 1, "host": "h"}')
    made = {"file": lambda p: p.write_text("{}"), "folder": lambda p: p.mkdir(), None: lambda p: None,
            "dev-zero": lambda p: p.symlink_to("/dev/zero"), "dangling": lambda p: p.symlink_to(tmp / "gone")}
    made[state](run / "state.json")
    if checkpoint:
        (run / "checkpoint-3").mkdir()
        (run / "checkpoint-3" / "model.safetensors").write_bytes(b"weights of step 3")
    if out:
        (tmp / "o").mkdir()
        (tmp / "o" / "notes.txt").write_text("the user's own")
    return reheat_args(world, tmp / "o", *extra)


def _legacy(world, tmp) -> Path:
    """A checkpoint in the legacy format: config and tokenizer, weights as pytorch_model.bin (never unpickled)."""
    legacy = tmp / "legacy"
    if not legacy.exists():
        shutil.copytree(world / "ckpt", legacy, ignore=shutil.ignore_patterns("*.safetensors*"))
        (legacy / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    return legacy


def _adapter_with_report(tmp, report: str | None) -> Path:
    adapter = tmp / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "none", "peft_type": "LORA"}')
    if report is not None:
        (adapter / "reheat_report.json").write_text(report)
    return adapter


def _folder(tmp) -> Path:
    (tmp / "o").mkdir()
    return tmp / "o"


def _locked(world, tmp, pid):
    out = tmp / "o"
    (tmp / "o.tsopsd-lock").write_text(f"{pid} {os.uname().nodename}")
    return reheat_args(world, out)


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gets_one_line_and_changes_nothing(world, tmp_path, case):
    make, message = BAD[case]
    args = make(world, tmp_path)
    before_input, before_tmp = tree_hash(world), tree_hash(tmp_path)
    res = runner.invoke(app, args)
    line = one_line(res)
    assert message.format(out=tmp_path / "o") in line, line
    assert tree_hash(world) == before_input  # the input and everything beside it: unchanged
    assert tree_hash(tmp_path) == before_tmp  # no output, run folder, lock or temporary written


def test_a_read_only_output_is_found_before_any_work(world, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({p.stderr.strip()})")
    try:
        res = runner.invoke(app, reheat_args(world, ro / "o"))
        assert "is not writable" in one_line(res)
        res = runner.invoke(app, reheat_args(world, tmp_path / "o", "--report-to", "tensorboard", "--set",
                                             f"output.logging_dir={ro / 'logs'}"))  # found after loading
        assert "is not writable" in one_line(res) and leftovers(tmp_path / "o") == []
        res = runner.invoke(app, ["measure-entropy", str(world / "ckpt"), "--prompts", str(world / "prompts.jsonl"),
                                  "--max-new-tokens", "8", "--out", str(ro / "m.json")])
        assert "is not writable" in one_line(res)
        assert not list(ro.iterdir())
    finally:
        unmount(ro)


def test_a_full_disk_fails_cleanly(world, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({p.stderr.strip()})")
    try:
        before = tree_hash(world)
        res = runner.invoke(app, reheat_args(world, small / "o"))
        assert "no space left on device" in one_line(res)
        assert not (small / "o").exists() and tree_hash(world) == before
        assert [n for n in leftovers(small / "o") if n != "o.tsopsd-run"] == []  # no lock, no temporaries
    finally:
        unmount(small)


def test_stale_lock_leftover_run_folder_and_temporaries_are_cleared(world, tmp_path):
    out = tmp_path / "o"
    pid = dead_pid()
    (tmp_path / "o.tsopsd-lock").write_text(f"{pid} {os.uname().nodename}")
    killed = tmp_path / "o.tsopsd-run"  # a run killed before its first save: its marker, no state.json
    killed.mkdir()
    (killed / "tsopsd-run.json").write_text('{"run_id": "5f0c", "pid": 1, "host": "h"}')
    (killed / "metrics.jsonl").write_text("")
    (tmp_path / f".o.tmp-{pid}-abc").mkdir()  # a final save killed before its rename
    (tmp_path / f".o.old-{pid}-run").mkdir()
    res = runner.invoke(app, reheat_args(world, out, "--resume"))
    assert res.exit_code == 2 and "taking over" in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (f"tsopsd: error: nothing to resume: {tmp_path / 'o.tsopsd-run'} "
                                                   "held no saved state (removed); rerun without --resume")
    assert leftovers(out) == []  # lock taken over and released, run folder and temporaries removed
    killed.mkdir()
    (killed / "tsopsd-run.json").write_text('{"run_id": "5f0c", "pid": 1, "host": "h"}')
    res = runner.invoke(app, reheat_args(world, out, quiet=False))
    assert res.exit_code == ExitCode.GOAL_NOT_MET, res.stderr  # 2 steps: written, not converged
    assert "a run folder without saved state" in res.stderr
    assert (out / "model.safetensors").is_file() and leftovers(out) == []


def test_a_second_live_run_on_the_same_out_is_refused(world, tmp_path):
    out = tmp_path / "o"
    first = subprocess.Popen([sys.executable, "-m", "tsopsd", *reheat_args(world, out, "--steps", "400", quiet=False)],
                             stderr=subprocess.PIPE, text=True, env=signals.env())
    try:
        for line in first.stderr:
            if "step 1/400" in line:
                break
        res = runner.invoke(app, reheat_args(world, out))
        work = signals.descendants(first.pid)  # the command waits on the process doing the work, which holds OUT
        assert any(f"another run is writing {out} (pid {pid})" in one_line(res) for pid in work), (work, res.stderr)
    finally:
        first.send_signal(2)
        first.wait(timeout=120)
    assert first.returncode == 130 and (tmp_path / "o.tsopsd-run" / "state.json").is_file()


def test_long_prompts_are_cut_to_the_context_with_a_warning(ckpts, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "the cat sat on the mat " * 900}) + "\n")  # 20,700 characters
    res = runner.invoke(app, ["measure-entropy", str(ckpts["gpt2"]), "--prompts", str(path), "--max-new-tokens", "8",
                              "--samples-per-prompt", "1", "--json"])
    assert res.exit_code == 0, res.stderr
    assert "the longest prompt (5401 tokens) do not fit the model's context of 512 positions: completions of up to 8 " \
        "tokens, prompts keep their last 504 tokens" in " ".join(res.stderr.split())
    assert json.loads(res.stdout)["metrics"]["tokens"] > 0


def test_resume_refuses_a_changed_input(world, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(world / "ckpt", src)
    args = ["reheat", src, "--prompts", world / "prompts.jsonl", "--out", tmp_path / "o", "--config", TINY,
            "--steps", "6", "--set", "output.eval_prompts=0"]
    r = signals.run_and_signal(args, when=lambda line: "step 1/6" in line)
    assert r.signalled and r.returncode == 130, r.stderr
    weights = load_file(src / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.01  # same names, shapes and size: new values
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    res = runner.invoke(app, [*map(str, args), "--resume", "--quiet"])
    assert "cannot resume: the input checkpoint changed since the run began" in one_line(res)
    assert (tmp_path / "o.tsopsd-run" / "state.json").is_file()  # nothing lost: --overwrite is the way on


# ---- fault injection -----------------------------------------------------------------------------

STEPS = 4


def fault_args(world, out):
    return ["reheat", world / "ckpt", "--prompts", world / "prompts.jsonl", "--out", out, "--config", TINY,
            "--steps", STEPS, "--set", "output.save_every=2", "--set", "output.eval_prompts=2",
            "--set", "stop.entropy_tolerance=0", "--target-entropy", "0.35", "--debug"]  # tau re-solved every step


# moment: how the test finds it (a line the run prints, or a file it writes) and how long it waits after
MOMENTS = {
    "during load": dict(when=lambda line: "loading " in line),
    "mid-rollout": dict(when=lambda line: f"step 1/{STEPS}" in line, delay=0.01),
    "mid-backward": dict(when=lambda line: f"step 1/{STEPS}" in line, delay=0.04),
    "periodic save": dict(when=lambda line: f"step 2/{STEPS}" in line),  # save_every 2: the save follows the line
    "between save and rename": dict(when_file=lambda out: any(out.parent.glob(f".{out.name}.tmp-*"))),
    "after the rename": dict(when_file=lambda out: out.is_dir()),
}
SIGNALS = {"SIGKILL": 9, "SIGINT": 2, "SIGTERM": 15}


def cli(args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tsopsd", *map(str, args)], capture_output=True, text=True,
                          env=signals.env(), timeout=300)


def landed(stderr: str) -> str:
    """Where the signal landed: the innermost tsopsd frame of the --debug traceback below the signal
    handling itself (a held signal surfaces where its held block ends)."""
    frames = [line.strip() for line in stderr.splitlines() if line.strip().startswith("File ") and "/tsopsd/" in line]
    frames = [f for f in frames if "/tsopsd/state.py" not in f]
    if not frames:
        return "-"
    last = frames[-1]  # File ".../tsopsd/rollout.py", line 93, in _sample_batch
    return last.split("/tsopsd/")[1].split('"')[0] + ":" + last.rsplit(" in ", 1)[1]


def complete(out: Path) -> bool:
    needed = ("model.safetensors", "config.json", "tokenizer.json", "reheat_report.json", "metrics.jsonl")
    return out.is_dir() and all((out / n).is_file() for n in needed) and bool(load_file(out / "model.safetensors"))


def interrupted_run(world, root: Path, moment: str, sig: str) -> dict:
    """Run `tsopsd reheat` in a subprocess and signal it at `moment`; what was there right after."""
    out = root / f"{moment.replace(' ', '-')}-{sig}" / "o"
    out.parent.mkdir(parents=True)
    spec = MOMENTS[moment]
    when_file = (lambda: spec["when_file"](out)) if "when_file" in spec else None
    r = signals.run_and_signal(fault_args(world, out), when=spec.get("when"), when_file=when_file,
                               sig=SIGNALS[sig], delay=spec.get("delay", 0.0))
    return {"moment": moment, "signal": sig, "out": out, "signalled": r.signalled, "exit": r.returncode,
            "landed": landed(r.stderr) if sig != "SIGKILL" else "(killed)",
            "out after signal": "complete" if complete(out) else "absent" if not out.exists() else "INCOMPLETE"}


def recover(world, row: dict, reference: dict) -> dict:
    """What a user does next, in this process (one thread, as the subprocesses run): --resume or a rerun."""
    out = row["out"]
    args = [str(a) for a in fault_args(world, out)]
    if (out.with_name("o.tsopsd-run") / "state.json").is_file() and not out.is_dir():
        rec, row["recovery"] = runner.invoke(app, [*args, "--resume"]), "--resume"
        ok = rec.exit_code == row["reference exit"]
    elif out.is_dir():  # finished before the signal took effect (its run folder may be left): --resume says so, tidies up
        rec, row["recovery"] = runner.invoke(app, [*args, "--resume"]), "--resume: already complete"
        ok = rec.exit_code == 2 and "is complete (its run finished)" in rec.stderr
    else:
        rec, row["recovery"] = runner.invoke(app, args), "rerun"
        ok = rec.exit_code == row["reference exit"]
    row["recovered"] = ok
    row["stderr"] = rec.stderr[-2000:]
    weights = load_file(out / "model.safetensors") if complete(out) else {}
    row["equal to uninterrupted"] = bool(weights) and weights.keys() == reference.keys() and all(
        torch.equal(weights[k], reference[k]) for k in reference) and taus(out) == taus(reference_out(row))
    row["leftovers"] = leftovers(out)
    return row


def taus(out: Path) -> list[float]:
    """The run's tau, step by step (re-solved on each step's rollouts), as metrics.jsonl and the report give it."""
    report = json.loads((out / "reheat_report.json").read_text()) if complete(out) else {}
    steps = [json.loads(line)["train/tau"] for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if complete(out) else None
    return steps if steps == report.get("teacher_temperature_over_run") else None


def reference_out(row: dict) -> Path:
    return row["out"].parent.parent / "reference" / "o"


# `make test` sends SIGKILL at every moment (what a crash leaves); SIGTERM and SIGINT share one handler
# (`state.interrupts`, exercised in `make test` by test_outcome's interrupts) and `make test-slow` sends both at every
# moment.
@pytest.mark.parametrize("signals_sent", [("SIGKILL",), pytest.param(("SIGTERM", "SIGINT"), marks=pytest.mark.slow)])
def test_signals_at_every_moment_lose_nothing(world, tmp_path, signals_sent):
    """Every (moment, signal) pair: OUT absent or complete, input unchanged, recovery equals the uninterrupted run."""
    ref_out = tmp_path / "reference" / "o"
    p = cli(fault_args(world, ref_out))
    assert p.returncode in (ExitCode.DONE, ExitCode.GOAL_NOT_MET), p.stderr[-3000:]  # OUT written: met or not
    reference = load_file(ref_out / "model.safetensors")
    before = tree_hash(world)
    cases = [(m, s) for m in MOMENTS for s in signals_sent]
    with ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: each run is mostly one core's start-up
        rows = list(pool.map(lambda c: interrupted_run(world, tmp_path, *c), cases))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses (OMP_NUM_THREADS=1): the same kernels, bit for bit
    try:
        rows = [recover(world, row | {"reference exit": p.returncode}, reference) for row in rows]
    finally:
        torch.set_num_threads(threads)
    lines = ["fault injection (tests/test_bad_input_and_signals.py): moment x signal -> where it landed, what was left, recovery",
             f"  {'moment':<24} {'signal':<8} {'exit':>4}  {'landed in':<34} {'OUT after':<9} recovery -> result"]
    for row in rows:
        result = "equal, clean" if row["equal to uninterrupted"] and row["recovered"] and not row["leftovers"] else \
            f"FAILED {row['leftovers']}"
        lines.append(f"  {row['moment']:<24} {row['signal']:<8} {row['exit']:>4}  {row['landed']:<34} "
                     f"{row['out after signal']:<9} {row['recovery']} -> {result}")
    report(lines)
    assert tree_hash(world) == before  # the input, after every interrupted run and its recovery
    for row in rows:
        assert row["signalled"], row
        assert row["out after signal"] in ("absent", "complete"), row
        if row["signal"] != "SIGKILL" and row["exit"] >= 0:  # caught: 130, or OUT's own outcome once it is complete
            assert row["exit"] == (row["reference exit"] if row["out after signal"] == "complete" else 130), row
        assert row["recovered"] and row["equal to uninterrupted"] and row["leftovers"] == [], \
            (row["moment"], row["signal"], row["leftovers"], row["stderr"])
