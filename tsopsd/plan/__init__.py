"""`tsopsd plan`: will a reheat run fit its GPUs, and how long can a step take, without a GPU.

    tsopsd plan qwen3-4b/config.json --config configs/qwen3-4b-1gpu.yaml --gpus 1 --gpu-memory 80GB

How: the model is built from `config.json` alone (no weights) on *fake tensors* (PyTorch's
`FakeTensorMode`: every tensor has its shape, dtype and device but no memory), and the functions
`reheat` runs are called on them for one worst-case step, each completion `max_new_tokens` long:

    load       student, teacher (LoRA: the same module, adapter off; full: a frozen copy), prepare/shard
    rollout    `sample_rollouts` on one rollout batch: prefill, then decoding (KV cache at full length)
    check      step 0's `check_teacher` on the whole step's rollout
    train      `train_step` (teacher and student passes per micro-batch, the chunked loss, backward)
    update     gradient reduction, clipping, the rollback snapshot and the optimizer step (its state)
    report     `score_rollout` of the before/after report on one report batch, against the teacher
    save       what `finish` builds to write the output (merged and cast)

A dispatch mode below them counts the bytes of every live storage, by category (weights, optimizer
state, gradients, activations saved for backward, KV cache, logits chunks, temporaries) and keeps
each phase's peak; data-parallel and FSDP plans run under a fake process group of `--gpus` ranks
(rank 0's view; every rank holds the same amount). Decoding is run for a few steps and extrapolated
linearly to `max_new_tokens` from what each step added; micro-batches and rollout batches after the
first two are alike and are counted, not run (the report's scoring too: its other micro-batches add
only their hidden states). FLOPs (matmuls and attention, from
`torch.utils.flop_counter`) and bytes read and written (every op's inputs and outputs; an in-place
indexed write, the elements it writes) give a roofline
time: per op the larger of FLOPs / peak FLOP/s and bytes / bandwidth. That is a lower bound on a
step's time, not a measurement; kernels that fuse or overlap move it, launches and Python add to it.

Values that the code reads from tensors (`bool(...)`, `float(...)`) cannot come from fake tensors:
small integer and boolean tensors (ids, masks, positions) are computed for real alongside their fake
twins, so masks and counts are exact; anything read from model outputs is treated as the worst case
(no sequence ends early, every value finite).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from tsopsd.config import Config
from tsopsd.plan.advice import advice
from tsopsd.plan.hardware import CALIBRATED_ON, RESERVED_BYTES, RESERVED_RATIO, STEP_EFFICIENCY, GiB, Hardware, parse_bytes, this_machine
from tsopsd.plan.replay import DECODE_PROBE, _plan_once, _Tokenizer, _verdict, load_model_config, meta_model, worst_case_rollout
from tsopsd.plan.tracker import ANSWERED, CATEGORIES, PHASES, PhaseRecord, Tracker

__all__ = ["ANSWERED", "CALIBRATED_ON", "CATEGORIES", "DECODE_PROBE", "PHASES", "RESERVED_BYTES", "RESERVED_RATIO",
           "STEP_EFFICIENCY", "GiB", "Hardware", "PhaseRecord", "Tracker", "_Tokenizer", "activations_need_checkpointing",
           "advice", "load_model_config", "meta_model", "parse_bytes", "plan", "this_machine", "worst_case_rollout"]


def plan(cfg: Config, source: str | Path, hardware: Hardware = Hardware(), *, prompt_tokens: int | None = None,
         on_phase: Callable[[str], None] | None = None) -> dict:
    """Plan one worst-case reheat step of `cfg` for the model whose config is at `source`.

    Args:
        source: a checkpoint folder or a `config.json` (only the config is read).
        prompt_tokens: prompt length to plan for (default: `data.max_prompt_tokens`, else 512).
        on_phase: called with each phase's name as planning it begins (a 4B model takes ~a minute).

    Returns:
        A JSON-ready dict: per phase the device peak and its breakdown, host bytes, FLOPs, bytes and
        roofline seconds; the step's peak, whether it fits and what would make it fit.
    """
    model_config = load_model_config(source)
    choice = cfg.train.activation_checkpointing
    checkpointing = choice == "true"
    result = _plan_once(cfg, model_config, hardware, prompt_tokens, checkpointing=checkpointing, on_phase=on_phase)
    why = f"train.activation_checkpointing: {choice}"
    if choice == "auto" and not result["fits"] and result["peak_phase"] == "train":
        without = result["phases"]["train"]["peak_bytes"]
        # Only the train phase changes: plan it again with checkpointing and take the verdict anew.
        # (after a rollout: a compiled decode step keeps its cache and copies through the train phase)
        again = _plan_once(cfg, model_config, hardware, prompt_tokens, checkpointing=True,
                           phases=("rollout", "train"), on_phase=on_phase)
        result["phases"]["train"] = again["phases"]["train"]
        result.update(_verdict(result["phases"], hardware, heldout_s=result["heldout_roofline_s"]))
        checkpointing = True
        why = f"auto: on, since without it the train phase needs {without / GiB:.1f} GiB"
    elif choice == "auto":
        why = "auto: off, activations fit"
    result.update(source=str(source), activation_checkpointing=checkpointing, activation_checkpointing_why=why)
    result["advice"] = advice(cfg, result)
    return result


def activations_need_checkpointing(cfg: Config, model_config, *, free_bytes: int, later_bytes: int) -> bool:
    """`train.activation_checkpointing: auto` at the start of a run: would one micro-batch's activations
    (and its logits chunks), as the plan counts them, not fit in the device memory left once the
    gradients and optimizer state (`later_bytes`) are there? Planned on one device: activations do not
    depend on how weights are sharded."""
    single = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, parallel="ddp"))
    # after a rollout, as a step runs: a compiled decode step keeps its cache and weight copies between rollouts
    result = _plan_once(single, model_config, Hardware(gpus=1), None, checkpointing=False,
                        phases=("rollout", "train"))
    breakdown = result["phases"]["train"]["breakdown"]
    need = sum(breakdown.get(c, 0) for c in ("activations", "logits chunks", "temporaries", "kv cache"))
    return need > free_bytes - later_bytes - RESERVED_BYTES


