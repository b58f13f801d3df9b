"""Shared fixtures: tiny checkpoints of real architectures, built offline once per session."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from tsopsd.lab.tiny import build_checkpoint, build_tokenizer

ARCHS = ("gpt2", "llama", "qwen2", "qwen3")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory, tokenizer_dir):
    """{arch: folder} of random 2-layer models, sharpened (x8) so they are not near-uniform."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for i, arch in enumerate(ARCHS):
        build_checkpoint(root / arch, arch=arch, seed=i, sharpen=8.0, tokenizer=tok)
        out[arch] = root / arch
    return out


@pytest.fixture
def compile_state(monkeypatch):
    """decode.COMPILE as it was, after the test (a step turned off stays off for the process otherwise)."""
    from tsopsd import decode

    for key, value in list(decode.COMPILE.items()):
        monkeypatch.setitem(decode.COMPILE, key, value)
    monkeypatch.setattr(decode, "_broken", [])
    return decode.COMPILE


@pytest.fixture(scope="session")
def ckpt(ckpts):
    return ckpts["qwen3"]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"prompt": "the cat sat on"}\n'
        '{"messages": [{"role": "user", "content": "give me a number"}]}\n'
        '{"prompt": "one two three four five six seven"}\n'
    )
    return path


@pytest.fixture(scope="session")
def collapsed(tmp_path_factory):
    """A small model trained on one answer per prompt of the toy task: accurate and low-entropy."""
    from tsopsd.lab.sumtask import build_collapsed_checkpoint, write_prompts

    root = tmp_path_factory.mktemp("collapsed")
    build_collapsed_checkpoint(root / "ckpt", steps=150)
    return root / "ckpt", write_prompts(root / "prompts.jsonl")


@pytest.fixture(scope="module")
def world(collapsed, tmp_path_factory):
    """A private copy, per test module, of the collapsed checkpoint and its prompts (cases break copies)."""
    root = tmp_path_factory.mktemp("faults")
    shutil.copytree(collapsed[0], root / "ckpt")
    shutil.copy(collapsed[1], root / "prompts.jsonl")
    return root


@pytest.fixture
def interrupt_rollout(monkeypatch):
    """``interrupt_rollout(step) -> fired``: the first rollout of `step` (0-based) raises KeyboardInterrupt, as a
    Ctrl-C there would; `fired` lists the steps it fired at."""
    from tsopsd.run import Run

    def arm(step: int) -> list[int]:
        original, fired = Run.rollout, []

        def rollout(self, at):
            if at == step and not fired:
                fired.append(at)
                raise KeyboardInterrupt
            return original(self, at)

        monkeypatch.setattr(Run, "rollout", rollout)
        return fired
    return arm


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """`run_demo(quick=True)` once per session: (its folder, its summary)."""
    from tsopsd.lab.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, quick=True, show_progress=False)


def pytest_configure(config):
    # Reports that tests write for the end of the run (the fault-injection table): one file that the
    # xdist workers, which inherit this environment, append to and the main process prints.
    if "TSOPSD_TEST_REPORT" not in os.environ:
        fd, path = tempfile.mkstemp(prefix="tsopsd-test-report-", suffix=".txt")
        os.close(fd)
        os.environ["TSOPSD_TEST_REPORT"] = path


def pytest_terminal_summary(terminalreporter, config):
    """The fault-injection report (tests/test_bad_input_and_signals.py), whatever the outcome; in the main process only."""
    if hasattr(config, "workerinput"):
        return
    path = Path(os.environ["TSOPSD_TEST_REPORT"])
    text = path.read_text() if path.exists() else ""
    path.unlink(missing_ok=True)
    if text:
        terminalreporter.write_sep("-", "fault injection report")
        for line in text.splitlines():
            terminalreporter.write_line(line)
