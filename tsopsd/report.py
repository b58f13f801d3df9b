"""The run's report: what `finish` writes beside the output in `reheat_report.json`, piece by piece.

    step_times(metrics_rows)                       # median step and phase seconds, device peaks
    planned_step(cfg, config_dir, device, world_size)  # `tsopsd plan` of the run's step for its GPU, or None
    against_target(state, stop, after, after_training)
    what_to_change(stop_reason)                    # the advice of a run that trained nothing
    assemble(run, status=..., goal=..., after=..., ...)  # all of it, as `finish` writes it
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from tsopsd.config import Config
from tsopsd.output import versions
from tsopsd.run import Run
from tsopsd.state import RunState

log = logging.getLogger(__name__)


def step_times(rows: list[dict]) -> dict:
    """Median seconds a step and per phase, and the largest per-step device peaks (a GPU's), from metrics.jsonl's
    `rows`."""
    if not rows:
        return {}

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    phases = sorted({k.removeprefix("time/") for r in rows for k in r if k.startswith("time/")})
    out = {"steps": len(rows), "step_seconds_median": median([r["train/seconds"] for r in rows]),
           "phase_seconds_median": {p: median([r.get(f"time/{p}", 0.0) for r in rows]) for p in phases}}
    for name in ("peak_allocated", "peak_reserved"):
        values = [r[f"memory/{name}"] for r in rows if f"memory/{name}" in r]
        if values:
            out[f"{name}_bytes"] = max(values)
    return out


def planned_step(cfg: Config, config_dir: Path | None, device: torch.device, world_size: int) -> dict | None:
    """On a GPU, `tsopsd plan` of this run's step for this device, to stand beside what was measured."""
    if device.type != "cuda" or config_dir is None:
        return None
    import warnings

    from tsopsd.plan import plan, this_machine

    log.info("planning this run's step for the report, to set beside the measured one (tens of seconds at 4B)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = plan(cfg, config_dir, this_machine(device, world_size))
    except Exception as e:  # noqa: BLE001 - the run is done: a plan that fails must not fail it
        log.warning("could not plan this run for the report: %s: %s", type(e).__name__, e)
        return None
    return {k: r[k] for k in ("peak_bytes", "peak_phase", "reserved_bytes", "fits", "step_roofline_s",
                              "step_estimate_s", "estimate_calibrated_on", "gpu_flops", "gpu_bandwidth")}


def against_target(state: RunState, stop, after: dict | None, after_training: dict | None) -> dict | None:
    """The target against the entropy before and after, each with its 95% interval: on the held-out prompts
    (what the target is for) and, after, on as many training prompts (where the run trained). None without a
    target."""
    target = state.target
    if target is None:
        return None
    out: dict = {"entropy": target, "measured": state.target_measured, "steered": stop.steering,
                 "training_target": stop.target,
                 "heldout_over_training": math.exp(stop.log_ratio) if stop.log_ratio is not None else None}
    for name, r in (("before", state.before), ("after", after), ("after_training_prompts", after_training)):
        if r is not None:
            h = r["entropy"]["mean"]
            out[name] = {"entropy": h, "interval": r["intervals"]["entropy"], "relative_error": (h - target) / target,
                         "prompts": r["prompts"], "samples": r["samples"]}
    return out


def what_to_change(reason: str) -> str:
    if reason.startswith("drift"):
        return "lower train.lr or the teacher temperature, or lower stop.min_top1_agreement"
    if reason.startswith("non-finite"):
        return "lower train.lr, or use --dtype float32"
    return "the input already meets the stop rule: raise the target entropy or the teacher temperature"


def assemble(run: Run, *, status: str, goal: dict, after: dict | None, after_training: dict | None, measured_on: str,
             steps: list[dict]) -> dict:
    """`reheat_report.json`: the run's outcome (`status`, `goal`), its input and output, the teacher's tau, the
    before/after measurements, how the run stopped, its times against its plan, and the versions that made it."""
    cfg, state, backend, policy = run.cfg, run.state, run.backend, run.policy
    return {
        "status": status, "goal": goal, "run_id": state.run_id,
        "pace": {"max_lr_factor": cfg.train.max_lr_factor, "lr_factor": run.stop.lr_factor, "raised": run.stop.paced},
        "input": str(cfg.model.path), "output": str(cfg.output.out) if run.writes_output else None,
        "mode": cfg.train.mode, "input_resolved": None if run.in_memory else str(Path(cfg.model.path).resolve()),
        "input_fingerprint": run.input_fingerprint,
        "save": cfg.output.save, "teacher_temperature": state.tau, "teacher_temperature_source": state.tau_source,
        "target_entropy": state.target, "teacher_temperature_over_run": [m["train/tau"] for m in steps],
        "target": against_target(state, run.stop, after, after_training), "divergence": cfg.loss.divergence,
        "steps_run": state.next_step, "steps_requested": cfg.train.steps, "weights_after_step": state.kept_step,
        "stop_reason": state.stop_reason, "eval_prompts": len(run.eval_prompts), "before": state.before,
        "after": after, "after_measured_on": measured_on, "after_training_prompts": after_training,
        "effective_temperature": (after or {}).get("reference", {}).get("effective_temperature"),
        "device": str(policy.teacher.device), "dtype": str(run.dtype).removeprefix("torch."),
        "seconds": time.monotonic() - run.started, "method": cfg.teacher.method, "closed_form": run.closed_form,
        "rollout_compile": run.rollout_compile, "phase_seconds": dict(run.phase_seconds),
        "measured": step_times(steps), "planned": planned_step(cfg, run.config_dir, backend.device, backend.world_size),
        "checkpoints": sorted(state.checkpoints, key=lambda name: int(name.split("-")[1])),
        "versions": versions(),
    }
