"""`tsopsd reheat`: the main job, and what it says when it ends (the report, the exit code, the hand-off).

    tsopsd reheat ckpt/ --prompts prompts.jsonl --out reheated/ --temperature 1.5
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer

from tsopsd.cli.frame import Ckpt, emit, fail, run_body
from tsopsd.cli.options import (
    INPUTS,
    OUTPUT,
    RUN,
    TEACHER,
    Beta,
    ConfigFile,
    DebugOpt,
    DeviceOpt,
    DivergenceOpt,
    DtypeOpt,
    JsonOpt,
    Lr,
    MethodOpt,
    ModeOpt,
    NewTokens,
    ParallelOpt,
    PerStep,
    QuietOpt,
    Samples,
    SaveOpt,
    SeedOpt,
    SetOpt,
    Steps,
    TargetEntropy,
    TargetFrom,
    Temperature,
    _opt,
    overrides_from,
)
from tsopsd.cli.plan import plan_and_print
from tsopsd.errors import ExitCode, TrainingStopped
from tsopsd.runtime import ignore_signals, restore_signals


def reheat(
    ckpt: Ckpt,
    prompts: Annotated[Optional[Path], _opt("--prompts", "-p", panel=INPUTS,
                                            extra=" Required (a --resume reads the saved run's).")] = None,
    out: Annotated[Optional[Path], _opt("--out", "-o", panel=OUTPUT, extra=" Required.")] = None,
    config: ConfigFile = None,
    temperature: Temperature = None,
    target_entropy: TargetEntropy = None,
    target_entropy_from: TargetFrom = None,
    method: MethodOpt = None,
    mode: ModeOpt = None,
    save: SaveOpt = None,
    parallel: ParallelOpt = None,
    divergence: DivergenceOpt = None,
    beta: Beta = None,
    steps: Steps = None,
    prompts_per_step: PerStep = None,
    samples_per_prompt: Samples = None,
    max_new_tokens: NewTokens = None,
    lr: Lr = None,
    eval_prompts: Annotated[Optional[Path], _opt("--eval-prompts", panel=INPUTS)] = None,
    precision: Annotated[Optional[float], _opt("--precision", panel=TEACHER)] = None,
    checkpoint_every: Annotated[Optional[int], _opt("--checkpoint-every", panel=OUTPUT)] = None,
    resume: Annotated[bool, _opt("--resume", panel=RUN, extra=" Its saved config: no other flag needed.")] = False,
    overwrite: Annotated[bool, _opt("--overwrite", panel=OUTPUT)] = False,
    dry_run: Annotated[bool, _opt("--dry-run", panel=RUN, help="Print this run's plan (tsopsd plan) on the device it "
                                                               "would use (one GPU a rank, or the CPU); exit.")] = False,
    seed: SeedOpt = None,
    base: Annotated[Optional[Path], _opt("--base", panel=INPUTS)] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    set_: SetOpt = None,
    report_to: Annotated[Optional[str], _opt("--report-to", panel=OUTPUT,
                                             extra=" Written under OUT.logs/ (output.logging_dir).")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Reheat a checkpoint: on-policy self-distillation toward its own temperature-scaled logits."""
    def body() -> None:
        from tsopsd import console
        from tsopsd.config import load_config
        from tsopsd.parallel import launched_rank

        rank = launched_rank()  # under torchrun only rank 0 talks
        console.setup_logging(quiet=quiet or rank != 0)
        overrides = overrides_from(ckpt, dict(
            prompts=prompts, out=out, base=base, device=device, dtype=dtype, mode=mode, save=save, parallel=parallel,
            method=method, divergence=divergence, beta=beta, steps=steps, prompts_per_step=prompts_per_step,
            samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens, lr=lr, seed=seed,
            eval_prompts=eval_prompts, precision=precision, resume=resume, overwrite=overwrite, report_to=report_to,
            checkpoint_every=checkpoint_every, temperature=temperature, target_entropy=target_entropy,
            target_entropy_from=target_entropy_from), set_)
        if dry_run:  # under torchrun every rank would plan the same: rank 0 does, alone
            if rank != 0:
                return
            cfg = load_config(config, overrides, inputs=False)
            gpus = int(os.environ.get("WORLD_SIZE", "1"))  # the run's own device, dtype and memory, as it would run
            if cfg.data.prompts and cfg.output.out:  # a dry run refuses what the run refuses, before planning
                from tsopsd.preflight import check_run

                check_run(load_config(config, overrides), gpus, dry_run=True)
            from tsopsd.checkpoint import resolve_device
            from tsopsd.plan import this_machine

            plan_and_print(cfg, ckpt, this_machine(resolve_device(cfg.model.device), gpus), as_json=as_json)
            return
        from tsopsd.config import shipped_config
        from tsopsd.loop import reheat as run_reheat

        if resume and not overwrite:  # a saved config from a run begun with --overwrite resumes, it does not restart
            overrides.setdefault("output.overwrite", False)
        source = _saved_config(config, out, resume)
        cfg = load_config(source, overrides)
        started = time.time()
        try:
            report = run_reheat(cfg, show_progress=not quiet, config_file=shipped_config(source) if source else None)
            shield = ignore_signals()  # OUT is written: a signal from here on changes nothing (its own exit code)
        except TrainingStopped as e:  # a guard stop wrote OUT: its report is still the one object on stdout
            if e.report and rank == 0:
                _show_reheat(e.report, as_json=as_json)
            raise
        except KeyboardInterrupt:
            if debug:
                traceback.print_exc()
            raise _interrupted(Path(cfg.output.out), started, as_json=as_json) from None
        try:
            # Free the run's models now: under torchrun their reference cycles (FSDP state, hooks) can keep
            # process-group objects alive into interpreter shutdown, a known place for gloo to abort.
            gc.collect()
            if rank != 0:
                return
            _show_reheat(report, as_json=as_json)
            if report["status"] != "met":  # OUT is written, but it is not what was asked for: no hand-off
                raise fail(f"goal not met ({report['goal']['evidence']}); {report['output']} is written, but "
                            f"{report['goal']['advice']}", ExitCode.GOAL_NOT_MET)
            if not as_json:  # beneath the table: what to run next with this OUT
                sys.stdout.write("\n".join(hand_off(report)) + "\n")
        finally:
            restore_signals(shield)

    run_body(body, debug=debug)


