"""Resumable run state: everything `--resume` needs, saved and loaded in one place.

    state = RunState.load(run_dir)            # or RunState(next_step=0, tau=1.5, ...)
    state.save(run_dir)                       # atomically: a crash leaves the previous file whole

While a run goes, `OUT.tsopsd-run/` (beside OUT, never inside it) holds `state.json` and its tensors
(this dataclass, as JSON + safetensors: nothing there is ever unpickled),
`config.yaml` and `metrics.jsonl`; an FSDP run adds `sharded-N/` (its weights and optimizer shards,
named by the state file).
Sampling seeds derive from (seed, step) and the prompt order from (seed, epoch), so no RNG state is
needed: a resumed run repeats exactly what an uninterrupted one would have done. What a resume reads was
written by this run, unchanged: the state is sealed and its tensors hashed (`saved.py`), and it records the
hashes of metrics.jsonl and of each checkpoint along the way (`RunState.check_files`).

`interrupts()` makes Ctrl-C and SIGTERM (what schedulers send first) raise `KeyboardInterrupt`,
except inside `held()` blocks, where they wait until the block ends: the part of a step that
changes the state (the update, the step counter, the metrics line, a periodic save) lands whole
or not at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tsopsd.errors import TsopsdError
from tsopsd.saved import folder_digest, load_tree, save_tree
from tsopsd.writing import pid_alive, write_file

log = logging.getLogger(__name__)

STATE_FILE = "state.json"  # beside it the tensors, `state-*.safetensors` (`saved.save_tree`): no pickle
METRICS = "metrics.jsonl"  # a line a step, appended as each lands
CHECKPOINT = re.compile(r"checkpoint-\d+")  # a loadable checkpoint along the way (TRL's name)


def run_dir_for(out: Path) -> Path:
    """The folder beside OUT that holds a run's resumable state while it goes."""
    return out.with_name(out.name + ".tsopsd-run")


