"""Where a run begins: a fresh state (tau, or the target entropy it is solved for; the before-report) or a resumed
one, checked against what its weights, optimizer, scheduler and metric lines hold.

    run.state = resumed_state(run) if cfg.output.resume else fresh_state(run)
"""

from __future__ import annotations

import json
import logging
import uuid

import torch

from tsopsd.checkpoint import load_checkpoint
from tsopsd.config import save_config
from tsopsd.console import progress
from tsopsd.errors import TsopsdError
from tsopsd.intervals import describe
from tsopsd.metrics import measure
from tsopsd.run import Run, step_seed
from tsopsd.state import RunState, check_resumable, comparable, disagreements, make_run_dir

log = logging.getLogger(__name__)

TRACKING_START = 1.5  # tau where a target-entropy run's first solve starts


def fresh_state(run: Run) -> RunState:
    """A fresh state: tau (fixed, or the target entropy it will be solved for every step) and the before-report."""
    cfg, backend = run.cfg, run.backend
    run_id = backend.broadcast(uuid.uuid4().hex if backend.is_main else None)  # in the marker, state and report
    if backend.is_main:
        make_run_dir(run.run_dir, run_id)
    tau, source, target, measured = cfg.teacher.temperature, "temperature", cfg.teacher.target_entropy, None
    if cfg.teacher.target_entropy_from is not None:
        with run.timed("target measurement"):
            measured = backend.broadcast(backend.measure(lambda: _entropy_of(cfg.teacher.target_entropy_from, run)))
        target, source = measured["entropy"], f"target_entropy_from:{cfg.teacher.target_entropy_from}"
    elif target is not None:
        source = "target_entropy"
    if target is not None:
        tau = TRACKING_START  # where step 0's solve starts; every later one starts from the step before's tau
    run.announce("the before-report: measuring the input")
    with run.timed("before-report"):
        before = run.evaluate(bar="before-report")
    state = RunState(next_step=0, tau=tau, tau_source=source, target=target, target_measured=measured, run_id=run_id,
                     before=before,
                     world_size=backend.world_size, config=comparable(cfg), input_fingerprint=run.input_fingerprint)
    if backend.is_main:
        save_config(cfg, run.run_dir / "config.yaml")
        (run.run_dir / "metrics.jsonl").write_text("")
    backend.barrier()
    return state


def resumed_state(run: Run) -> RunState:
    """The saved state, after checking that it belongs to this run; restores weights, optimizer and rules."""
    cfg, backend = run.cfg, run.backend
    state = RunState.load(run.run_dir)
    check_resumable(state, run.run_dir, world_size=backend.world_size, config=comparable(cfg),
                    fingerprint=run.input_fingerprint, steps=cfg.train.steps)
    try:
        run.stop.last_good = backend.load_trainable(run.run_dir, state.trainable, run.policy, run.optimizer)
        run.stop.load_state_dict(state.stop)
        run.scheduler.load_state_dict(state.scheduler)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
        raise TsopsdError(f"cannot resume: the state in {run.run_dir} is damaged ({type(e).__name__}: {e}); rerun with "
                          "--overwrite to start over") from None
    state.trainable = None
    off = disagreements(state, cfg, run.stop, run.scheduler, run.optimizer)
    if off:
        raise TsopsdError(f"cannot resume: the state in {run.run_dir} disagrees with the config ({'; '.join(off)}): the "
                          "run folder was altered; rerun with --overwrite to start over")
    # metrics.jsonl and the checkpoints as this run wrote them; its lines as saved (a step after the save runs again)
    lines = state.check_files(run.run_dir).decode().splitlines() if backend.is_main else []
    metrics = run.run_dir / "metrics.jsonl"
    try:
        logged = [json.loads(line)["step"] for line in lines]
    except (ValueError, KeyError, TypeError):
        logged = None
    # The counters a resume trusts must agree with what the weights hold: the optimizer's own step count,
    # the scheduler's and the metric lines. An edited state file cannot make the report claim other steps.
    counts = {"the optimizer's step count": {int(v["step"]) for v in run.optimizer.state.values() if "step" in v}
              or {0}, "the scheduler's": {run.scheduler.last_epoch}}
    if backend.is_main:
        counts["metrics.jsonl's lines"] = {sum(1 for k in logged if k <= state.next_step)} if logged is not None else {-1}
    off = [name for name, found in counts.items() if found != {state.next_step}]
    if off or (state.kept_step is not None and not 0 <= state.kept_step <= state.next_step):
        raise TsopsdError(f"cannot resume: the state in {run.run_dir} says {state.next_step} steps were applied, but "
                          f"{', '.join(off) or 'its kept step'} disagree(s): the run folder was altered; rerun with "
                          "--overwrite to start over")
    if backend.is_main:  # drop the metric lines of steps that will run again
        metrics.write_text("".join(line + "\n" for line, k in zip(lines, logged) if k <= state.next_step))
        log.info("resuming %s at step %d of %d", run.run_dir, state.next_step + 1, cfg.train.steps)
    return state


def _entropy_of(path: str, run: Run) -> dict:
    """Mean token entropy of another checkpoint on its own rollouts, to `teacher.precision`: it is not trained, so
    every prompt (held-out first, then the training ones in a seeded order) is a pool that rounds draw from
    until the 95% interval is within +-precision (then more samples, up to 4x `output.eval_samples_per_prompt`).
    Returns {"entropy", "interval", "prompts", "samples", "precision"}."""
    cfg = run.cfg
    other = load_checkpoint(path, device=cfg.model.device, dtype=cfg.model.dtype)
    if other.tokenizer.get_vocab() != run.tokenizer.get_vocab():
        raise TsopsdError(f"--target-entropy-from {path}: its tokenizer differs from the checkpoint's")
    g = torch.Generator().manual_seed(step_seed(cfg.seed, -(10**6) - 2))
    pool = run.eval_prompts + [run.prompts[i] for i in torch.randperm(len(run.prompts), generator=g).tolist()]
    k = cfg.output.eval_samples_per_prompt
    with progress(run.shows_progress(run.show_progress)) as task:
        result = measure(other.model, other.tokenizer, pool, samples_per_prompt=k,
                         max_new_tokens=cfg.rollout.max_new_tokens, batch_size=cfg.rollout.batch_size,
                         score_batch=cfg.train.micro_batch, seed=cfg.seed, precision=cfg.teacher.precision,
                         first_prompts=max(len(run.eval_prompts), 32),
                         progress=lambda what, total: task(f"target entropy: {what}", total))
    h, interval = result["entropy"]["mean"], result["intervals"]["entropy"]
    log.info("target entropy from %s: %s nats, 95%% interval (%d prompts, %d samples; %s)", path,
             describe(h, interval), result["prompts"], result["samples"],
             result["precision"]["outcome"] or "one round: teacher.precision is 0")
    del other
    return {"entropy": h, "interval": interval, "prompts": result["prompts"], "samples": result["samples"],
            "precision": result["precision"]}
