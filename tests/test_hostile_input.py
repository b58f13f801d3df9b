"""Hostile input through the real CLI: inputs, the run folder, resume, checkpoints along the way, merge.

Each case is a way a promise can break: an input modified, an OUT left half there, a resume that gives other
weights or a false report, a corrupt checkpoint accepted, bad input that crashes, output that is not one line,
something unpickled from the run folder. Each one asserts the exit code, exactly one `tsopsd: error:` line
with no traceback or box, that every input hashes the same, and that nothing was left beside OUT or inside any
input.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import signals
import torch
from safetensors.torch import load_file, save_file
from test_bad_input_and_signals import TINY, leftovers, one_line, reheat_args, runner, tree_hash

from tsopsd.cli import app
from tsopsd.errors import ExitCode
from tsopsd.saved import file_digest, seal
from tsopsd.writing import pid_alive

PY = [sys.executable, "-m", "tsopsd"]


def squeeze(text: str) -> str:
    """`text` without whitespace: log lines on stderr wrap at 80 columns, inside paths too."""
    return "".join(text.split())


def measure_args(ck, prompts, *extra):
    return ["measure-entropy", str(ck), "--prompts", str(prompts), "--max-new-tokens", "4", "--samples-per-prompt",
            "1", "--limit", "2", "--quiet", *map(str, extra)]


def copy_ckpt(w, t, name="ck") -> Path:
    shutil.copytree(w / "ckpt", t / name)
    return t / name


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_header(ck: Path, edit) -> Path:
    """Rewrite model.safetensors with `edit(header)` applied to its JSON header (the data bytes kept)."""
    f = ck / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8:8 + n]))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return ck


def first_tensor(header: dict) -> str:
    return sorted(k for k in header if k != "__metadata__")[0]


def sharded(w, t) -> Path:
    """A copy of the checkpoint saved in several shards with an index."""
    from transformers import AutoModelForCausalLM

    ck = t / "sharded"
    model = AutoModelForCausalLM.from_pretrained(str(w / "ckpt"))
    model.save_pretrained(str(ck), max_shard_size="100KB")
    for f in (w / "ckpt").glob("tokenizer*"):
        shutil.copy(f, ck / f.name)
    return ck


def misplaced_tensor(w, t):
    ck = sharded(w, t)
    index = ck / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shards = sorted(set(data["weight_map"].values()))
    name = "model.embed_tokens.weight"
    data["weight_map"][name] = next(s for s in shards if s != data["weight_map"][name])
    index.write_text(json.dumps(data))
    return measure_args(ck, w / "prompts.jsonl"), "does not hold it"


def renamed_tensor(w, t):
    ck = copy_ckpt(w, t)
    weights = load_file(ck / "model.safetensors")
    weights["model.nrm.weight"] = weights.pop("model.norm.weight")
    save_file(weights, ck / "model.safetensors", metadata={"format": "pt"})
    return measure_args(ck, w / "prompts.jsonl"), "missing keys: model.norm.weight; unexpected keys: model.nrm.weight"


def adapter_folder(w, t, config) -> Path:
    ad = t / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps(config))
    shutil.copy(w / "ckpt" / "model.safetensors", ad / "adapter_model.safetensors")
    return ad


def index_copy(w, t, index) -> Path:
    ck = copy_ckpt(w, t)
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    return ck


def with_template(w, t, template: str):
    ck = copy_ckpt(w, t)
    (ck / "chat_template.jinja").write_text(template)
    prompts = t / "chat.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "sum 3 ="}]}) + "\n")
    return measure_args(ck, prompts)


def config_dir(t, config) -> Path:
    d = t / "cfgdir"
    d.mkdir()
    config.to_json_file(str(d / "config.json")) if hasattr(config, "to_json_file") else \
        (d / "config.json").write_text(json.dumps(config))
    return d


def edited_config(w, t, **changes) -> Path:
    d = t / "cfgdir"
    d.mkdir()
    data = json.loads((w / "ckpt" / "config.json").read_text())
    data.update(changes)
    (d / "config.json").write_text(json.dumps(data))
    return d


def plan_args(source):
    return ["plan", str(source), "--config", str(TINY), "--json"]


def checkpoint_config(w, t, **changes):
    ck = copy_ckpt(w, t)
    edit_json(ck / "config.json", **changes)
    return measure_args(ck, w / "prompts.jsonl")


def run_folder(w, t) -> Path:
    run = t / "run"
    for step in (1, 2):
        shutil.copytree(w / "ckpt", run / f"checkpoint-{step}")
    return run


def linked_weights(w, t):
    """A checkpoint whose weights file is a link into the previous OUT, reheated onto that OUT."""
    prev = copy_ckpt(w, t, "prev")
    ck = copy_ckpt(w, t)
    (ck / "model.safetensors").unlink()
    (ck / "model.safetensors").symlink_to(prev / "model.safetensors")
    return reheat_args(w, prev, "--overwrite")[:1] + [str(ck)] + reheat_args(w, prev, "--overwrite")[2:]


def fifo(t) -> Path:
    path = t / "p.jsonl"
    os.mkfifo(path)
    return path


def bad_prompts(t) -> Path:
    path = t / "bad.jsonl"
    path.write_text("not json\n")
    return path


def _bert():
    from transformers import BertConfig

    return BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _t5():
    from transformers import T5Config

    return T5Config(vocab_size=100, d_model=32, num_layers=2, num_heads=2, d_ff=64, d_kv=16)


def _mamba():
    from transformers import MambaConfig

    return MambaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2)


def _with_reheat_ckpt(args, ck):
    return args[:1] + [str(ck)] + args[2:]


# name: make(world, tmp) -> (args, text the one line holds[, exit code])
CASES = {
    # A. an input modified
    "measure --out CKPT/config.json": lambda w, t: (measure_args(w / "ckpt", w / "prompts.jsonl", "--out",
                                                                 w / "ckpt" / "config.json"), "lies inside the checkpoint"),
    "measure --out PROMPTS": lambda w, t: (measure_args(w / "ckpt", w / "prompts.jsonl", "--out", w / "prompts.jsonl"),
                                           "is the prompt file"),
    "--plot inside a run's checkpoint": lambda w, t: (measure_args(run_folder(w, t), w / "prompts.jsonl", "--plot",
                                                                   t / "run" / "checkpoint-2" / "entropy.png"),
                                                      "lies inside the checkpoint"),
    "tensorboard logging_dir = CKPT": lambda w, t: (reheat_args(w, t / "o", "--report-to", "tensorboard", "--set",
                                                                f"output.logging_dir={w / 'ckpt'}"),
                                                    "output.logging_dir"),
    "weights linked into the OUT replaced": lambda w, t: (linked_weights(w, t), "contains the checkpoint"),
    # B. OUT not absent-or-complete
    "logging_dir = OUT": lambda w, t: (reheat_args(w, t / "o", "--report-to", "tensorboard", "--set",
                                                   f"output.logging_dir={t / 'o'}"), "is the output.logging_dir"),
    "OUT a dangling symlink": lambda w, t: ((t / "o").symlink_to(t / "nowhere"), reheat_args(w, t / "o"))[1:] +
    ("is a symbolic link",),
    "merge --out .": lambda w, t: (["merge", str(w / "ckpt"), "--out", "."], "name a new folder"),
    "bad prompts, OUT in new folders": lambda w, t: (reheat_args(w, t / "a" / "new" / "deep" / "out")[:3] +
                                                     [str(bad_prompts(t))] + reheat_args(w, t / "a/new/deep/out")[4:],
                                                     "bad.jsonl:1: bad JSON"),
    # D. a corrupt checkpoint
    "index puts a tensor in the wrong shard": misplaced_tensor,
    "a tensor missing, an unexpected one": renamed_tensor,
    # E. bad input: one line, exit 2
    "non-UTF-8 YAML": lambda w, t: ((t / "c.yaml").write_bytes(b"train:\n  lr: \xff\n"),
                                    reheat_args(w, t / "o", "--config", t / "c.yaml"))[1:] + ("not UTF-8",),
    "--set train.lr=[1": lambda w, t: (reheat_args(w, t / "o", "--set", "train.lr=[1"), "not a valid YAML value"),
    "--set python/name": lambda w, t: (reheat_args(w, t / "o", "--set", "train.lr=!!python/name:os.system"),
                                       "not a valid YAML value"),
    "--out .": lambda w, t: (reheat_args(w, "."), "name a new folder"),
    "--out /": lambda w, t: (reheat_args(w, "/", "--overwrite"), "name a new folder"),
    "--out a 250-character name": lambda w, t: (reheat_args(w, t / ("o" * 250)), "is 250 bytes"),
    "--out not UTF-8": lambda w, t: (reheat_args(w, t / "o\udcff"), "not valid UTF-8"),
    "adapter_config.json a list": lambda w, t: (measure_args(adapter_folder(w, t, []), w / "prompts.jsonl"),
                                                "expected a JSON object"),
    "adapter base a number": lambda w, t: (measure_args(adapter_folder(w, t, {"base_model_name_or_path": 7}),
                                                        w / "prompts.jsonl"), "must be a path, got 7"),
    "shard index a list": lambda w, t: (measure_args(index_copy(w, t, []), w / "prompts.jsonl"), "corrupt shard index"),
    "weight_map a list": lambda w, t: (measure_args(index_copy(w, t, {"weight_map": []}), w / "prompts.jsonl"),
                                       "corrupt shard index"),
    "shard named by a number": lambda w, t: (measure_args(index_copy(w, t, {"weight_map": {"lm_head.weight": 3}}),
                                                          w / "prompts.jsonl"), "corrupt shard index"),
    "header: dtype edited": lambda w, t: (measure_args(edit_header(copy_ckpt(w, t), lambda h: {
        **h, first_tensor(h): {**h[first_tensor(h)], "dtype": "F16"}}), w / "prompts.jsonl"),
                                           "invalid shape, data type, or offset"),
    "header: shape edited": lambda w, t: (measure_args(edit_header(copy_ckpt(w, t), lambda h: {
        **h, first_tensor(h): {**h[first_tensor(h)], "shape": [7, 7]}}), w / "prompts.jsonl"),
                                           "invalid shape, data type, or offset"),
    "header: unknown dtype": lambda w, t: (measure_args(edit_header(copy_ckpt(w, t), lambda h: {
        **h, first_tensor(h): {**h[first_tensor(h)], "dtype": "F33"}}), w / "prompts.jsonl"), "unknown variant `F33`"),
    "header a list": lambda w, t: (measure_args(edit_header(copy_ckpt(w, t), lambda h: list(h)), w / "prompts.jsonl"),
                                   "invalid type: sequence"),
    "header: data_offsets missing": lambda w, t: (measure_args(edit_header(copy_ckpt(w, t), lambda h: {
        **h, first_tensor(h): {"dtype": "F32", "shape": [1]}}), w / "prompts.jsonl"), "missing field `data_offsets`"),
    "chat template raises": lambda w, t: (with_template(w, t, "{{ raise_exception('no user turns here') }}"),
                                          "chat_template.jinja, template line 1) failed: no user turns here"),
    "chat template syntax error": lambda w, t: (with_template(w, t, "{% for m in messages %}\n{{ m.content }\n"),
                                                "chat_template.jinja, template line 2) failed"),
    **{f"--device {d}": (lambda w, t, d=d: (measure_args(w / "ckpt", w / "prompts.jsonl", "--device", d),
                                            f"device '{d}' is not supported")) for d in ("meta", "mps", "xpu", "hpu")},
    "plan BERT": lambda w, t: (plan_args(config_dir(t, _bert())), "is an encoder"),
    "plan T5": lambda w, t: (plan_args(config_dir(t, _t5())), "is not a causal language model"),
    "plan Mamba": lambda w, t: (plan_args(config_dir(t, _mamba())), "has no attention heads"),
    "plan heads not a multiple of KV heads": lambda w, t: (plan_args(edited_config(w, t, num_key_value_heads=3)),
                                                           "is not a multiple of num_key_value_heads 3"),
    "plan vocab_size 0": lambda w, t: (plan_args(edited_config(w, t, vocab_size=0)), "vocab_size must be an integer"),
    "plan hidden_size 1": lambda w, t: (plan_args(edited_config(w, t, hidden_size=1)), "hidden_size must be an integer"),
    "plan 10^6 layers": lambda w, t: (plan_args(edited_config(w, t, num_hidden_layers=10**6)), "more than 1024"),
    "plan vocab_size 10^9": lambda w, t: (plan_args(edited_config(w, t, vocab_size=10**9)),
                                          "vocab_size 1000000000 is more than 16777216"),
    "plan a context of 0 positions": lambda w, t: (plan_args(edited_config(w, t, max_position_embeddings=0)),
                                                   "max_position_embeddings must be an integer >= 1"),
    "measure, a context of 0 positions": lambda w, t: (checkpoint_config(w, t, max_position_embeddings=0),
                                                       "max_position_embeddings must be an integer >= 1"),
    "eos id outside the vocabulary": lambda w, t: (checkpoint_config(w, t, eos_token_id=10**6),
                                                   "eos_token_id 1000000 is outside the vocabulary"),
    "pad id outside the vocabulary": lambda w, t: (checkpoint_config(w, t, pad_token_id=-5),
                                                   "pad_token_id -5 is outside the vocabulary"),
    "logging_dir a file": lambda w, t: ((t / "logs").write_text("x"), reheat_args(
        w, t / "o", "--report-to", "tensorboard", "--set", f"output.logging_dir={t / 'logs'}"))[1:] +
    ("exists and is not a folder",),
    "--plot at a .safetensors path": lambda w, t: (measure_args(run_folder(w, t), w / "prompts.jsonl", "--plot",
                                                                t / "e.safetensors"), "name a .png, .svg or .pdf"),
    "lock path a folder": lambda w, t: ((t / "o.tsopsd-lock").mkdir(), reheat_args(w, t / "o"))[1:] + ("is a folder",),
    # H. weaker ones
    "--samples-per-prompt 100000000": lambda w, t: (measure_args(w / "ckpt", w / "prompts.jsonl", "--samples-per-prompt",
                                                                 100_000_000), "in 1..4096"),
    "FIFO prompt file": lambda w, t: (measure_args(w / "ckpt", fifo(t)), "not a regular file"),
    "--config DIR": lambda w, t: (reheat_args(w, t / "o", "--config", t), "is a folder"),
}


@pytest.mark.parametrize("case", CASES)
def test_hostile_input_gets_one_line_and_changes_nothing(world, tmp_path, case):
    made = CASES[case](world, tmp_path)
    args, message, code = (*made, 2) if len(made) == 2 else made
    before_input, before_tmp = tree_hash(world), tree_hash(tmp_path)
    res = runner.invoke(app, [str(a) for a in args])
    assert message in one_line(res, code), (case, res.stderr)
    assert tree_hash(world) == before_input  # the inputs: unchanged
    assert tree_hash(tmp_path) == before_tmp  # no output, run folder, lock, temporary or new folder left


def test_usage_errors_are_one_line_not_a_box(world, tmp_path):
    cases = {("reheat", "--bogus"): "No such option: --bogus", ("reheat", str(world / "ckpt"), "--steps", "abc"):
             "Invalid value for '--steps'", ("reheat", str(world / "ckpt"), "--mode", "half"):
             "Invalid value for '--mode'", ("frobnicate",): "No such command 'frobnicate'"}
    for args, message in cases.items():
        p = subprocess.run([*PY, *args], capture_output=True, text=True, env=signals.env(), cwd=tmp_path)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("tsopsd: error: ") and message in lines[0], \
            (args, p.stderr)
        assert "│" not in p.stderr and "Traceback" not in p.stderr and p.stdout == ""
    assert not list(tmp_path.iterdir())


def test_a_run_that_trained_nothing_fails_and_writes_no_output(world, tmp_path):
    """The drift guard trips on step 2 and rolls back to the input: exit 1, one line, no OUT, nothing left."""
    before = tree_hash(world)
    out = tmp_path / "o"
    res = runner.invoke(app, reheat_args(world, out, "--lr", "1", "--steps", "3", "--set", "stop.min_top1_agreement=1"))
    line = one_line(res, ExitCode.NOTHING_TRAINED)
    assert "rolled back to the input weights" in line and "nothing was trained, so no output was written" in line
    assert not out.exists() and leftovers(out) == [] and tree_hash(world) == before


def test_weights_rewritten_while_read_are_refused(world, tmp_path, monkeypatch):
    """Another process rewrites the weights while they load: one line, not a model built from two files."""
    import transformers

    ck = copy_ckpt(world, tmp_path)
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def rewriting(cls, *args, **kwargs):
        out = real(cls, *args, **kwargs)
        weights = load_file(ck / "model.safetensors")
        save_file(weights, ck / "model.safetensors", metadata={"format": "pt"})  # a new file, same bytes: new inode
        return out

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(rewriting))
    res = runner.invoke(app, measure_args(ck, world / "prompts.jsonl"))
    assert "model.safetensors changed while it was read" in one_line(res)


@pytest.mark.parametrize("reader", ["main thread", "another thread, the main one waiting on it"])
def test_a_bus_error_from_a_truncated_mapped_file_is_one_line(tmp_path, reader):
    """A weights file truncated under a memory map raises SIGBUS, which Python cannot catch, in whichever thread
    reads it: the process that waits on the work says it in one line, exit 2."""
    f = tmp_path / "w.bin"
    f.write_bytes(b"\1" * 2**16)
    read = "sys.stdout.write(str(m[2**15]))"
    if reader != "main thread":
        read = f"import threading; t = threading.Thread(target=lambda: {read}); t.start(); t.join()"
    code = ("import mmap, os, sys; from tsopsd.runtime import supervise; supervise(); "
            f"fh = open({str(f)!r}, 'r+b'); m = mmap.mmap(fh.fileno(), 0); os.truncate({str(f)!r}, 0); {read}")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=signals.env(), timeout=60)
    assert p.returncode == 2 and p.stdout == "", (p.returncode, p.stderr)
    assert p.stderr.splitlines() == ["tsopsd: error: a memory-mapped file (checkpoint weights) was truncated or "
                                     "rewritten while it was read (bus error): rerun once the checkpoint is complete"]


def test_the_work_ends_as_the_command_ends(tmp_path):
    """The waiting process passes on the work's exit code, a signal sent to it, and a death by signal; a SIGKILL of
    the command takes the work with it."""
    ready = tmp_path / "ready"
    work = ("import os, signal, sys, time; from tsopsd.runtime import supervise; supervise(); "
            "signal.signal(signal.SIGTERM, lambda s, f: sys.exit(7)); "
            f"open({str(ready)!r}, 'w').write(str(os.getpid())); time.sleep(60)")

    def started():
        p = subprocess.Popen([sys.executable, "-c", work], env=signals.env(), start_new_session=True)
        deadline = time.monotonic() + 30
        while not ready.is_file() or not ready.read_text():
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.01)
        child = int(ready.read_text())
        ready.unlink()
        return p, child

    p, child = started()  # SIGTERM to the command: the work's handler runs, its code comes back
    assert child != p.pid
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(timeout=30) == 7
    p, child = started()  # the work killed by a signal: the command dies the same way
    os.kill(child, signal.SIGKILL)
    assert p.wait(timeout=30) == -signal.SIGKILL
    p, child = started()  # the command killed outright: the work goes too
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    deadline = time.monotonic() + 30
    while pid_alive(child):
        assert time.monotonic() < deadline, "the work outlived the command"
        time.sleep(0.01)


def test_a_c_locale_finishes_a_reheat_and_reads_non_ascii_paths(world, tmp_path):
    """LC_ALL=C without UTF-8 mode: the table (with its ‖) prints, and a checkpoint under a non-ASCII name loads."""
    env = {**signals.env(), "LC_ALL": "C", "PYTHONUTF8": "0"}
    ck = tmp_path / "prüfung"
    shutil.copytree(world / "ckpt", ck)
    p = subprocess.run([*PY, *reheat_args(world, tmp_path / "o", "--set", "output.eval_prompts=2", "--set",
                                          "output.eval_samples_per_prompt=1", "--steps", "1")],
                       capture_output=True, text=True, env=env, encoding="utf-8")
    assert p.returncode == ExitCode.GOAL_NOT_MET and "KL(model ‖ ref)" in p.stdout, p.stderr  # 1 step: not converged
    p = subprocess.run([*PY, *measure_args(ck, world / "prompts.jsonl", "--reference", world / "ckpt", "--json")],
                       capture_output=True, text=True, env=env, encoding="utf-8")
    assert p.returncode == 0 and json.loads(p.stdout)["metrics"]["reference"]["top1_agreement"] >= 0, p.stderr


def test_a_checkpoint_under_a_non_utf8_name_loads(world, tmp_path):
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/\xff"))
    shutil.copytree(world / "ckpt", folder / "ck")
    res = runner.invoke(app, measure_args(folder / "ck", world / "prompts.jsonl", "--json"))
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["metrics"]["tokens"] > 0


def test_an_empty_lock_left_by_a_killed_run_is_taken_over(world, tmp_path):
    (tmp_path / "o.tsopsd-lock").write_text("")
    res = runner.invoke(app, reheat_args(world, tmp_path / "o", "--steps", "1", quiet=False))
    assert res.exit_code == ExitCode.GOAL_NOT_MET, res.stderr  # 1 step: written, not converged
    assert squeeze("the lock file was empty or unreadable") in squeeze(res.stderr) and leftovers(tmp_path / "o") == []


@pytest.fixture(scope="module")
def adapter(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "ad"
    res = runner.invoke(app, reheat_args(world, out, "--save", "adapter", "--steps", "1"))
    assert res.exit_code == ExitCode.GOAL_NOT_MET, res.stderr  # 1 step: written, not converged
    return out


def test_merge_onto_another_base_says_so(world, adapter, tmp_path):
    other = copy_ckpt(world, tmp_path, "other")
    res = runner.invoke(app, ["merge", str(adapter), "--base", str(other), "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.stderr
    assert squeeze(f"--base {other} is not the adapter's own base") in squeeze(res.stderr)
    record = json.loads((tmp_path / "m" / "reheat_report.json").read_text())  # the record names the base it has now
    assert record["base_model"] == record["merged_onto"] == str(other.resolve())
    assert f"base_model: {other.resolve()}" in (tmp_path / "m" / "README.md").read_text()
    res = runner.invoke(app, ["merge", str(adapter), "--out", str(tmp_path / "m2")])
    assert res.exit_code == 0 and "own base" not in res.stderr
    assert "merged_onto" not in json.loads((tmp_path / "m2" / "reheat_report.json").read_text())


def test_dry_run_plans_an_adapter(world, adapter):
    res = runner.invoke(app, ["reheat", str(adapter), "--prompts", str(world / "prompts.jsonl"), "--out", "unused",
                              "--config", str(TINY), "--save", "merged", "--dry-run", "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["peak_bytes"] > 0


# ---- C and G: resume -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_run(world, tmp_path_factory):
    """A run interrupted after step 2 of 6 (state saved), with its checkpoint and prompts, all addressed
    relative to the folder (so a case works on a copy of the whole folder)."""
    root = tmp_path_factory.mktemp("saved")
    shutil.copytree(world / "ckpt", root / "ck")
    shutil.copy(world / "prompts.jsonl", root / "p.jsonl")
    r = signals.run_and_signal(resume_args()[:-1], when=lambda line: "step 2/6" in line, cwd=root)  # not --quiet
    assert r.signalled and r.returncode == 130 and (root / "o.tsopsd-run" / "state.json").is_file(), r.stderr
    return root


def resume_args(*extra):
    return ["reheat", "ck", "--prompts", "p.jsonl", "--out", "o", "--config", str(TINY), "--steps", "6", "--set",
            "output.eval_prompts=0", "--set", "output.save_every=0", "--set", "output.checkpoint_every=1",
            *map(str, extra), "--quiet"]


def _state(d: Path) -> dict:
    return json.loads((d / "o.tsopsd-run" / "state.json").read_text())


def _edit_state(d: Path, edit, *, reseal: bool = True) -> None:
    """Edit the saved state's values; `reseal` recomputes its seal as a forger who knows the format would (what is
    left to catch then is what disagrees with the config or the weights), else a plain edit by hand."""
    data = _state(d)
    edit(data["tree"])
    if reseal:
        data["seal"] = seal(data)
    (d / "o.tsopsd-run" / "state.json").write_text(json.dumps(data))


def _edit_tensors(d: Path, edit) -> None:
    path = _tensors_file(d)
    save_file(edit(load_file(path)), path)


def _swap_two_tensors(t: dict) -> dict:
    """Two tensors of one shape trade places: every value is a real one of this run, in the wrong place."""
    by_shape: dict = {}
    for k in sorted(t):
        by_shape.setdefault((t[k].dtype, tuple(t[k].shape)), []).append(k)
    a, b = next(ks for ks in by_shape.values() if len(ks) > 1 and not torch.equal(t[ks[0]], t[ks[1]]))[:2]
    return t | {a: t[b], b: t[a]}


def _swap_checkpoints(d: Path) -> None:
    one, two = (d / "o.tsopsd-run" / f"checkpoint-{n}" / "model.safetensors" for n in (1, 2))
    a, b = one.read_bytes(), two.read_bytes()
    one.write_bytes(b), two.write_bytes(a)


def _edit_metrics(d: Path) -> None:
    path = d / "o.tsopsd-run" / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r | {"train/tau": 9.0}) + "\n" for r in lines))


def _tensors_file(d: Path) -> Path:
    return d / "o.tsopsd-run" / _state(d)["tensors"]


def _drop_a_merge(d: Path) -> None:
    """The tokenizer changed: its last BPE merge removed (it still loads, and splits some words otherwise)."""
    tok = json.loads((d / "ck" / "tokenizer.json").read_text())
    tok["model"]["merges"] = tok["model"]["merges"][:-1]
    (d / "ck" / "tokenizer.json").write_text(json.dumps(tok))


RESUME = {  # name: (change the copy, extra flags, text of the one line)
    "tokenizer changed": (_drop_a_merge, (), "the input checkpoint changed since the run began (ck/tokenizer.json)"),
    "prompt file changed": (lambda d: (d / "p.jsonl").write_text((d / "p.jsonl").read_text() + '{"prompt": "sum 9 ="}\n'),
                            (), "the prompt file changed since the run began (p.jsonl)"),
    "--steps below the steps done": (lambda d: None, ("--steps", "1"), "the run has applied 2 steps already"),
    "step counter edited": (lambda d: _edit_state(d, lambda t: t.update(next_step=99)), ("--steps", "100"),
                            "says 99 steps were applied"),
    "state edited into garbage": (lambda d: (d / "o.tsopsd-run" / "state.json").write_text("{not json"), (),
                                  "is damaged or was not written by tsopsd"),
    "state empty": (lambda d: (d / "o.tsopsd-run" / "state.json").write_text(""), (), "is damaged"),
    "tensors truncated": (lambda d: _tensors_file(d).write_bytes(_tensors_file(d).read_bytes()[:100]), (),
                          "SHA-256 differs"),
    "optimizer missing": (lambda d: _edit_state(d, lambda t: t["trainable"].pop("optimizer")), (),
                          "is damaged (KeyError"),
    # the config is the only source of hyperparameters: a saved value that differs is named, never trained on
    "tau 1.2 -> 9": (lambda d: _edit_state(d, lambda t: t.update(tau=9.0)), (), "tau: saved 9.0, config 1.2"),
    "optimizer lr x500": (lambda d: _edit_state(d, lambda t: [g.update(lr=g["lr"] * 500) for g in
                                                             t["trainable"]["optimizer"]["param_groups"]]), (),
                          "optimizer lr: saved"),
    "base lr x500": (lambda d: _edit_state(d, lambda t: t["scheduler"].update(base_lrs=[1.0])), (),
                     "learning rate: saved [1.0], config 0.002"),
    "weight_decay": (lambda d: _edit_state(d, lambda t: t["trainable"]["optimizer"]["param_groups"][0].update(
        weight_decay=0.5)), (), "optimizer weight_decay: saved 0.5, config 0.0"),
    "betas": (lambda d: _edit_state(d, lambda t: t["trainable"]["optimizer"]["param_groups"][0].update(
        betas={"__tuple__": [0.5, 0.5]})), (), "optimizer betas: saved (0.5, 0.5)"),
    "a fixed tau switched to a target": (lambda d: _edit_state(d, lambda t: t.update(target=0.5)), (),
                                         "target entropy: saved 0.5"),
    "a failure that never happened": (lambda d: _edit_state(d, lambda t: t.update(failed=True)), (),
                                      "the run's outcome: stop reason None"),
    "a kept step mid-run": (lambda d: _edit_state(d, lambda t: t.update(kept_step=1)), (), "the run's outcome"),
    "pace factor x64": (lambda d: _edit_state(d, lambda t: t["stop"].update(lr_factor=64.0)), (),
                        "learning-rate factor: saved 64.0"),
    "a stop-rule value of the wrong element type": (lambda d: _edit_state(d, lambda t: t["stop"].update(
        window=[["a", 0.3]])), (), "the stop rules' window is out of form"),
    # what tsopsd wrote is sealed and hashed: an edit by hand, another file or a swapped checkpoint is refused
    "a before-entropy of 99, by hand": (lambda d: _edit_state(d, lambda t: t.update(before={"entropy": {"mean": 99.0}}),
                                                              reseal=False), (), "was altered after tsopsd wrote it"),
    "a value of the wrong element type, by hand": (lambda d: _edit_state(d, lambda t: t["stop"].update(
        window=[["a", 0.3]]), reseal=False), (), "was altered after tsopsd wrote it"),
    "a tensor +0.5": (lambda d: _edit_tensors(d, lambda t: {k: v + 0.5 if v.is_floating_point() else v
                                                            for k, v in t.items()}), (), "SHA-256 differs"),
    "tensors cast to bf16": (lambda d: _edit_tensors(d, lambda t: {k: v.bfloat16() if v.is_floating_point() else v
                                                                   for k, v in t.items()}), (), "SHA-256 differs"),
    "two tensors swapped": (lambda d: _edit_tensors(d, _swap_two_tensors), (), "SHA-256 differs"),
    "every train/tau in metrics.jsonl edited": (_edit_metrics, (), "metrics.jsonl is not what the run saved"),
    "a checkpoint's weights swapped": (_swap_checkpoints, (), "checkpoint-1 is not the checkpoint this run wrote"),
    "a checkpoint planted": (lambda d: shutil.copytree(d / "o.tsopsd-run" / "checkpoint-1", d / "o.tsopsd-run" /
                                                       "checkpoint-0"), (), "checkpoint-0 was not written by this run"),
}


@pytest.mark.parametrize("case", RESUME)
def test_resume_refuses_what_would_give_other_weights(saved_run, tmp_path, monkeypatch, case):
    change, extra, message = RESUME[case]
    d = tmp_path / "run"
    shutil.copytree(saved_run, d)
    change(d)
    monkeypatch.chdir(d)
    before = tree_hash(d)
    res = runner.invoke(app, resume_args("--resume", *extra))
    assert message in one_line(res), res.stderr
    assert tree_hash(d) == before  # nothing lost: the run folder is as it was, for --overwrite or a fix


def test_a_pickle_planted_in_the_run_folder_never_runs(saved_run, tmp_path, monkeypatch):
    import pickle

    marker = tmp_path / "pwned"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    d = tmp_path / "run"
    shutil.copytree(saved_run, d)
    payload = pickle.dumps(Planted())
    (d / "o.tsopsd-run" / "state.pt").write_bytes(payload)  # where the old format kept its state
    _tensors_file(d).write_bytes(payload)  # and as the tensors the state names
    monkeypatch.chdir(d)
    res = runner.invoke(app, resume_args("--resume"))
    assert "is not the tensor file tsopsd saved" in one_line(res)
    data = _state(d)  # a forger who also recomputes the hashes: the file is still read as safetensors only
    data["sha256"] = file_digest(_tensors_file(d))
    data["seal"] = seal(data)
    (d / "o.tsopsd-run" / "state.json").write_text(json.dumps(data))
    res = runner.invoke(app, resume_args("--resume"))
    assert "is damaged or was not written by tsopsd" in one_line(res)
    assert not marker.exists()


def test_a_resume_continues_to_the_uninterrupted_result(saved_run, tmp_path, monkeypatch):
    """The saved state (JSON + safetensors) resumes to the same weights as a run never interrupted, and its
    checkpoints along the way too: one written after the last save (here planted: checkpoint-5 holding step 2's
    weights) is written again as the run passes its step; one the user removed is left out of OUT."""
    d = tmp_path / "run"
    shutil.copytree(saved_run, d)
    run = d / "o.tsopsd-run"
    shutil.rmtree(run / "checkpoint-1")
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-5")
    monkeypatch.chdir(d)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the interrupted subprocess (OMP_NUM_THREADS=1): the same kernels
    try:
        res = runner.invoke(app, resume_args("--resume"))
        assert res.exit_code == ExitCode.GOAL_NOT_MET, res.stderr  # 6 steps: written, not converged
        res = runner.invoke(app, [a if a != "o" else "clean" for a in resume_args()])
        assert res.exit_code == ExitCode.GOAL_NOT_MET, res.stderr
    finally:
        torch.set_num_threads(threads)
    a, b = load_file(d / "o" / "model.safetensors"), load_file(d / "clean" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((d / "o" / "reheat_report.json").read_text())["steps_run"] == 6
    assert sorted(p.name for p in d.glob("o/checkpoint-*")) == [f"checkpoint-{n}" for n in range(2, 6)]
    assert json.loads((d / "o" / "reheat_report.json").read_text())["checkpoints"] == [f"checkpoint-{n}" for n in
                                                                                         range(2, 6)]
    for n in (2, 5):
        a, b = (load_file(d / o / f"checkpoint-{n}" / "model.safetensors") for o in ("o", "clean"))
        assert all(torch.equal(a[k], b[k]) for k in a), n
