"""The CLI through CliRunner (in process) and through a real subprocess (exit codes, stdout/stderr)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tsopsd.cli import app
from tsopsd.errors import ExitCode

runner = CliRunner()
TINY = Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml"


def test_measure_entropy_json_is_one_object(ckpt, prompts_file, tmp_path):
    out = tmp_path / "m.json"
    res = runner.invoke(app, ["measure-entropy", str(ckpt), "--prompts", str(prompts_file), "--max-new-tokens", "8",
                              "--samples-per-prompt", "2", "--json", "--quiet", "--out", str(out),
                              "--reference", str(ckpt)])
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)  # exactly one JSON document on stdout
    assert obj == json.loads(out.read_text())
    m = obj["metrics"]
    assert m["prompts"] == 3 and m["samples_per_prompt"] == 2
    assert m["reference"]["top1_agreement"] == 1.0
    assert m["reference"]["layers"]["cosine"] == pytest.approx([1.0, 1.0], abs=1e-6)  # the same model, 2 layers
    assert obj["device"] == "cpu" and obj["dtype"] == "float32"


def test_measure_entropy_table(ckpt, prompts_file):
    res = runner.invoke(app, ["measure-entropy", str(ckpt), "--prompts", str(prompts_file), "--max-new-tokens", "4",
                              "--samples-per-prompt", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "mean token entropy" in res.stdout and "distinct-2" in res.stdout


def _cli(*args, cwd=None):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "tsopsd", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def test_subprocess_json_and_exit_zero(ckpt, prompts_file):
    p = _cli("measure-entropy", ckpt, "--prompts", prompts_file, "--max-new-tokens", "4", "--samples-per-prompt", "1",
             "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["metrics"]["tokens"] > 0
    # progress and logs never reach stdout (off a terminal: PROGRESS lines on stderr, for a phase over a second,
    # test_progress_off_a_terminal_is_a_line_a_second_at_most)
    assert "PROGRESS" not in p.stdout and "INFO measuring" in p.stderr


@pytest.fixture
def broken(tmp_path, ckpt):
    import shutil

    cases = {}
    cases["missing"] = tmp_path / "missing"
    (tmp_path / "empty").mkdir()
    cases["empty"] = tmp_path / "empty"
    trunc = tmp_path / "trunc"
    shutil.copytree(ckpt, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[:-64])
    cases["trunc"] = trunc
    notok = tmp_path / "notok"
    shutil.copytree(ckpt, notok)
    (notok / "tokenizer.json").unlink()
    (notok / "tokenizer_config.json").unlink()
    cases["notok"] = notok
    noweights = tmp_path / "noweights"
    shutil.copytree(ckpt, noweights)
    (noweights / "model.safetensors").unlink()
    cases["noweights"] = noweights
    corrupt = tmp_path / "corrupt"
    shutil.copytree(ckpt, corrupt)
    data = bytearray((corrupt / "model.safetensors").read_bytes())
    data[8:16] = b"garbage!"
    (corrupt / "model.safetensors").write_bytes(bytes(data))
    cases["corrupt"] = corrupt
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "/nowhere/base", "peft_type": "LORA"}')
    shutil.copy(ckpt / "model.safetensors", adapter / "adapter_model.safetensors")  # any valid safetensors file
    cases["adapter"] = adapter
    return cases


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "checkpoint not found"),
        ("empty", "not a model folder"),
        ("trunc", "truncated weights file"),
        ("notok", "no tokenizer in"),
        ("noweights", "no weights in"),
        ("corrupt", "corrupt weights file"),
        ("adapter", "adapter base '/nowhere/base' not found"),
    ],
)
def test_bad_checkpoint_exit_2_one_line(broken, prompts_file, case, message):
    p = _cli("measure-entropy", broken[case], "--prompts", prompts_file)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("tsopsd: error: ") and message in lines[0]
    assert "Traceback" not in p.stderr and p.stdout == ""


@pytest.mark.parametrize(
    "content, message",
    [("", "prompt file is empty"), ('{"prompt": "a"}\n{oops\n', "p.jsonl:2: bad JSON"),
     ('{"q": "a"}\n', "p.jsonl:1: missing field 'prompt'"), ('{"prompt": ["x"]}\n', "p.jsonl:1: prompt must be")],
)
def test_bad_prompts_exit_2_with_line(ckpt, tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    res = runner.invoke(app, ["measure-entropy", str(ckpt), "--prompts", str(path), "--quiet"])
    assert res.exit_code == 2
    assert message in res.stderr and "Traceback" not in res.output


def test_usage_error_exit_2(ckpt):
    p = _cli("measure-entropy", ckpt)  # --prompts missing
    assert p.returncode == 2 and "--prompts" in p.stderr
    p = _cli("measure-entropy", ckpt, "--prompts", "x.jsonl", "--samples-per-prompt", "0")
    assert p.returncode == 2


def test_unexpected_failure_exit_1_without_traceback(ckpt, prompts_file, monkeypatch):
    import tsopsd.metrics

    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(tsopsd.metrics, "measure", boom)
    res = runner.invoke(app, ["measure-entropy", str(ckpt), "--prompts", str(prompts_file), "--quiet"])
    assert res.exit_code == 1
    assert "unexpected failure: RuntimeError: kaboom" in res.stderr and "Traceback" not in res.stderr
    res = runner.invoke(app, ["measure-entropy", str(ckpt), "--prompts", str(prompts_file), "--quiet", "--debug"])
    assert res.exit_code == 1 and "Traceback" in res.stderr


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.startswith("tsopsd ")


def test_reheat_cli_json_refuses_existing_out_and_merge(collapsed, tmp_path):
    ckpt, prompts = collapsed
    out = tmp_path / "adapter"
    args = ["reheat", str(ckpt), "--prompts", str(prompts), "--out", str(out), "--config", str(TINY),
            "--steps", "3", "--save", "adapter", "--set", "output.eval_prompts=2", "--json", "--quiet"]
    res = runner.invoke(app, args)
    assert res.exit_code == ExitCode.GOAL_NOT_MET, res.output  # 3 steps do not converge: written, and said so
    report = json.loads(res.stdout)
    assert report["steps_run"] == 3 and report["save"] == "adapter" and report["teacher_temperature"] == 1.2
    assert report["status"] == "goal_not_met"
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "output folder exists" in res.stderr and "--overwrite" in res.stderr
    merged = tmp_path / "merged"
    res = runner.invoke(app, ["merge", str(out), "--out", str(merged), "--quiet"])
    assert res.exit_code == 0, res.output
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    res = runner.invoke(app, ["merge", str(ckpt), "--out", str(tmp_path / "m2"), "--quiet"])
    assert res.exit_code == 2 and "not a PEFT adapter" in res.stderr


def test_reheat_cli_bad_config_lists_errors(collapsed, tmp_path):
    ckpt, prompts = collapsed
    res = runner.invoke(app, ["reheat", str(ckpt), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                              "--temperature", "0.5", "--set", "loss.beta=3", "--quiet"])
    assert res.exit_code == 2
    assert "teacher.temperature: must be > 1" in res.stderr and "loss.beta: must be in (0, 1)" in res.stderr
    res = runner.invoke(app, ["reheat", str(ckpt), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                              "--mode", "sideways"])
    assert res.exit_code == 2


def test_nan_loss_on_the_first_step_trained_nothing_one_line_and_no_output(collapsed, tmp_path, monkeypatch):
    import tsopsd.loss as loss_mod

    real = loss_mod.divergence_and_grad

    def poisoned(student_logits, *args, **kwargs):
        return real(student_logits * float("nan"), *args, **kwargs)

    monkeypatch.setattr(loss_mod, "divergence_and_grad", poisoned)
    ckpt, prompts = collapsed
    res = runner.invoke(app, ["reheat", str(ckpt), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                              "--config", str(TINY), "--steps", "3", "--set", "output.eval_prompts=0", "--quiet"])
    assert res.exit_code == ExitCode.NOTHING_TRAINED
    assert "non-finite loss at step 1" in res.stderr and "unexpected" not in res.stderr
    assert "nothing was trained, so no output was written" in res.stderr
    assert not (tmp_path / "o").exists()  # the last good state is the input: no OUT that looks reheated


# Bad input of every kind (outputs that would destroy an input, flags out of range, ...): tests/test_bad_input_and_signals.py.


def test_the_cuda_allocator_gets_expandable_segments_unless_the_user_chose(monkeypatch):
    from tsopsd.runtime import cuda_allocator

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    cuda_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    cuda_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


def test_off_a_terminal_every_log_line_is_one_timestamped_event(collapsed, tmp_path, monkeypatch):
    """A batch job's log: one line per event, an ISO timestamp and the level first, never wrapped, so a
    step is one line that grep finds whole."""
    import re

    from tsopsd import console

    monkeypatch.setattr(console, "QUIET_S", 0.0)  # this tiny run's phases take well under a second

    ckpt, prompts = collapsed
    res = runner.invoke(app, ["reheat", str(ckpt), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                              "--config", str(TINY), "--steps", "3", "--set", "output.eval_prompts=2"])
    assert res.exit_code == ExitCode.GOAL_NOT_MET, res.output  # 3 steps: written, not converged
    lines = res.stderr.splitlines()
    assert lines[-1].startswith("tsopsd: error: goal not met")  # the exit's one line, after the events
    lines = lines[:-1]
    event = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} (DEBUG|INFO|WARNING|ERROR|PROGRESS) \S")
    assert lines and [line for line in lines if not event.match(line)] == []
    steps = [line for line in lines if " INFO step " in line]
    assert [s.split(" INFO step ")[1].split()[0] for s in steps] == ["1/3", "2/3", "3/3"]
    assert all("train" in s and s.endswith("tok/s") for s in steps)  # the whole step line, on its line
    # the long measurements before and after training show their progress too (point 3)
    shown = {line.split(" PROGRESS ")[1].split(":")[0] for line in lines if " PROGRESS " in line}
    assert {"before-report", "after-report"} <= shown, shown


def test_after_the_table_reheat_says_what_to_run_with_its_out(collapsed, tmp_path):
    ckpt, prompts = collapsed
    out = tmp_path / "o"
    res = runner.invoke(app, ["reheat", str(ckpt), "--prompts", str(prompts), "--out", str(out), "--config", str(TINY),
                              "--steps", "3", "--set", "output.eval_prompts=0", "--save", "adapter", "--quiet",
                              "--set", "stop.window=2", "--set", "stop.entropy_tolerance=0.99"])  # met after 1 update
    assert res.exit_code == ExitCode.DONE, res.output
    assert f"tsopsd merge {out} --out {out}-merged" in res.stdout
    assert f"actor_rollout_ref.model.path={out}-merged" in res.stdout and "temperature 1.0" in res.stdout
    res = runner.invoke(app, ["merge", str(out), "--out", str(tmp_path / "m")])
    assert res.exit_code == 0 and f"wrote {tmp_path / 'm'}" in res.stderr, res.output
    # the merged folder keeps the reheat's record and says what it is now (point 9)
    from huggingface_hub import ModelCard

    merged = tmp_path / "m"
    report = json.loads((merged / "reheat_report.json").read_text())
    assert report["save"] == "merged" and report["merged_from"] == str(out.resolve())
    assert report["after"] == json.loads((out / "reheat_report.json").read_text())["after"]
    assert (merged / "metrics.jsonl").read_text() == (out / "metrics.jsonl").read_text()
    card = ModelCard.load(merged / "README.md").data
    assert card.library_name == "transformers" and card.base_model == report["input_resolved"]


def test_resume_alone_reuses_the_saved_config_and_names_a_flag_that_differs(collapsed, tmp_path, interrupt_rollout):
    """`tsopsd reheat CKPT --out OUT --resume` needs no other flag; one given that differs from the saved
    run is named with both values."""
    ckpt, prompts = collapsed
    out = tmp_path / "o"
    fired = interrupt_rollout(2)
    first = runner.invoke(app, ["reheat", str(ckpt), "--prompts", str(prompts), "--out", str(out), "--config", str(TINY),
                                "--steps", "4", "--max-new-tokens", "12", "--set", "output.eval_prompts=0", "--quiet"])
    assert first.exit_code == 130 and fired == [2], first.output
    res = runner.invoke(app, ["reheat", str(ckpt), "--out", str(out), "--resume", "--max-new-tokens", "10", "--quiet"])
    assert res.exit_code == 2
    assert "rollout.max_new_tokens: saved 12, given 10" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = runner.invoke(app, ["reheat", str(ckpt), "--out", str(out), "--resume", "--json"])
    assert res.exit_code == ExitCode.GOAL_NOT_MET, res.output  # 4 steps: written, not converged
    report = json.loads(res.stdout)
    assert report["steps_run"] == 4 and (out / "model.safetensors").is_file()
    # one numbering: the console, the interrupt, the resume and metrics.jsonl count alike
    assert "interrupted at step 3:" in first.stderr and "at step 3 of 4" in res.stderr and " step 3/4 " in res.stderr
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_reheat_help_reads_at_80_columns_in_panels_with_defaults():
    res = runner.invoke(app, ["reheat", "--help"], env={"COLUMNS": "80", "TERM": "dumb"})
    assert res.exit_code == 0
    text = res.stdout
    assert max(len(line) for line in text.splitlines()) <= 80
    for panel in ("Inputs", "Teacher", "Rollout", "Training", "Output", "Run"):
        assert f"─ {panel} ─" in text, panel
    flat = " ".join(text.replace("│", " ").split())  # a help wraps inside its panel's borders
    for shown in ("(default 200)", "(default 1.5)", "(default lora)", "(default 0.0001)", "(default 256)"):
        assert shown in flat, shown
    assert "Required." in flat and "Required (a --resume" in flat and "CKPT" in text
    # switches are switches and the usage names the argument plainly (not typer's `<bool>`, `{CKPT}`)
    assert "<bool>" not in text and "{" not in text and "reheat [OPTIONS] CKPT" in flat
    for command in ("measure-entropy", "plan", "merge", "demo"):
        other = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80", "TERM": "dumb"}).stdout
        assert "<bool>" not in other and "{" not in other.split("Usage:")[1].splitlines()[0], command


def test_dry_run_checks_the_prompt_file_before_planning(ckpt, tmp_path):
    res = runner.invoke(app, ["reheat", str(ckpt), "--prompts", str(tmp_path / "missing.jsonl"), "--out",
                              str(tmp_path / "o"), "--dry-run"])
    assert res.exit_code == 2 and "missing.jsonl" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_the_output_records_where_it_came_from_for_the_hub_and_for_a_rerun(collapsed, tmp_path, monkeypatch):
    """The card's metadata loads with huggingface_hub (base_model, library_name peft for an
    adapter, tags); config.yaml holds resolved paths and no --overwrite; the report holds the input's fingerprint."""
    import yaml
    from huggingface_hub import ModelCard

    ckpt, prompts = collapsed
    monkeypatch.chdir(tmp_path)
    (tmp_path / "o").mkdir()
    res = runner.invoke(app, ["reheat", str(ckpt), "--prompts", str(prompts), "--out", "o", "--config", str(TINY),
                              "--steps", "2", "--set", "output.eval_prompts=2", "--save", "adapter", "--overwrite",
                              "--quiet"])
    assert res.exit_code == ExitCode.GOAL_NOT_MET, res.output  # 2 steps: written, not converged
    card = ModelCard.load(tmp_path / "o" / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == str(Path(ckpt).resolve())
    assert "tsopsd" in card.data.tags and "95% CI" in card.text
    saved = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert saved["output"]["out"] == str((tmp_path / "o").resolve()) and saved["output"]["overwrite"] is False
    assert saved["model"]["path"] == str(Path(ckpt).resolve()) and saved["data"]["prompts"] == str(Path(prompts).resolve())
    report = json.loads((tmp_path / "o" / "reheat_report.json").read_text())
    assert any(k.startswith("prompts:") for k in report["input_fingerprint"]) and len(report["input_fingerprint"]) > 2


def test_progress_off_a_terminal_is_a_line_a_second_at_most(monkeypatch, capsys):
    """Off a terminal a long phase says how far it is, every ~10% but at most once a second; a phase done within a
    second says nothing (the demo's log had 11 identical-time lines per measurement)."""
    from tsopsd import console

    clock = {"t": 100.0}
    monkeypatch.setattr(console.time, "monotonic", lambda: clock["t"])
    with console.progress(True) as task:
        quick = task("quick", 50)
        for _ in range(50):
            clock["t"] += 0.01  # 0.5 s in all
            quick(1)
        slow = task("slow", 100)
        for _ in range(100):
            clock["t"] += 0.25  # 25 s in all
            slow(1)
    lines = capsys.readouterr().err.splitlines()
    assert not [line for line in lines if "PROGRESS quick" in line]
    done = [int(line.split("PROGRESS slow: ")[1].split("/")[0]) for line in lines if "PROGRESS slow: " in line]
    assert done[-1] == 100 and 9 <= len(done) <= 11 and done == sorted(done)
    assert all(b - a >= 4 for a, b in zip(done, done[1:]))  # >= 1 s apart at 0.25 s a step


def test_loading_and_saving_bars_on_a_terminal_only(monkeypatch):
    """A checkpoint's loading and saving (tens of seconds at 4B) show transformers' bars on a terminal; in a batch
    log (and with --quiet) they are off: a bar redrawn with carriage returns is not one line per event."""
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from tsopsd import console

    monkeypatch.setattr(console, "stderr", Console(stderr=True, force_terminal=True))
    console.setup_logging()
    assert hf_logging.is_progress_bar_enabled()
    console.setup_logging(quiet=True)
    assert not hf_logging.is_progress_bar_enabled()
    monkeypatch.setattr(console, "stderr", Console(stderr=True, force_terminal=False))
    console.setup_logging()
    assert not hf_logging.is_progress_bar_enabled()


def test_a_libraries_two_line_warning_is_one_log_event():
    """peft warns in two lines; off a terminal it is one timestamped event like every other line."""
    import re

    code = ("from tsopsd import console; console.setup_logging(); import warnings; "
            "warnings.warn('first line\\nsecond line', UserWarning)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"})
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 0 and len(lines) == 1, p.stderr
    assert re.match(r"^\d{4}-\d\d-\d\dT\S+ WARNING .*UserWarning: first line \| second line", lines[0]), lines


def test_every_flag_names_a_config_key():
    """The one flag -> key table (`cli.FLAG_KEYS`) names keys the config has, so a flag cannot silently set nothing."""
    import dataclasses

    from tsopsd.cli import FLAG_KEYS
    from tsopsd.config import Config

    def keys(obj, prefix=""):
        out = set()
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            out |= keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else {prefix + f.name}
        return out

    assert set(FLAG_KEYS.values()) <= keys(Config()), set(FLAG_KEYS.values()) - keys(Config())


def test_a_flag_that_sets_a_config_key_says_that_keys_help_and_default():
    """One sentence per key: `reheat --help` shows the config field's help (and its default) for every flag in
    FLAG_KEYS, as configs/default.yaml does."""
    from tsopsd.cli import FLAG_KEYS
    from tsopsd.config_doc import config_default, help_of

    res = runner.invoke(app, ["reheat", "--help"], env={"COLUMNS": "2000", "TERM": "dumb"})
    flat = " ".join(res.stdout.replace("│", " ").split())
    for flag, key in FLAG_KEYS.items():
        said = " ".join(help_of(key).split())
        assert said in flat, (flag, said)
        default = config_default(key)
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            assert f"{said}. (default {default})" in flat or f"{said} (default {default})" in flat, flag
