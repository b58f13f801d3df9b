"""What a run refuses before it loads anything: its prompt files (counted against what a step takes), the target
checkpoint, every path it would write (against every input, and writable), the trackers; `reheat --dry-run`
refuses exactly this.

    check_run(cfg, world_size=1)            # a TsopsdError (one line) for anything a run would refuse
"""

from __future__ import annotations

import logging
from pathlib import Path

from tsopsd.config import Config
from tsopsd.errors import TsopsdError
from tsopsd.folders import loadable_folder
from tsopsd.paths import check_writes, check_writes_apart, temporary
from tsopsd.prompts import prompts_fingerprint, read_records
from tsopsd.run import held_out_count
from tsopsd.state import OutputLock, run_dir_for, settle_run_dir
from tsopsd.trackers import check_trackers, logging_dir
from tsopsd.writing import check_output_dir, check_writable

log = logging.getLogger(__name__)


def check_run(cfg: Config, world_size: int = 1, *, in_memory: bool = False, dry_run: bool = False) -> None:
    """What a run refuses before it loads anything: the prompts, the target checkpoint, every path it would write
    (against every input, and writable), the trackers; with `dry_run`, also OUT and its run folder as the run would
    find them (nothing is deleted or locked). `reheat --dry-run` refuses exactly this."""
    out = Path(cfg.output.out)
    run_dir = run_dir_for(out)
    check_prompts(cfg, world_size)
    target = cfg.teacher.target_entropy_from
    if target is not None and not Path(target).exists():
        raise TsopsdError(f"--target-entropy-from {target}: checkpoint not found")
    logs = logging_dir(out, cfg.output.logging_dir) if cfg.output.report_to else None
    writes = {"output folder": out, "temporary folder": temporary(out), "run folder": run_dir,
              "lock file": OutputLock(out).path, "output.logging_dir": logs}
    check_writes(writes, {"checkpoint": cfg.model.path, "adapter base": cfg.model.base,
                          "target checkpoint": target, "prompt file": cfg.data.prompts,
                          "held-out prompt file": cfg.data.eval_prompts})
    check_writes_apart(writes)
    for path in (out, run_dir, logs):
        if path is not None:
            check_writable(path)
    check_trackers(cfg.output.report_to)
    if not in_memory and cfg.output.save == "adapter" and loadable_folder(cfg.model.path) is None:
        raise TsopsdError(f"{cfg.model.path} is a verl checkpoint held in rank shards, which an adapter cannot "
                          "name as its base: reheat it with --save merged (or convert it with verl's model_merger "
                          "and reheat that folder)")
    if dry_run:
        check_output_dir(out, overwrite=cfg.output.overwrite, resume=cfg.output.resume)
        settle_run_dir(run_dir, out, overwrite=cfg.output.overwrite, resume=cfg.output.resume, dry_run=True)


def check_prompts(cfg: Config, world_size: int = 1) -> None:
    """The prompt files parsed and checked (fields, empty prompts, roles) and counted against what a step takes,
    before any model loads: what needs the tokenizer (chat templates, token counts) waits for it."""
    n = len(read_records(cfg.data.prompts, cfg.data.prompt_field, cfg.data.limit))
    if cfg.data.eval_prompts:
        held = len(read_records(cfg.data.eval_prompts, cfg.data.prompt_field))
        if [*prompts_fingerprint(cfg.data.eval_prompts).values()] == [*prompts_fingerprint(cfg.data.prompts).values()]:
            log.warning("--eval-prompts holds the training prompts (the same file's contents): the run trains on them, "
                        "so its 'held-out' measurements and steering are not held out; give other prompts, or leave it "
                        "out to hold some out of the training file")
        held = held if cfg.output.eval_prompts is None else min(held, cfg.output.eval_prompts)
        check_enough(cfg, world_size, n, n, held)
    else:
        held = held_out_count(n, cfg.output.eval_prompts)
        check_enough(cfg, world_size, n, n - held, held)


def check_enough(cfg: Config, world_size: int, n: int, training: int, held: int) -> None:
    """`n` prompts, `training` of them trained on and `held` held out, give every rank its prompts a step."""
    if training >= world_size * cfg.rollout.prompts_per_step:
        return
    have = f"{n} prompts leave {training} for training after holding out {held} for the report " \
        "(output.eval_prompts), which is" if held and not cfg.data.eval_prompts else f"{n} prompts are"
    raise TsopsdError(f"{have} fewer than {world_size} rank(s) x {cfg.rollout.prompts_per_step} prompts "
                      "per step: lower rollout.prompts_per_step or output.eval_prompts, or add prompts")
