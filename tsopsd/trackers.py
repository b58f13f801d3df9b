"""Where a run's step metrics go besides `metrics.jsonl`: TensorBoard, and W&B.

    trackers = open_trackers("tensorboard", log_dir, resume_step=0, config=cfg.to_dict(), name="out")
    trackers.log(step, {"train/loss": 0.12, ...})      # the names metrics.jsonl uses
    trackers.close()

Both are optional extras, found (or refused, one line) when the run is set up, before any work. On a
resume, TensorBoard drops what was logged from the resumed step on (`purge_step`), so the steps that run
again are not shown twice; W&B resumes the same run id. W&B runs as the user set it up, as TRL and verl
run it: `WANDB_MODE` (online with a login, offline, disabled), `WANDB_PROJECT` or `output.wandb_project`,
the run named `output.run_name` (default: OUT's folder name).
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

from tsopsd.config import report_kinds
from tsopsd.errors import TsopsdError

log = logging.getLogger(__name__)


def check_trackers(spec: str) -> None:
    """Refuse, in one line and before any work, a tracker whose package is not installed."""
    for kind in report_kinds(spec):
        try:
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            else:
                import wandb  # noqa: F401
        except ImportError:
            extra = "pip install 'tsopsd[tensorboard]'" if kind == "tensorboard" else "pip install wandb"
            raise TsopsdError(f"--report-to {kind} needs the {kind} package: {extra}") from None


def logging_dir(out: str | Path, configured: str) -> Path:
    """Where trackers write: `configured`, else OUT.logs beside OUT (OUT itself appears only at the end)."""
    return Path(configured) if configured else Path(f"{out}.logs")


class Trackers:
    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, step: int, metrics: dict) -> None:
        scalars = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v)}
        for sink in self.sinks:
            sink.log(step, scalars)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


class _TensorBoard:
    def __init__(self, log_dir: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=resume_step or None)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a killed run keeps what it logged

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, log_dir: Path, config: dict, name: str, project: str):
        import wandb

        run_id = "tsopsd-" + hashlib.sha1(str(log_dir.resolve()).encode()).hexdigest()[:12]  # same id on resume
        extra = {"project": project} if project else {}  # else WANDB_PROJECT, else wandb's default
        self.run = wandb.init(dir=str(log_dir), config=config, name=name, id=run_id, resume="allow", **extra)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def open_trackers(spec: str, log_dir: str | Path, *, resume_step: int, config: dict, name: str,
                  project: str = "") -> Trackers:
    """The trackers `spec` names, writing under `log_dir` (created); none for '' or 'none'."""
    check_trackers(spec)
    kinds = report_kinds(spec)
    log_dir = Path(log_dir)
    if kinds:
        log_dir.mkdir(parents=True, exist_ok=True)
    sinks = []
    for kind in kinds:
        sinks.append(_TensorBoard(log_dir / "tensorboard", resume_step) if kind == "tensorboard"
                     else _Wandb(log_dir, config, name, project))
        log.info("step metrics to %s in %s", kind, (log_dir / "tensorboard").resolve() if kind == "tensorboard"
                 else log_dir.resolve())
    return Trackers(sinks)