def _saved_config(config: Optional[Path], out: Optional[Path], resume: bool) -> Optional[Path]:
    """`--resume` without `--config`: the saved run's config.yaml, so no flag needs retyping (flags given still
    override it, and a resume then names any that differs from the run)."""
    if config is not None or not resume or out is None:
        return config
    from tsopsd.state import run_dir_for

    saved = run_dir_for(Path(out)) / "config.yaml"
    return saved if saved.is_file() else None


def _interrupted(out: Path, started: float, *, as_json: bool) -> typer.Exit:
    """A reheat's Ctrl-C or SIGTERM, said as it landed: state saved (130, --resume), nothing saved yet (130, rerun),
    or after OUT was written (its report, and the exit code of its outcome)."""
    from tsopsd.state import STATE_FILE, run_dir_for

    run_dir, written = run_dir_for(out), out / "reheat_report.json"
    if (run_dir / STATE_FILE).is_file():
        return fail(f"interrupted: state saved in {run_dir}; continue with --resume", ExitCode.INTERRUPTED)
    if written.is_file() and written.stat().st_mtime >= started:  # this run wrote OUT before the signal landed
        report = json.loads(written.read_text())
        _show_reheat(report, as_json=as_json)
        said = f"interrupted after {out} was written: it is complete (status {report.get('status')})"
        if report.get("status") == "met":  # done: the signal changed nothing
            logging.getLogger("tsopsd").warning(said)
            return typer.Exit(ExitCode.DONE)
        return fail(said, ExitCode.GUARD_STOP if report.get("status") == "guard_stop" else ExitCode.GOAL_NOT_MET)
    return fail("interrupted before any state was saved: nothing to resume; rerun", ExitCode.INTERRUPTED)


def _show_reheat(report: dict, *, as_json: bool) -> None:
    """The run's report: one JSON object on stdout, or the before/after table."""
    from tsopsd.output import teacher_line
    from tsopsd.tables import metrics_table

    columns = {"before": report["before"], "after": report["after"]} if report["before"] else {}
    if columns and report.get("after_training_prompts"):
        columns["after, training prompts"] = report["after_training_prompts"]
    emit(report, as_json=as_json, out=None,
          table=lambda: metrics_table(columns, target=report["target_entropy"],
                                      title=f"tsopsd reheat: {teacher_line(report, 3)}, {report['steps_run']} steps, "
                                            f"{report['stop_reason']}; {report['status'].replace('_', ' ')}; "
                                            "held-out prompts"))


def hand_off(report: dict) -> list[str]:
    """What to run next with the written OUT: continuing RL from it (verl, TRL, vLLM), sampling at T=1."""
    out = os.path.abspath(report["output"])
    if report["save"] == "adapter":
        merged = out.rstrip("/") + "-merged"
        return [f"next: {out} is a PEFT adapter; merge it for RL frameworks that load one folder:",
                f"  tsopsd merge {out} --out {merged}",
                f"  verl: actor_rollout_ref.model.path={merged}   TRL/transformers: from_pretrained('{merged}')",
                f"  vLLM without merging: vllm serve BASE --enable-lora --lora-modules reheated={out}",
                "  sample at temperature 1.0: the entropy is in the weights now, not in the sampler"]
    return [f"next: continue RL from {out}",
            f"  verl: actor_rollout_ref.model.path={out}   TRL/transformers: from_pretrained('{out}')",
            f"  vLLM: vllm serve {out}",
            "  sample at temperature 1.0: the entropy is in the weights now, not in the sampler"]

