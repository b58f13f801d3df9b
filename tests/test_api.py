"""The Python API (issue 30): a reheat on paths and a measurement of a model in memory, without the CLI."""

import json
from pathlib import Path

import pytest

from tsopsd.api import measure_entropy, reheat
from tsopsd.checkpoint import load_checkpoint
from tsopsd.errors import TsopsdError

TINY = Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml"


def test_reheat_and_measure_from_python(collapsed, tmp_path):
    ckpt, prompts = collapsed
    report = reheat(ckpt, prompts, tmp_path / "o", config=TINY,
                    overrides={"train.steps": 2, "output.eval_prompts": 2})
    assert report["steps_run"] == 2  # the report OUT holds (JSON: tuples come back as lists)
    assert json.loads(json.dumps(report)) == json.loads((tmp_path / "o" / "reheat_report.json").read_text())
    on_disk = measure_entropy(tmp_path / "o", prompts, samples_per_prompt=2, max_new_tokens=8, precision=0)
    ck = load_checkpoint(tmp_path / "o", device="cpu")
    texts = [json.loads(line)["prompt"] for line in Path(prompts).read_text().splitlines()]
    in_memory = measure_entropy(ck.model, texts, tokenizer=ck.tokenizer, samples_per_prompt=2, max_new_tokens=8,
                                precision=0)
    assert in_memory["entropy"] == on_disk["metrics"]["entropy"]  # the same model, prompts and draws
    with pytest.raises(TsopsdError, match="needs its tokenizer"):
        measure_entropy(ck.model, texts)
