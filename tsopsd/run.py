"""A reheat run as the loop sees it: the `Run` that `setup` builds and `train`/`finish` work on, one step's
`StepResult`, and which prompts a step (or the held-out report) takes.

    run = loop.setup(cfg)          # a Run: model, optimizer, backend, state, prompts
    run.rollout(step); run.temperature(step, rollout); run.heldout(step); run.log(result)
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tsopsd.batch import Rollout
from tsopsd.config import Config
from tsopsd.console import progress, timed
from tsopsd.distributions import Heat
from tsopsd.intervals import describe
from tsopsd.metrics import measure
from tsopsd.output import write_checkpoint
from tsopsd.parallel import Backend
from tsopsd.policy import Policy
from tsopsd.prompts import Prompt
from tsopsd.rollout import sample_rollouts
from tsopsd.saved import folder_digest
from tsopsd.state import (
    Interrupts,
    OutputLock,
    RunState,
    run_dir_for,
)
from tsopsd.step import Clock, teacher_states
from tsopsd.stop import StopRules
from tsopsd.teacher import heat_masks, solve_temperature, unreachable
from tsopsd.trackers import Trackers

log = logging.getLogger(__name__)

PHASES = ("heldout", "rollout", "solve", "teacher", "student", "check", "optimizer")  # a step's timed phases (metrics.jsonl)



def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 17) % (2**63 - 1)


def prompts_for_step(n_prompts: int, per_step: int, step: int, seed: int) -> list[int]:
    """Indices of the prompts for `step`: a seeded permutation per epoch, read in order."""
    out = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(i, n_prompts)
        g = torch.Generator().manual_seed(step_seed(seed, -1 - epoch))
        out.append(int(torch.randperm(n_prompts, generator=g)[pos]))
    return out


def held_out_count(n_prompts: int, asked: int | None) -> int:
    """How many prompts to hold out: `output.eval_prompts`, or by default min(16, 20%) so a small file still trains."""
    return min(16, n_prompts // 5) if asked is None else asked


def hold_out(prompts: list[Prompt], n: int, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """(training prompts, `n` held-out prompts for the before/after report and the steering), a seeded split."""
    g = torch.Generator().manual_seed(step_seed(seed, -(10**6)))
    held = set(torch.randperm(len(prompts), generator=g)[:n].tolist()) if n else set()
    return ([p for i, p in enumerate(prompts) if i not in held], [p for i, p in enumerate(prompts) if i in held])


@dataclass
class StepResult:
    step: int
    tau: float
    loss: float
    student_entropy: float
    teacher_entropy: float
    kl_student_original: float
    top1_agreement: float
    completion_length: float
    tokens: int
    generated_tokens_per_s: float
    trained_tokens_per_s: float
    lr: float
    grad_norm: float | None
    seconds: float
    target: float | None = None  # the training target tau was solved for (None: a fixed tau)
    heldout: dict[str, float] = field(default_factory=dict)  # measured as this step began: entropy, low, high
    phases: dict[str, float] = field(default_factory=dict)  # seconds: rollout, solve, teacher, student, check, optimizer
    memory: dict[str, float] = field(default_factory=dict)  # on a GPU: this step's peak allocated and reserved bytes

    def line(self, total: int) -> str:
        return (f"step {self.step + 1}/{total}  tau {self.tau:.3f}  loss {self.loss:.4f}  H student {self.student_entropy:.3f}  "
                f"H teacher {self.teacher_entropy:.3f}  top-1 agree {self.top1_agreement:.3f}  "
                f"len {self.completion_length:.1f}  gen {self.generated_tokens_per_s:.0f} tok/s  "
                f"train {self.trained_tokens_per_s:.0f} tok/s")


@dataclass
class Run:
    """A reheat run after `setup`: the model, optimizer, backend and state the loop works on."""

    cfg: Config
    backend: Backend
    policy: Policy
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stop: StopRules
    state: RunState
    prompts: list[Prompt]  # training prompts
    eval_prompts: list[Prompt]  # held out, for the before/after report
    save_dtype: torch.dtype  # the input's dtype: what a merged output is saved in
    dtype: torch.dtype  # what the model runs in
    started: float
    lock: OutputLock | None = None  # held by rank 0 from setup to the end of the run
    signals: Interrupts = field(default_factory=Interrupts)  # `reheat` installs the real handlers
    input_fingerprint: dict | None = None  # `folders.fingerprint` of the input (and adapter base)
    trackers: Trackers = field(default_factory=lambda: Trackers([]))  # TensorBoard / W&B, rank 0 only
    rollout_compile: dict = field(default_factory=dict)  # `decode.COMPILE` after the loop's rollouts (the report's)
    closed_form: dict | None = None  # `teacher.method: scale`: tau, what was edited, the check, the solve's measurements
    config_dir: Path | None = None  # the folder whose config.json describes the model (what `plan` reads)
    in_memory: bool = False  # the Python API's model in memory: trained in place, handed back merged
    writes_output: bool = True  # False: the API's in-memory run with no OUT (its run folder is temporary)
    show_progress: bool = True  # the before/after reports' bars (a TTY) or PROGRESS lines (a log), rank 0
    step_clock: Clock | None = None  # this step's phases (`clock`), settled when the step is logged
    handed_back: bool = False  # an in-memory run's model holds its result (else it is put back as it came)
    phase_seconds: dict = field(default_factory=dict)  # load, target measurement, before-report, training, ...

    def timed(self, what: str):
        """`with run.timed(phase):` its seconds into the report; rank 0 logs when it ends."""
        return timed(what, self.phase_seconds, log if self.backend.is_main else None)

    @property
    def run_dir(self) -> Path:
        return run_dir_for(Path(self.cfg.output.out))

    def rollout(self, step: int) -> Rollout:
        """This rank's share of step `step`'s rollouts, sampled from the current student at T=1.

        The step's global prompt list is the same for any world size; a rank samples its share of rows
        at their global indices (`row_offset`), so it draws what one process would draw for them.
        """
        cfg, k = self.cfg, self.cfg.rollout.samples_per_prompt
        per_step = cfg.rollout.prompts_per_step * self.backend.world_size
        start, mine = self.backend.my_share(prompts_for_step(len(self.prompts), per_step, step, cfg.seed))
        with self.backend.generating(self.policy), self.policy.compute():
            return sample_rollouts(self.policy.student, self.tokenizer, [self.prompts[i] for i in mine],
                                   samples_per_prompt=k, max_new_tokens=cfg.rollout.max_new_tokens, temperature=1.0,
                                   batch_size=cfg.rollout.batch_size, seed=step_seed(cfg.seed, step),
                                   row_offset=start * k, done_everywhere=self.backend.done_everywhere,
                                   engine=cfg.rollout.engine, share_prompts=cfg.train.share_prompts,
                                   compile=cfg.rollout.compile)

    def temperature(self, step: int, rollout: Rollout) -> tuple[float, list[torch.Tensor | None] | None, Heat | None]:
        """Step `step`'s tau, the teacher's hidden states when they were computed for it (the loss reuses them), and
        where the teacher heats (`teacher.heat`; None: uniform, every position over the whole vocabulary).

        A fixed --temperature is returned as is. With a target entropy, tau is re-solved on this step's
        rollouts (over all ranks) so that the teacher's mean entropy on them, heated as the loss heats them, equals
        the target: as the student heats up and its rollouts move, tau follows.
        """
        state, target, t = self.state, self.stop.target, self.cfg.teacher  # target: the training one (steered)
        heat = None if t.heat == "uniform" else Heat(min_p=t.heat_min_p if t.heat == "plausible" else 0.0)
        if target is None and t.heat != "forking":
            return state.tau, None, heat
        hidden = teacher_states(self.policy, rollout, micro_batch=self.cfg.train.micro_batch,
                                skip_empty=not self.backend.lockstep, share_prompts=self.cfg.train.share_prompts)
        if t.heat == "forking":
            heat = Heat(masks=heat_masks(self.policy.teacher, hidden, t.heat_fraction, chunk_size=self.cfg.loss.chunk_size))
        if target is None:
            return state.tau, hidden, heat
        found = solve_temperature(self.policy.teacher, hidden, target, start=state.tau, total=self.backend.sum,
                                  chunk_size=self.cfg.loss.chunk_size, heat=heat)
        if not found.reached:
            if step == 0:
                raise unreachable(target, found)
            self.note(f"step {step + 1}: the target entropy {target:.4f} is out of reach on this step's "
                      f"rollouts; tau = {found.x:g} gives {found.value:.4f}")
        return found.x, hidden, heat

    def evaluate(self, model=None, reference=None, *, prompts: list[Prompt] | None = None,
                 samples: int | None = None, seed: int | None = None, warn_wide: bool = True,
                 bar: str = "", precision: float | None = None) -> dict | None:
        """The before/after report of `model` (default: the student) on the held-out prompts (or `prompts`);
        `bar`: its progress, so named (not inside the loop, whose bar is the steps'); `precision`: sample on, up to
        4x the samples, until the interval is within +-precision of the mean (`metrics.measure`)."""
        cfg = self.cfg
        prompts = self.eval_prompts if prompts is None else prompts
        if not prompts:
            return None
        student = model is None
        context = contextlib.ExitStack()
        if student:
            context.enter_context(self.backend.generating(self.policy))
            context.enter_context(self.policy.compute())
        task = context.enter_context(progress(bool(bar) and self.shows_progress(self.show_progress)))
        with context:
            return self.backend.measure(lambda: measure(
                self.policy.student if student else model, self.tokenizer, prompts, reference=reference,
                samples_per_prompt=samples or cfg.output.eval_samples_per_prompt,
                max_new_tokens=cfg.rollout.max_new_tokens, batch_size=cfg.rollout.batch_size,
                score_batch=cfg.train.micro_batch, seed=cfg.seed if seed is None else seed,
                done_everywhere=self.backend.done_everywhere, warn_wide=warn_wide, precision=precision,
                progress=lambda what, total: task(f"{bar}: {what}", total)))

    def compares_training(self) -> bool:
        """A target run with held-out prompts also measures its output on training prompts (where it trained)."""
        return self.state.target is not None and bool(self.eval_prompts)

    def training_sample(self) -> list[Prompt]:
        """As many training prompts as are held out (at least 16): the after-report's other half for a target run."""
        return self.prompts[:max(len(self.eval_prompts), 16)]

    def heldout(self, step: int) -> dict[str, float]:
        """Before step `step` of a steered run (every `stop.heldout_every`): the held-out prompts' entropy, measured
        with `stop.heldout_samples_per_prompt` samples each (new draws each time, so that the steering's running
        mean averages their noise out) and its 95% interval on these prompts; {} on other steps."""
        if not self.stop.steers(step):
            return {}
        seed, stop = step_seed(self.cfg.seed, -(10**6) - 1 - step), self.cfg.stop
        m = self.backend.broadcast(self.evaluate(samples=stop.heldout_samples_per_prompt, seed=seed, warn_wide=False))
        lo, hi = m["intervals"]["entropy_these_prompts"] or (m["entropy"]["mean"],) * 2
        refined = self.stop.near_goal(m["entropy"]["mean"])
        if refined:  # close: whether it stops is decided on more samples, up to 4x
            m = self.backend.broadcast(self.evaluate(samples=stop.heldout_samples_per_prompt, seed=seed, warn_wide=False,
                                                     precision=stop.heldout_tolerance))
            lo, hi = m["intervals"]["entropy_these_prompts"] or (m["entropy"]["mean"],) * 2
        if self.backend.is_main:
            log.info("held-out entropy before step %d: %s (95%% interval on these %d prompts x %d), target %.4f",
                     step + 1, describe(m["entropy"]["mean"], (lo, hi)), m["prompts"], m["samples"] // m["prompts"],
                     self.stop.goal)
        return {"entropy": m["entropy"]["mean"], "low": lo, "high": hi, "refined": float(refined)}

    def clock(self, timings: dict[str, float]) -> Clock:
        """A step's clock: `with clock(phase):` adds the phase's seconds to `timings`; on a GPU, called as the
        step begins, it also starts the step's memory peak afresh (each step's peak is its own)."""
        if self.backend.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.backend.device)
        self.step_clock = Clock(self.backend.device, timings)
        return self.step_clock

    def memory_peaks(self) -> dict[str, float]:
        """This step's peak allocated and reserved device bytes (a GPU's; empty elsewhere)."""
        if self.backend.device.type != "cuda":
            return {}
        return {"peak_allocated": float(torch.cuda.max_memory_allocated(self.backend.device)),
                "peak_reserved": float(torch.cuda.max_memory_reserved(self.backend.device))}

    def log(self, result: StepResult) -> None:
        if self.step_clock is not None:  # the step's phase times, read back from the device once
            self.step_clock.settle()
        if self.backend.is_main:
            fields = asdict(result)
            phases, memory, heldout = fields.pop("phases"), fields.pop("memory"), fields.pop("heldout")
            fields["step"] += 1  # one numbering everywhere: step N is the N-th step, as the console counts
            record = {k if k == "step" else f"train/{k}": v for k, v in fields.items()}
            record |= {f"heldout/{k}": v for k, v in heldout.items()}
            record |= {f"time/{k}": v for k, v in phases.items()} | {f"memory/{k}": v for k, v in memory.items()}
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            self.trackers.log(record["step"], record)
            log.info(result.line(self.cfg.train.steps))

    def shows_progress(self, wanted: bool) -> bool:
        return wanted and self.backend.is_main  # rank 0 speaks for all

    def announce(self, what: str) -> None:
        """An info line as a long measurement begins: what, on how many held-out prompts (none: nothing to say)."""
        if self.backend.is_main and self.eval_prompts:
            log.info("%s on %d held-out prompts x %d samples", what, len(self.eval_prompts),
                     self.cfg.output.eval_samples_per_prompt)

    def note(self, message: str | None, level: int = logging.WARNING) -> None:
        if self.backend.is_main and message:
            log.log(level, message)

    def save(self) -> None:
        """Write the resumable state (every rank takes part; rank 0 writes the state file)."""
        s = self.state
        s.stop, s.scheduler = self.stop.state_dict(), self.scheduler.state_dict()
        s.trainable = self.backend.save_trainable(self.run_dir, self.policy, self.optimizer, self.stop.last_good)
        if self.backend.is_main:
            s.record_metrics(self.run_dir)
            s.save(self.run_dir)
        s.trainable = None  # the live objects hold it

    def due(self, every: int) -> bool:
        """Is this an every-N-steps moment (`output.save_every`, `output.checkpoint_every`; 0: never)? Not after
        the last step: the end of the run does its own."""
        step = self.state.next_step
        return bool(every) and step % every == 0 and step < self.cfg.train.steps

    def checkpoint(self) -> None:
        """`output.checkpoint_every`: the weights so far as a loadable checkpoint, RUN/checkpoint-N (OUT/checkpoint-N
        once the run has written OUT). Every rank gives its shards (FSDP); rank 0 writes."""
        state = self.backend.full_state(self.policy)
        if self.backend.is_main:
            folder = self.run_dir / f"checkpoint-{self.state.next_step}"
            write_checkpoint(folder, self.policy.student, state, mode=self.policy.mode, save=self.cfg.output.save,
                             save_dtype=self.save_dtype, base=self.cfg.model.path, tokenizer=self.tokenizer)
            self.state.checkpoints[folder.name] = folder_digest(folder)  # a resume checks it is as written
            log.info("wrote %s (loadable now; in %s at the end)", folder, self.cfg.output.out)
        self.backend.barrier()