@dataclass
class RunState:
    """What a resume needs, besides the live model.

    Attributes:
        next_step: the first step not applied yet (0-based).
        tau: the teacher temperature (with a target entropy: the last applied step's, where the next
            step's solve starts); `tau_source` says how it was chosen.
        target: the target entropy in nats that tau is solved for every step (None: tau is fixed).
        before: the before-report (measured once, at the start).
        world_size: ranks of the run (a resume needs the same number).
        config: the config fields a resume must match (`comparable`).
        stop: `StopRules.state_dict()`.
        scheduler: the learning-rate scheduler's state.
        trainable: the trainable weights, optimizer state and rollback copy, as the backend packs them.
        stop_reason: why the run ended (None while it goes); `kept_step`: updates in the kept weights.
        input_fingerprint: `folders.fingerprint` of the input (and adapter base): a resume refuses a
            changed input.
        target_measured: with `teacher.target_entropy_from`, how the target was measured (with its interval).
        run_id: the run's id, also in its folder's marker (`MARKER`) and OUT's report.
        checkpoints: the checkpoints along the way this run wrote, {"checkpoint-N": `saved.folder_digest`}: a
            resume refuses one that changed, and OUT receives these only.
        metrics: {"bytes": n, "sha256": ...} of metrics.jsonl as saved (a resume refuses edited lines).
    """

    next_step: int
    tau: float
    tau_source: str
    target: float | None
    before: dict | None
    world_size: int
    config: dict
    stop: dict = dataclasses.field(default_factory=dict)
    scheduler: dict = dataclasses.field(default_factory=dict)
    trainable: dict | None = None
    stop_reason: str | None = None
    kept_step: int | None = None
    failed: bool = False
    input_fingerprint: dict = dataclasses.field(default_factory=dict)
    target_measured: dict | None = None  # target_entropy_from: the measurement (entropy, interval, samples)
    run_id: str = ""  # the run's id: in its folder's marker and in OUT's report (what this run wrote)
    checkpoints: dict = dataclasses.field(default_factory=dict)
    metrics: dict = dataclasses.field(default_factory=lambda: {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()})

    def save(self, run_dir: Path) -> None:
        """Write the state atomically (JSON + safetensors), then remove sharded folders it no longer names."""
        run_dir = Path(run_dir)
        try:
            save_tree(dataclasses.asdict(self), run_dir, STATE_FILE.removesuffix(".json"))
        except (OSError, RuntimeError) as e:
            (run_dir / (STATE_FILE + ".tmp")).unlink(missing_ok=True)
            if shutil.disk_usage(run_dir).free < 2**20:  # safetensors reports a full disk as a bare error
                raise OSError(errno.ENOSPC, "No space left on device", str(run_dir)) from e
            raise
        keep = (self.trainable or {}).get("folder")
        for old in run_dir.glob("sharded-*"):
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    def record_metrics(self, run_dir: Path) -> None:
        """Note the length and SHA-256 of metrics.jsonl as it stands (the lines of the steps applied so far)."""
        data = (Path(run_dir) / METRICS).read_bytes()
        self.metrics = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def check_files(self, run_dir: Path) -> bytes:
        """On resume, what the run folder holds beside the state, against what the state recorded: metrics.jsonl
        must begin with the saved lines (returned: those after them are of steps that will run again) and every
        checkpoint the state names must be as written. A checkpoint it does not name is refused if it claims a
        step the state has applied (not this run's), and is written again if it lies beyond (written after the
        last save). One the user removed is noted and left out of OUT.

        Raises:
            TsopsdError: an edited or foreign metrics.jsonl or checkpoint; nothing is changed then.
        """
        run_dir = Path(run_dir)
        metrics = run_dir / METRICS
        data = metrics.read_bytes() if metrics.is_file() and not metrics.is_symlink() else b""
        saved = data[:self.metrics["bytes"]]
        if len(saved) != self.metrics["bytes"] or hashlib.sha256(saved).hexdigest() != self.metrics["sha256"]:
            raise TsopsdError(f"cannot resume: {metrics} is not what the run saved (its first {self.metrics['bytes']} "
                              "bytes were altered or are missing); rerun with --overwrite to start over")
        for folder in sorted(run_dir.iterdir()):
            if not CHECKPOINT.fullmatch(folder.name):
                continue
            step = int(folder.name.split("-")[1])
            if folder.name in self.checkpoints:
                try:
                    same = folder_digest(folder) == self.checkpoints[folder.name]
                except OSError:
                    same = False
                if not same:
                    raise TsopsdError(f"cannot resume: {folder} is not the checkpoint this run wrote (its files "
                                      "changed); move it away to resume without it, or --overwrite to start over")
            elif step <= self.next_step:
                raise TsopsdError(f"cannot resume: {folder} was not written by this run (its saved state names no "
                                  "such checkpoint); move it away, then --resume")
            else:
                log.warning("%s was written after the last saved state: written again when the run passes step %d",
                            folder, step)
        for name in sorted(set(self.checkpoints) - {p.name for p in run_dir.iterdir()}):
            log.warning("%s is gone from %s: OUT will not hold it", name, run_dir)
            del self.checkpoints[name]
        return saved

    @classmethod
    def load(cls, run_dir: Path) -> RunState:
        """The saved state, its fields checked for type (an edited or foreign file is refused in one line)."""
        path = Path(run_dir) / STATE_FILE
        saved = load_tree(run_dir, STATE_FILE.removesuffix(".json"))
        if not isinstance(saved, dict) or set(saved) != {f.name for f in dataclasses.fields(cls)}:
            raise TsopsdError(f"cannot resume: {path} was written by another version of tsopsd; rerun with --overwrite")
        kinds = {"next_step": int, "tau": (int, float), "tau_source": str, "target": (int, float, type(None)),
                 "before": (dict, type(None)), "world_size": int, "config": dict, "stop": dict, "scheduler": dict,
                 "trainable": (dict, type(None)), "stop_reason": (str, type(None)), "kept_step": (int, type(None)),
                 "failed": bool, "input_fingerprint": dict, "target_measured": (dict, type(None)), "run_id": str,
                 "checkpoints": dict, "metrics": dict}
        wrong = [k for k, kind in kinds.items() if not isinstance(saved[k], kind) or
                 (kind is int and isinstance(saved[k], bool))]
        if "checkpoints" not in wrong and not all(CHECKPOINT.fullmatch(k) and isinstance(v, str)
                                                  for k, v in saved["checkpoints"].items()):
            wrong.append("checkpoints")
        if "metrics" not in wrong and (set(saved["metrics"]) != {"bytes", "sha256"} or not isinstance(
                saved["metrics"]["sha256"], str) or type(saved["metrics"]["bytes"]) is not int):
            wrong.append("metrics")
        if wrong or saved["next_step"] < 0 or saved["world_size"] < 1:
            raise TsopsdError(f"cannot resume: {path} is damaged ({', '.join(wrong) or 'next_step or world_size'} out of "
                              "form); rerun with --overwrite to start over")
        return cls(**saved)


