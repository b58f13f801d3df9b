"""`tsopsd watch RUN_DIR`: follow an RL run's checkpoints, and reheat the one where its entropy collapsed.

    result = watch(Path("checkpoints/exp"), "prompts.jsonl", once=True)   # {"status": "reheated", ...}

For frameworks whose loop tsopsd does not enter (verl, OpenRLHF, any writer of `checkpoint-N/` or `global_step_N/`).
Each checkpoint, once complete (no file in it changed for `settle` seconds), is measured as `measure-entropy RUN_DIR`
measures a trajectory (`trajectory.py`: same prompts, same seed, against the first checkpoint). The collapse rule,
in words: **the entropy of `consecutive` checkpoints in a row is below `ratio` x the first checkpoint's (or below
`min_entropy` nats)**. When it fires, the checkpoint where it fired is reheated (by default the closed form,
`--method scale`, back to the first checkpoint's entropy) into `NAME-reheated/` beside it, complete or absent, and
the command to resume the run from it is printed. A TRL checkpoint's trainer files (trainer state, optimizer,
scheduler, RNG) are copied into it byte for byte (never unpickled here), so `resume_from_checkpoint` on it goes on
at the same step with the reheated weights (and the optimizer's moments of the old ones).

`once`: look once, act, return (cron, SLURM dependency chains); otherwise poll every `interval` seconds until the
rule fires. Statuses: "nothing" (exit 0), "reheated" (exit 3: resume from the printed path), "already" (the
checkpoint where the rule fires has its reheated folder already: exit 0).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from tsopsd.errors import TsopsdError
from tsopsd.trajectory import collapse_point, find_checkpoints, measure_trajectory, step_of

log = logging.getLogger(__name__)

SUFFIX = "-reheated"
TRL_STATE = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "training_args.bin")  # + rng_state*.pth


def complete(folder: Path, settle: float, now: float | None = None) -> bool:
    """No file under `folder` changed in the last `settle` seconds (a checkpoint still being written is not)."""
    now = time.time() if now is None else now
    newest = max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()), default=0.0)
    return now - newest >= settle


def step_folder(model: Path, run_dir: Path) -> Path:
    """The run's own folder of a checkpoint (`checkpoint-N/`, `global_step_N/`) holding `model` (which may be inside
    it, as verl keeps `actor/huggingface/`)."""
    model = model.resolve()
    for folder in (model, *model.parents):
        if folder.parent == run_dir.resolve():
            return folder
    return model


def resume_commands(step_dir: Path, reheated: Path) -> dict[str, str]:
    """How to go on from `reheated`, for the framework that wrote `step_dir`."""
    if step_dir.name.startswith("global_step_"):
        return {"verl": f"actor_rollout_ref.model.path={reheated} trainer.resume_mode=disable  "
                        "(a new run from the reheated weights)"}
    commands = {"any": f"load {reheated} as the policy (transformers from_pretrained; vllm serve)"}
    if (step_dir / "trainer_state.json").is_file():
        commands["trl"] = f"trainer.train(resume_from_checkpoint={str(reheated)!r})"
    return commands


def watch(run_dir: Path, prompts: str | Path, *, once: bool = False, interval: float = 300.0, settle: float = 60.0,
          ratio: float = 0.5, min_entropy: float | None = None, consecutive: int = 1, method: str = "scale",
          config: str | Path | None = None, target_entropy: float | None = None, samples_per_prompt: int = 4,
          max_new_tokens: int = 256, seed: int = 0, device: str = "auto", show_progress: bool = True,
          max_polls: int | None = None) -> dict:
    """Follow `run_dir` (see the module's docstring); returns what happened, JSON-ready."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TsopsdError(f"watch: {run_dir} is not a folder (give the run folder that holds checkpoint-N or "
                          "global_step_N folders)")
    if not 0 < ratio < 1:
        raise TsopsdError(f"--collapse-ratio must be in (0, 1), got {ratio}")
    if consecutive < 1:
        raise TsopsdError(f"--consecutive must be >= 1, got {consecutive}")
    if not interval > 0 or settle < 0:
        raise TsopsdError("--interval must be > 0 and --settle >= 0 (seconds)")
    if method not in ("scale", "distill"):
        raise TsopsdError(f"--method must be scale or distill, got {method}")
    measured: dict[str, dict] = {}  # model folder -> its row (a checkpoint is measured once)
    polls = 0
    while True:
        polls += 1
        found = [(s, m) for s, m in find_checkpoints([run_dir]) if s is not None]  # steps only: not *-reheated
        ready = [(s, m) for s, m in found if complete(step_folder(m, run_dir), settle)]
        if ready:
            new = [x for x in ready if str(x[1]) not in measured]
            if new:
                first = ready[0]
                rows = measure_trajectory([first] + [x for x in new if x != first], prompts, reference=first[1],
                                          samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
                                          seed=seed, device=device, show_progress=show_progress)["checkpoints"]
                measured |= {r["checkpoint"]: r for r in rows}
            rows = [measured[str(m)] for _, m in ready]
            entropies = [r["metrics"]["entropy"]["mean"] for r in rows]
            at = collapse_point(entropies, ratio, min_entropy=min_entropy, consecutive=consecutive)
            if at is not None:
                return _act(run_dir, rows, entropies, at, prompts, method=method, config=config,
                            target=target_entropy if target_entropy is not None else entropies[0], seed=seed,
                            device=device, show_progress=show_progress, rule=_rule(ratio, min_entropy, consecutive),
                            max_new_tokens=max_new_tokens)
        if once or (max_polls is not None and polls >= max_polls):
            return {"status": "nothing", "run_dir": str(run_dir), "rule": _rule(ratio, min_entropy, consecutive),
                    "checkpoints": [_short(measured[str(m)]) for _, m in ready] if ready else [],
                    "waiting": [str(x[1]) for x in found if x not in ready]}
        log.info("watching %s: %d checkpoints measured, no collapse; next look in %.0f s", run_dir, len(ready), interval)
        time.sleep(interval)


