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


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_reheat_a_model_in_memory(collapsed, tmp_path, mode):
    """`tsopsd.reheat(model, ...)` (issue 30, point 12): a 2-step reheat of a model in memory trains that object in
    place and hands it back as a plain model (the adapter merged in), frozen as it came, holding exactly the
    weights the same run on the checkpoint folder writes; with out= it writes that checkpoint too."""
    import torch

    import tsopsd

    ckpt, prompts = collapsed
    options = dict(config=TINY, overrides={"train.steps": 2, "output.eval_prompts": 2, "train.mode": mode,
                                           "output.save": "merged"})
    on_disk = tsopsd.reheat(ckpt, prompts, tmp_path / "from-folder", **options)
    ck = load_checkpoint(ckpt, device="cpu")
    model, cls = ck.model, type(ck.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.requires_grad_(False).lm_head.weight.requires_grad_(True)  # a caller's own flags: come back as they were
    texts = [json.loads(line)["prompt"] for line in Path(prompts).read_text().splitlines()]
    report = tsopsd.reheat(model, texts, tmp_path / "from-memory", tokenizer=ck.tokenizer, **options)
    assert type(model) is cls and report["steps_run"] == 2 and report["after_measured_on"] == "the model in memory"
    assert not any("lora" in k for k in model.state_dict())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["lm_head.weight"] and not model.training
    written = load_checkpoint(tmp_path / "from-folder", device="cpu").model.state_dict()
    changed = 0
    for name, value in model.state_dict().items():
        assert value.dtype == before[name].dtype
        torch.testing.assert_close(value, written[name], rtol=0, atol=0)  # the same run, to the bit
        changed += not torch.equal(value, before[name])
    assert changed > 0
    assert report["after"]["entropy"] == on_disk["after"]["entropy"] or mode == "lora"  # lora: measured pre-merge
    assert load_checkpoint(tmp_path / "from-memory", device="cpu").model.state_dict().keys() == written.keys()


def test_reheat_in_memory_writes_nothing_without_out(collapsed, tmp_path, monkeypatch):
    import tempfile

    import tsopsd

    ckpt, prompts = collapsed
    ck = load_checkpoint(ckpt, device="cpu")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    report = tsopsd.reheat(ck.model, prompts, tokenizer=ck.tokenizer, config=TINY,
                           overrides={"train.steps": 2, "output.eval_prompts": 2})
    assert report["output"] is None and report["steps_run"] == 2
    assert list(tmp_path.iterdir()) == []  # the run's scratch folder is gone
    with pytest.raises(TsopsdError, match="needs its tokenizer"):
        tsopsd.reheat(ck.model, prompts)
    with pytest.raises(TsopsdError, match="cannot resume"):
        tsopsd.reheat(ck.model, prompts, tokenizer=ck.tokenizer, config=TINY, overrides={"output.resume": True})


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("stop", ["ctrl-c", "nothing trained"])
def test_a_stopped_reheat_in_memory_hands_the_model_back_as_it_came(collapsed, interrupt_rollout, monkeypatch, mode,
                                                                    stop):
    """Ctrl-C after two updates, or a non-finite loss on the first step (no update kept), leaves the caller's
    model as it was: no adapter layers left in it, its weights and dtype the input's."""
    import torch

    import tsopsd
    from tsopsd.errors import TrainingStopped

    ckpt, prompts = collapsed
    ck = load_checkpoint(ckpt, device="cpu")
    model, cls = ck.model, type(ck.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if stop == "ctrl-c":
        interrupt_rollout(2)
    else:
        import tsopsd.loss as loss_mod

        real = loss_mod.divergence_and_grad
        monkeypatch.setattr(loss_mod, "divergence_and_grad", lambda logits, *a, **k: real(logits * float("nan"), *a, **k))
    with pytest.raises(KeyboardInterrupt if stop == "ctrl-c" else TrainingStopped):
        tsopsd.reheat(model, prompts, tokenizer=ck.tokenizer, config=TINY,
                      overrides={"train.steps": 4, "output.eval_prompts": 2, "train.mode": mode, "train.lr": 3e-4})
    assert type(model) is cls and model.state_dict().keys() == before.keys()
    for name, value in model.state_dict().items():
        assert value.dtype == before[name].dtype and torch.equal(value, before[name]), name