MARKER = "tsopsd-run.json"  # written first into every run folder: proof that tsopsd made it, and which run


def make_run_dir(run_dir: Path, run_id: str) -> None:
    """Create a run's folder with its marker (the run id, this pid and host), written whole before anything else."""
    run_dir.mkdir(parents=True)
    write_file(run_dir / MARKER, json.dumps({"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname()}),
               tmp=run_dir / f".{MARKER}.tmp")


def run_id_of(folder: Path, name: str = MARKER) -> str | None:
    """The run id in `folder/name` (a run folder's marker, or an output's `reheat_report.json`); None when it is
    not there or not readable as one."""
    path = Path(folder) / name
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 2**26:
            return None
        found = json.loads(path.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, str) and found else None


def settle_run_dir(run_dir: Path, out: Path, *, overwrite: bool, resume: bool, dry_run: bool = False) -> None:
    """Before a run starts: what an existing run folder (and, for a resume, OUT) means. tsopsd deletes only what it
    can prove it wrote (the marker) and no longer needs; anything else is left as it is and named in the error.

    Raises:
        TsopsdError: a folder tsopsd did not make; a damaged run folder; one holding checkpoints of a run killed
            before its first saved state (without --overwrite); an unfinished run (without --resume or
            --overwrite); nothing to resume; a resume onto an OUT this run did not write. With `dry_run` the
            same refusals, and nothing deleted.
    """
    state, exists = run_dir / STATE_FILE, os.path.lexists(run_dir)
    ours = run_id_of(run_dir) if exists and run_dir.is_dir() and not run_dir.is_symlink() else None
    if exists and ours is None:
        raise TsopsdError(f"{run_dir} is in the way of OUT's run folder and was not made by tsopsd: move it away")
    if exists and os.path.lexists(state) and (state.is_symlink() or not state.is_file()):
        raise TsopsdError(f"{run_dir} is damaged ({STATE_FILE} is not a file): left as it is; move it away, then rerun")
    if exists and state.is_file():
        if resume and out.exists():
            if run_id_of(out, "reheat_report.json") == ours:  # killed between writing OUT and discarding this
                if not dry_run:
                    discard_run_dir(run_dir)
                raise TsopsdError(f"nothing to resume: {out} is complete (its run finished)")
            raise TsopsdError(f"cannot resume into {out}: it exists and this run did not write it; move it away, then "
                              "--resume")
        if resume:
            return
        if not overwrite:
            raise TsopsdError(f"an unfinished run exists at {run_dir}: pass --resume to continue it or --overwrite to "
                              "start over")
        if not dry_run:
            shutil.rmtree(run_dir)
        return
    if exists:  # ours, killed before its first saved state
        kept = sorted(p.name for p in run_dir.iterdir() if CHECKPOINT.fullmatch(p.name))
        if kept and not overwrite:
            raise TsopsdError(f"{run_dir} holds {', '.join(kept)} from a run stopped before its first saved state: "
                              "move what you need out of it, then rerun (--overwrite deletes it)")
        if dry_run and not resume:
            return
        if not dry_run:
            log.warning("removing %s: a run folder without saved state (its run stopped before saving any)", run_dir)
            shutil.rmtree(run_dir)
        if resume:
            raise TsopsdError(f"nothing to resume: {run_dir} held no saved state (removed); rerun without --resume")
    if resume:
        if out.is_dir():
            raise TsopsdError(f"nothing to resume: {out} is complete (its run finished)")
        raise TsopsdError(f"nothing to resume: no saved state in {run_dir}")


def discard_unsaved(run_dir: Path) -> None:
    """A run ending without a saved state: its folder removed if this run made it and it holds no checkpoint."""
    if run_id_of(run_dir) is None or os.path.lexists(run_dir / STATE_FILE):
        return
    if not any(CHECKPOINT.fullmatch(p.name) for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def discard_run_dir(run_dir: Path) -> None:
    """Remove a finished run's folder: renamed away at once (atomic), then deleted; a kill during the
    deletion leaves a hidden `.OUT.old-PID-run` that the next command on OUT removes."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        away = run_dir.with_name(f".{run_dir.name.removesuffix('.tsopsd-run')}.old-{os.getpid()}-run")
        os.replace(run_dir, away)
        shutil.rmtree(away, ignore_errors=True)


def comparable(cfg) -> dict:
    """The config fields that must match for a resume to continue the same run."""
    d = cfg.to_dict()
    d["output"] = {k: v for k, v in d["output"].items() if k not in ("overwrite", "resume", "save_every", "checkpoint_every")}
    d["train"] = {k: v for k, v in d["train"].items() if k != "steps"}
    d["model"] = {k: v for k, v in d["model"].items() if k != "device"}
    return d


class OutputLock:
    """`OUT.tsopsd-lock` beside OUT, holding the pid and host of the run writing OUT.

    A second run on the same OUT is refused while the first lives; the lock of a run that is gone
    (killed) is taken over with a note. The lock is a hard link made in one step on the file server, not
    an `flock` (what `filelock` holds): a Lustre mount with `localflock` or an NFS mount with `local_lock`
    excludes an flock only within one node, while a link excludes across the nodes of a cluster.
    """

    def __init__(self, out: Path):
        self.out, self.path = out, out.with_name(out.name + ".tsopsd-lock")
        self.mine = f"{os.getpid()} {socket.gethostname()}"
        self.held = False
        self.made: list[Path] = []

    def acquire(self) -> None:
        above = self.path.parent
        while not above.exists():  # folders this run creates: removed again if it leaves nothing in them
            self.made.insert(0, above)
            above = above.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_dir():
            raise TsopsdError(f"the lock path {self.path} is a folder: remove it (tsopsd writes a lock file there)")
        for _ in range(3):
            # Created whole: written to a private file, then linked in place (fails if the lock exists), so a
            # lock file never exists empty, even for a run killed in between.
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text(self.mine)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                owner = self._owner()
                if owner is not None:
                    pid, host = owner
                    if host != socket.gethostname():
                        raise TsopsdError(f"another run is writing {self.out} (pid {pid} on {host}); if it is gone, "
                                          f"remove {self.path}") from None
                    if pid_alive(pid):
                        raise TsopsdError(f"another run is writing {self.out} (pid {pid}): wait for it or stop it") from None
                log.warning("taking over %s from a run that is gone (%s)", self.path,
                            f"pid {owner[0]}" if owner else "the lock file was empty or unreadable")
                self.path.unlink(missing_ok=True)
                continue
            finally:
                tmp.unlink(missing_ok=True)
            self.held = True
            return
        raise TsopsdError(f"cannot take the lock {self.path}: other runs keep taking it")

    def _owner(self) -> tuple[int, str] | None:
        """(pid, host) written in the lock file; None when it is gone, empty or unreadable."""
        try:
            pid, _, host = self.path.read_text().partition(" ")
        except (OSError, UnicodeDecodeError):
            return None
        return (int(pid), host.strip()) if pid.isdigit() and host.strip() else None

    def release(self) -> None:
        if self.held and self.path.exists() and self.path.read_text() == self.mine:
            self.path.unlink(missing_ok=True)
        self.held = False
        for folder in reversed(self.made):  # deepest first; one that holds anything stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        self.made = []


class Interrupts:
    def __init__(self):
        self.depth = 0
        self.pending: int | None = None

    def handler(self, signum, frame) -> None:
        if self.depth:
            self.pending = signum  # raised when the held block ends
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Signals arriving inside wait until the block ends (then raise KeyboardInterrupt)."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending is not None:  # the block ended normally (or by break)
            self.pending = None
            raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts() -> Iterator[Interrupts]:
    """SIGINT and SIGTERM raise KeyboardInterrupt, except inside `held()` blocks; restored on exit."""
    guard = Interrupts()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield guard
        return
    previous = {s: signal.signal(s, guard.handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield guard
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def check_resumable(state: RunState, run_dir: Path, *, world_size: int, config: dict, fingerprint: dict,
                    steps: int) -> None:
    """Refuse (one line) a saved state that is not this run's to resume: another run's folder, another number of
    ranks, another config (`comparable`), a changed input or prompt file, fewer steps than it has applied."""
    if state.run_id != run_id_of(run_dir):
        raise TsopsdError(f"cannot resume: the state in {run_dir} is not the run its folder was made for (the run ids "
                          "differ): the run folder was altered; rerun with --overwrite to start over")
    if state.world_size != world_size:
        raise TsopsdError(f"cannot resume: the run was saved with {state.world_size} rank(s), this launch has "
                          f"{world_size}; relaunch with the same number of processes")
    if state.config != config:
        diff = [f"{k}: saved {_shown(then_v)}, given {_shown(now_v)}" for k, then_v, now_v in _leaf_diff(state.config,
                                                                                                          config)]
        raise TsopsdError(f"cannot resume: the config differs from the saved run ({'; '.join(diff)}); give the saved "
                          "values (--resume alone reuses the saved config) or --overwrite to start over")
    then = state.input_fingerprint
    changed = sorted(k for k in then.keys() | fingerprint.keys() if then.get(k) != fingerprint.get(k))
    if changed:
        what = "prompt file" if changed[0].startswith("prompts:") else "input checkpoint"
        raise TsopsdError(f"cannot resume: the {what} changed since the run began ({changed[0].removeprefix('prompts:')}); "
                          "rerun with --overwrite to start over on the new input")
    if steps < state.next_step:
        raise TsopsdError(f"cannot resume with --steps {steps}: the run has applied {state.next_step} steps "
                          f"already; give --steps {state.next_step} or more")


def disagreements(state: RunState, cfg, stop, scheduler, optimizer) -> list[str]:
    """What a loaded state says that the config does not (`stop`, `scheduler` and `optimizer` restored from it):
    the config is the only source of hyperparameters, so a saved value that differs (an edited state file) is
    named, never used. Empty when they agree."""
    off = []
    t = cfg.teacher
    if t.temperature is not None and state.tau != t.temperature:
        off.append(f"tau: saved {state.tau}, config {t.temperature}")
    if (state.target is None) != (t.temperature is not None) or (t.target_entropy is not None and state.target !=
                                                                t.target_entropy):
        off.append(f"target entropy: saved {state.target}, config {t.target_entropy or t.target_entropy_from}")
    if state.target is not None and not (state.target / 3 <= (stop.target or 0) <= 3 * state.target):
        off.append(f"training target: saved {stop.target}, outside 1/3x..3x the target {state.target}")
    factor = stop.lr_factor
    if not (1 <= factor <= cfg.train.max_lr_factor and math.log2(factor).is_integer()) or \
            factor != (stop.paced[-1]["factor"] if stop.paced else 1.0):
        off.append(f"learning-rate factor: saved {factor}, not what pace gives (train.max_lr_factor {cfg.train.max_lr_factor})")
    if scheduler.base_lrs != [cfg.train.lr] * len(optimizer.param_groups):
        off.append(f"learning rate: saved {scheduler.base_lrs}, config {cfg.train.lr}")
    for group in optimizer.param_groups:
        for key, value in optimizer.defaults.items():
            if key not in ("lr", "params") and group.get(key) != value:
                off.append(f"optimizer {key}: saved {group.get(key)}, config {value}")
        expected = cfg.train.lr * scheduler.lr_lambdas[0](scheduler.last_epoch)  # warm-up x pace, from config
        if group.get("initial_lr") != cfg.train.lr or not math.isclose(group["lr"], expected, rel_tol=1e-9):
            off.append(f"optimizer lr: saved {group['lr']}, the schedule gives {expected}")
    # what only the run produces: set together when it stops (a state saved mid-run has none of them)
    guard = (state.stop_reason or "").startswith(("drift guard", "non-finite"))
    if (state.stop_reason is None and (state.kept_step is not None or state.failed)) or \
            (state.stop_reason is not None and state.failed != guard):
        off.append(f"the run's outcome: stop reason {state.stop_reason!r} with kept step {state.kept_step} and failed "
                   f"{state.failed}, which no run saves together")
    return sorted(set(off))


def _leaf_diff(then: dict, now: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, saved value, given value) of every leaf where two config dicts differ."""
    out = []
    for k in sorted(then.keys() | now.keys()):
        a, b = then.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _leaf_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append((f"{prefix}{k}", a, b))
    return out


def _shown(value) -> str:
    return "null" if value is None else str(value)
