"""The paths the large shipped configs take, on real tensors:

- the step-0 teacher check in chunks gives the full-logits float64 answer;
- full fine-tuning of a bf16 checkpoint keeps float32 master weights (updates that bf16 would lose land);
- activation checkpointing gives the same gradients;
- the rollback copy every N steps in full mode still restores the last copy that passed;
- the after-report is measured on the written checkpoint.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from tsopsd.batch import position_ids_from_mask, prediction_mask
from tsopsd.checkpoint import load_checkpoint
from tsopsd.config import load_config
from tsopsd.errors import TrainingStopped
from tsopsd.loop import reheat
from tsopsd.policy import enable_checkpointing, make_optimizer, prepare_policy
from tsopsd.prompts import load_prompts
from tsopsd.rollout import sample_rollouts
from tsopsd.run import hold_out
from tsopsd.scoring import Scorer
from tsopsd.step import train_step
from tsopsd.teacher import check_teacher


def _rollout(ckpt, prompts_file, n=3, k=2, new=24, seed=0):
    c = load_checkpoint(ckpt, device="cpu", dtype="float32")
    prompts = load_prompts(prompts_file, c.tokenizer)[:n]
    return c, sample_rollouts(c.model.eval(), c.tokenizer, prompts, samples_per_prompt=k, max_new_tokens=new, seed=seed)


@pytest.mark.parametrize("chunk", [5, 0])
def test_step0_check_in_chunks_equals_the_full_float64_reference(ckpt, prompts_file, chunk):
    c, rollout = _rollout(ckpt, prompts_file)
    tau = 1.7
    got = check_teacher(Scorer(c.model), rollout, tau, chunk_size=chunk)
    with torch.no_grad():  # the plain reference: all logits at once, float64
        z = c.model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                    position_ids=position_ids_from_mask(rollout.attention_mask)).logits[prediction_mask(rollout)].double()
    h = lambda t: float(-((z / t).log_softmax(-1).exp() * (z / t).log_softmax(-1)).sum(-1).mean())  # noqa: E731
    assert got["entropy_t1"] == pytest.approx(h(1.0), rel=1e-6)
    assert got["entropy_tau"] == pytest.approx(h(tau), rel=1e-6)


def _bf16_full_step(ckpt, prompts_file, lr):
    """One update of full fine-tuning on a bf16 copy of `ckpt`: (weights before, after) as float32."""
    c, rollout = _rollout(ckpt, prompts_file)
    model = c.model.to(torch.bfloat16)
    cfg = load_config(None, {"train.mode": "full", "train.lr": lr, "train.micro_batch": 4}, inputs=False)
    policy = prepare_policy(model, cfg.train)
    before = {n: p.detach().float().clone() for n, p in policy.student.named_parameters()}
    opt = make_optimizer(policy.trainable, lr=lr, weight_decay=0.0)
    train_step(policy, rollout, tau=1.5, cfg=cfg)
    touched = {n: p.grad != 0 for n, p in policy.student.named_parameters()}  # e.g. embeddings of unseen tokens: 0
    opt.step()
    return policy, before, {n: p.detach().float() for n, p in policy.student.named_parameters()}, touched


def test_full_training_of_a_bf16_checkpoint_keeps_float32_masters(ckpt, prompts_file):
    """At lr 2e-6 (configs/qwen3-8b-full-8gpu.yaml) an AdamW step moves each weight by ~lr, below bf16's
    resolution for most weights: plain bf16 parameters would not change; the float32 masters do, by lr."""
    lr = 2e-6
    policy, before, after, touched = _bf16_full_step(ckpt, prompts_file, lr)
    assert policy.compute_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in policy.trainable)
    assert next(policy.teacher.model.parameters()).dtype == torch.bfloat16  # the teacher is the input, exactly
    moved = torch.cat([(after[n] - before[n]).abs()[touched[n]] for n in before])
    # AdamW's first step moves every weight with a gradient by lr (|m / sqrt(v)| = 1): the masters keep it
    assert float((moved > 0.9 * lr).float().mean()) > 0.99
    assert float(moved.max()) < 1.05 * lr  # float32 spacing near |w| ~ 0.3 is 3e-8, 1.5% of lr
    # ...while rounding to bf16 would have kept most weights exactly where they were
    lost = torch.cat([(after[n].bfloat16() == before[n].bfloat16())[touched[n]] for n in before])
    assert float(lost.float().mean()) > 0.5


def test_bf16_compute_over_float32_masters_matches_float32_training(ckpt, prompts_file):
    """The update of a bf16 run (float32 masters, bf16 autocast) against the same step in float32: the
    same direction (cosine > 0.99) and size within 5%, the difference being bf16 arithmetic."""
    lr = 1e-3
    _, b16_before, b16_after, _ = _bf16_full_step(ckpt, prompts_file, lr)
    c, rollout = _rollout(ckpt, prompts_file)
    # the float32 reference starts from the same (bf16-rounded) weights
    model = c.model.to(torch.bfloat16).float()
    cfg = load_config(None, {"train.mode": "full", "train.lr": lr, "train.micro_batch": 4}, inputs=False)
    policy = prepare_policy(model, cfg.train)
    assert policy.compute_dtype is None
    before = {n: p.detach().clone() for n, p in policy.student.named_parameters()}
    opt = make_optimizer(policy.trainable, lr=lr, weight_decay=0.0)
    train_step(policy, rollout, tau=1.5, cfg=cfg)
    opt.step()
    d32 = torch.cat([(p.detach() - before[n]).flatten() for n, p in policy.student.named_parameters()])
    d16 = torch.cat([(b16_after[n] - b16_before[n]).flatten() for n in b16_before])
    cos = float(torch.nn.functional.cosine_similarity(d32, d16, dim=0))
    assert cos > 0.99, cos
    assert float(d16.norm() / d32.norm()) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_activation_checkpointing_gives_the_same_gradients(ckpt, prompts_file, mode):
    grads = []
    for on in (False, True):
        c, rollout = _rollout(ckpt, prompts_file)
        cfg = load_config(None, {"train.mode": mode, "train.micro_batch": 2}, inputs=False)
        torch.manual_seed(0)
        policy = prepare_policy(c.model, cfg.train)
        if on:
            enable_checkpointing(policy)
        train_step(policy, rollout, tau=1.5, cfg=cfg)
        grads.append(torch.cat([p.grad.flatten() for p in policy.trainable if p.grad is not None]))
        assert all(not m.training for m in policy.student.modules() if type(m).__name__.endswith("Dropout"))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def _run(tmp_path, ckpt, prompts_file, name, **over):
    overrides = {"model.path": str(ckpt), "data.prompts": str(prompts_file), "output.out": str(tmp_path / name),
                 "rollout.max_new_tokens": 12, "rollout.prompts_per_step": 2, "rollout.samples_per_prompt": 2,
                 "output.eval_prompts": 1, "output.save_every": 0, **over}
    return reheat(load_config(None, overrides), show_progress=False)


def test_full_mode_rollback_every_n_steps_restores_the_last_copy(tmp_path, ckpt, prompts_file):
    """Full mode copies the weights every `stop.rollback_every` steps; a drift stop restores that copy."""
    with pytest.raises(TrainingStopped) as stopped:  # a guard stopped the run: exit 1, the last copy written
        _run(tmp_path, ckpt, prompts_file, "out", **{
            "train.mode": "full", "train.lr": 0.0001, "train.steps": 12, "stop.rollback_every": 3,
            "train.max_lr_factor": 1, "stop.entropy_tolerance": 0,  # a fixed lr; never converged
            "stop.min_top1_agreement": 0.8, "stop.window": 2})  # pooled over 2 steps: trips after the copy at step 3
    report = stopped.value.report  # None when it rolled back to the input: that run wrote nothing
    assert report["stop_reason"].startswith("drift guard"), report["stop_reason"]
    tripped = int(re.search(r"tokens of steps? (?:\d+-)?(\d+);", report["stop_reason"])[1])  # 1-based
    assert report["weights_after_step"] == 3 * ((tripped - 2) // 3) > 0, report  # the newest copy: steps 0, 3, 6...
    assert "rolled back to" in report["stop_reason"]


def test_after_report_measures_the_written_checkpoint(tmp_path, ckpt, prompts_file):
    """bf16 input, full mode: the student trains in float32; the output is bf16. The report's after
    numbers are those of the folder written, measured again from disk the way the report measures."""
    bf16 = tmp_path / "bf16"
    c = load_checkpoint(ckpt, device="cpu", dtype="float32")
    c.model.to(torch.bfloat16).save_pretrained(bf16)
    c.tokenizer.save_pretrained(bf16)
    report = _run(tmp_path, bf16, prompts_file, "out", **{"train.mode": "full", "train.lr": 3e-3, "train.steps": 3,
                                                          "model.dtype": "bfloat16", "stop.min_top1_agreement": 0.0})
    assert report["after_measured_on"] == "the written checkpoint"
    out = load_checkpoint(tmp_path / "out", device="cpu", dtype="bfloat16")
    assert next(out.model.parameters()).dtype == torch.bfloat16
    from tsopsd.metrics import measure

    prompts = load_prompts(prompts_file, out.tokenizer)
    _, held = hold_out(prompts, 1, 0)
    reference = load_checkpoint(bf16, device="cpu", dtype="bfloat16").model
    again = measure(out.model, out.tokenizer, held, reference=reference, samples_per_prompt=4, max_new_tokens=12,
                    batch_size=32, score_batch=8, seed=0)  # the run's rollout batch and training micro-batch
    assert report["after"]["entropy"]["mean"] == pytest.approx(again["entropy"]["mean"], rel=1e-6)
    assert report["after"]["reference"]["top1_agreement"] == pytest.approx(again["reference"]["top1_agreement"])
    saved = json.loads((tmp_path / "out" / "reheat_report.json").read_text())
    assert math.isclose(saved["after"]["entropy"]["mean"], report["after"]["entropy"]["mean"])