def _rule(ratio: float, min_entropy: float | None, consecutive: int) -> dict:
    words = f"entropy below {ratio:g} x the first checkpoint's" + (f" or below {min_entropy:g} nats" if min_entropy else "")
    return {"ratio": ratio, "min_entropy": min_entropy, "consecutive": consecutive,
            "words": f"{words}, {consecutive} checkpoint(s) in a row"}


def _short(row: dict) -> dict:
    m = row["metrics"]
    return {"step": row["step"], "checkpoint": row["checkpoint"], "entropy": m["entropy"]["mean"],
            "interval": m["intervals"]["entropy"]}


def _act(run_dir: Path, rows: list[dict], entropies: list[float], at: int, prompts, *, method: str, config,
         target: float, seed: int, device: str, show_progress: bool, rule: dict, max_new_tokens: int) -> dict:
    """The rule fired at `rows[at]`: its reheated folder (written here unless it exists), and how to resume."""
    from tsopsd.config import load_config
    from tsopsd.errors import TrainingStopped
    from tsopsd.loop import reheat

    model = Path(rows[at]["checkpoint"])
    step_dir = step_folder(model, run_dir)
    out = step_dir.with_name(step_dir.name + SUFFIX)
    result = {"run_dir": str(run_dir), "rule": rule, "checkpoints": [_short(r) for r in rows], "fired_at": str(step_dir),
              "step": step_of(step_dir), "target_entropy": target, "reheated": str(out)}
    if out.exists():
        log.info("%s fired the collapse rule and is reheated already: %s", step_dir, out)
        return result | {"status": "already", "resume": resume_commands(step_dir, out)}
    log.info("collapse at %s (entropy %.4f; %s): reheating it (%s) to %.4f nats -> %s", step_dir, entropies[at],
             rule["words"], method, target, out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # hidden from find_checkpoints; renamed when complete
    overrides = {"model.path": str(model), "data.prompts": str(prompts), "output.out": str(tmp / "model"),
                 "teacher.method": method, "teacher.temperature": None, "teacher.target_entropy": target,
                 "teacher.target_entropy_from": None, "seed": seed, "model.device": device, "output.save": "merged",
                 "rollout.max_new_tokens": max_new_tokens}  # the target was measured with these completions
    try:
        try:
            report = reheat(load_config(config, overrides), show_progress=show_progress)
        except TrainingStopped as e:  # a guard stop writes the last good state: used, and said
            if e.report is None:
                raise
            report = e.report
        for name in TRL_STATE + tuple(p.name for p in step_dir.glob("rng_state*.pth")):
            if (step_dir / name).is_file():  # copied as bytes: tsopsd never unpickles them
                shutil.copy2(step_dir / name, tmp / "model" / name)
        os.replace(tmp / "model", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result | {"status": "reheated", "report_status": report["status"], "tau": report["teacher_temperature"],
                     "after_entropy": (report.get("after") or {}).get("entropy", {}).get("mean"),
                     "resume": resume_commands(step_dir, out)}
