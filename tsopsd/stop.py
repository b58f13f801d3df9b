"""Stop rules: when a reheat run stops early, and what it keeps.

    rules = StopRules(cfg.stop)
    verdict = rules.check(step, stats, n_tokens)     # None: go on
    rules.passed(step, snapshot)                     # this step's starting weights passed every rule

Three rules, checked on every step's statistics (summed over ranks) before its update is applied:

- **non-finite**: a NaN/inf divergence. The run stops, keeps the last state that passed and exits 5.
- **drift**: top-1 agreement with the input below `stop.min_top1_agreement`, on evidence: the agreement
  pooled over the completion tokens of the last `stop.window` steps, with a 95% (Wilson) upper bound below
  the threshold, so that one token of a short step never stops a run. The current weights drifted;
  with `stop.rollback` the last state that passed is restored. The stop reason gives the evidence.
- **converged**: the student's mean entropy over the last `stop.window` steps reached the teacher's
  within `stop.entropy_tolerance` (with a target entropy: is within that tolerance of the target, on
  either side): the run is done; the current weights are kept.

A target run with held-out prompts is **steered** (`stop.heldout_every`): every N steps, before the
step, the held-out prompts are measured and the target the teacher is solved for on the *training*
rollouts (the training target) is set so that the held-out entropy meets the user's target:

    ratio = held-out entropy / training entropy (the last 3 steps), a running mean of its log
    training target = target / ratio                                       (clamped to 1/3x..3x the target)

The ratio compares the held-out prompts with the last 3 training steps, not the whole window, so it
barely lags a student that is still heating (a window mean lags it by half the window and steers the
wrong way). Such a run converges on the held-out measurement: one whose mean comes within 2x
`stop.heldout_tolerance` of the target is sampled on (up to 4x the samples, until its interval is within
the tolerance), and the run stops when that measurement's 95% interval (on these prompts: their samples
resampled) holds the target and its mean is within the tolerance. The training window alone never stops
it: a few samples a prompt can miss a prompt's rare hot completions, and their interval cannot show it.

**Pace** (`train.max_lr_factor`): the learning rate given is where a run starts, not a promise that it
moves the model. Every `stop.window` steps the student's entropy gap (1 - student / teacher entropy on
the step's rollouts: the teacher's is the training target when tau is solved) over the last window is
compared with the window before (windows after `train.warmup_steps`: a lr still ramping up looks stalled).
When the gap closed more slowly than the rate that would bring it within
`stop.entropy_tolerance` in half the steps left, and the student has not yet closed half of the first
window's gap, the learning rate doubles, up to `max_lr_factor` x the given one (an lr that moves the model
is kept: later windows are noisier, steering moves the target, and raising on them thrashes). When the
student ran hotter than the teacher two windows running (an overshoot, not one noisy window), it halves,
down to the given one. A small model barely moved by a LoRA lr that suits 4B finds its lr this way; a model
that the given lr moves fast enough keeps it. The factor is part of the resumable state.

The rules own the rollback copy and the convergence window; both are part of the resumable state.
The copy holds the weights at the start of a step that passed, taken every `stop.rollback_every`
steps: every step for LoRA (a few MB, kept on the device), every 10th for full fine-tuning, where a
copy is every weight (16 GB for an 8B model in bf16, in host memory) and copying it each step would
cost more than the step's update. A rollback then returns to the newest copy, up to N-1 steps older
than the last step that passed; the stop reason says which.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from tsopsd.config import StopConfig
from tsopsd.loss import ChunkStats

RECENT = 3  # training steps whose student entropy the held-out measurement is compared with (lag against noise)
Z95 = 1.959964  # the normal quantile of a two-sided 95% interval


def wilson_upper(successes: float, trials: float, z: float = Z95) -> float:
    """The upper end of the Wilson score interval of a proportion (1.0 with no trials)."""
    if trials <= 0 or successes >= trials:  # none seen, or all agree: nothing bounds it below 1 (and no rounding)
        return 1.0
    p = successes / trials
    centre = p + z * z / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return min(1.0, (centre + spread) / (1 + z * z / trials))


@dataclass(frozen=True)
class Verdict:
    """Why a run stops: which rule (nonfinite, drift, converged) and what it saw."""

    rule: str
    reason: str

    @property
    def failure(self) -> bool:
        """A guard stopped the run (exit 5; the last good state is written) rather than it finishing."""
        return self.rule in ("nonfinite", "drift")


class StopRules:
    def __init__(self, cfg: StopConfig, *, mode: str = "lora", steps: int = 0, max_lr_factor: float = 1.0,
                 warmup: int = 0):
        self.cfg = cfg
        self.every = cfg.rollback_every or (1 if mode == "lora" else 10)
        self.window: deque[tuple[float, float]] = deque(maxlen=cfg.window)  # (student, teacher) entropy
        self.agreement: deque[tuple[float, float]] = deque(maxlen=cfg.window)  # (agreeing tokens, tokens) a step
        self.gaps: deque[float] = deque(maxlen=2 * cfg.window)  # 1 - student / teacher entropy, a step
        self.steps, self.max_lr_factor, self.warmup = steps, max_lr_factor, warmup  # pace judges windows after warm-up
        self.lr_factor = 1.0  # x the given learning rate (pace)
        self.first_gap: float | None = None  # the mean gap of the first window (pace raises until half of it is closed)
        self.paced: list[dict] = []  # each raise: step, factor, the gap closed and the rate needed
        self.last_good: dict | None = None  # trainable weights at the start of the last step that passed
        self.last_good_step = 0  # ...which are the weights after this many updates
        self.target: float | None = None  # the training target: what tau is solved for on the training rollouts
        self.goal: float | None = None  # the user's target entropy (a steered run meets it on held-out prompts)
        self.steering = False  # a target run with held-out prompts and stop.heldout_every > 0
        self.log_ratio: float | None = None  # running mean of log(held-out entropy / training entropy)
        self.steered = (-1, None)  # (the step last steered, log_ratio before it): steering a step twice is one steer

    def check(self, step: int, stats: ChunkStats, n_tokens: int) -> Verdict | None:
        """The verdict on step `step` (0-based) from its summed statistics, or None to go on."""
        n = max(n_tokens, 1)
        if stats.nonfinite:
            return Verdict("nonfinite", f"non-finite loss at step {step + 1}")
        if (drift := self._drift(step, stats.top1_agreement, float(n_tokens))) is not None:
            return drift
        self.window.append((stats.student_entropy / n, stats.teacher_entropy / n))
        teacher = stats.teacher_entropy / n
        self.gaps.append(1 - (stats.student_entropy / n) / teacher if teacher > 0 else 0.0)
        mean_s = sum(h for h, _ in self.window) / len(self.window)
        mean_t = sum(h for _, h in self.window) / len(self.window)
        if len(self.window) < self.cfg.window:
            return None
        if self.steering:  # converges on the held-out measurement (`steer`), not here
            return None
        steps = f"the rollouts of the weights after {step + 1 - len(self.window)}-{step} updates"
        tol = self.cfg.entropy_tolerance
        if self.target is not None:
            if abs(mean_s - self.target) <= tol * self.target:
                return Verdict("converged", f"converged: student entropy {mean_s:.4f} within {tol:.0%} of the "
                                            f"target {self.target:.4f} over {steps}")
        elif mean_s >= mean_t * (1 - tol):
            return Verdict("converged", f"converged: student entropy {mean_s:.4f} within {tol:.0%} of the "
                                        f"teacher's {mean_t:.4f} over {steps}")
        return None

    def _drift(self, step: int, agreeing: float, tokens: float) -> Verdict | None:
        """The drift verdict: top-1 agreement pooled over the last `window` steps' tokens (this one included) whose
        95% upper bound is below the threshold; None while the evidence does not say so."""
        pooled = [*self.agreement, (agreeing, tokens)][-self.cfg.window:]
        hits, trials = sum(a for a, _ in pooled), sum(t for _, t in pooled)
        upper, threshold = wilson_upper(hits, trials), self.cfg.min_top1_agreement
        if trials > 0 and upper < threshold:
            first = step + 2 - len(pooled)
            steps = f"step {step + 1}" if len(pooled) == 1 else f"steps {first}-{step + 1}"
            return Verdict("drift", f"drift guard: top-1 agreement with the input {hits / trials:.3f} (95% upper bound "
                                    f"{upper:.3f}) < {threshold} over the {int(trials)} completion tokens of {steps}")
        self.agreement.append((agreeing, tokens))
        return None

    def pace(self, step: int) -> str | None:
        """After step `step` passed: double the learning-rate factor when the entropy gap closes too slowly to
        meet the tolerance in half the steps left (see the module docstring); a line saying why, or None."""
        w, tol = self.cfg.window, self.cfg.entropy_tolerance
        if (step + 1) % w or step + 1 < self.warmup + 2 * w:  # two whole windows, both after the warm-up
            return None
        gaps = list(self.gaps)
        before, now = sum(gaps[:w]) / w, sum(gaps[w:]) / w
        if now < -tol and before < -tol and self.lr_factor > 1:  # hotter than the teacher two windows running
            self.lr_factor /= 2
            self.paced.append({"step": step + 1, "factor": self.lr_factor, "closed": None, "needed": None})
            return (f"learning rate x{self.lr_factor:g} from step {step + 2}: the student ran {-now:.1%} hotter than "
                    f"the teacher over the last {w} steps, and the {w} before")
        if self.first_gap is None:
            self.first_gap = before
        if now <= tol or before <= 0 or self.lr_factor * 2 > self.max_lr_factor or now < self.first_gap / 2:
            return None  # arrived, or moving: past half of the first gap the lr that moved it stays
        left = max((self.steps - step - 1) / 2, w)
        needed = 1 - (tol / now) ** (w / left)  # the share of the gap a window must close to arrive in time
        closed = (before - now) / before
        if closed >= needed:
            return None
        self.lr_factor *= 2
        self.paced.append({"step": step + 1, "factor": self.lr_factor, "closed": closed, "needed": needed})
        return (f"learning rate x{self.lr_factor:g} from step {step + 2}: the entropy gap ({now:.1%} of the teacher's) "
                f"closed {closed:.0%} over the last {w} steps, {needed:.0%} a window is needed to meet it in time "
                f"(train.max_lr_factor {self.max_lr_factor:g})")

    def set_goal(self, goal: float | None, *, steering: bool) -> None:
        """The user's target (None: a fixed tau); the training target starts there unless a resume restored it."""
        self.goal, self.steering = goal, steering and goal is not None
        if self.target is None:
            self.target = goal

    def steers(self, step: int) -> bool:
        """Whether step `step` begins with a held-out measurement."""
        return self.steering and step > 0 and step % self.cfg.heldout_every == 0 and len(self.window) > 0

    def near_goal(self, heldout: float) -> bool:
        """A held-out measurement near the goal (mean within 2x the tolerance): a stop is decided on more samples
        (a few samples a prompt can miss a prompt's rare hot completions, and their interval cannot show it)."""
        return self.goal is not None and abs(heldout - self.goal) <= 2 * self.cfg.heldout_tolerance * self.goal

    def steer(self, step: int, heldout: float, interval: tuple[float, float] | None,
              refined: bool = False) -> Verdict | None:
        """Set the training target from the held-out entropy measured before step `step`; the verdict when the
        held-out measurement meets the goal. `refined`: the measurement was near the goal and sampled on
        (`near_goal`); only such a measurement can stop the run."""
        if self.steered[0] != step:
            self.steered = (step, self.log_ratio)
        before = self.steered[1]
        recent = list(self.window)[-RECENT:]  # the newest steps: near the weights the held-out prompts saw
        training = sum(h for h, _ in recent) / len(recent)
        if heldout > 0 and training > 0:
            now = math.log(heldout / training)
            self.log_ratio = now if before is None else (before + now) / 2
            self.target = min(max(self.goal / math.exp(self.log_ratio), self.goal / 3), 3 * self.goal)
        tol = self.cfg.heldout_tolerance
        if not refined:  # only a measurement `near_goal` sampled on can stop the run
            return None
        inside = interval is not None and interval[0] <= self.goal <= interval[1]
        if inside and abs(heldout - self.goal) <= tol * self.goal:
            return Verdict("converged", f"converged: held-out entropy {heldout:.4f} ({interval[0]:.4f}-"
                                        f"{interval[1]:.4f}, 95%) holds the target {self.goal:.4f} within {tol:.0%} "
                                        f"after {step} steps (training target {self.target:.4f})")
        return None

    def wants_snapshot(self, step: int) -> bool:
        """Whether step `step` (0-based, about to be applied) takes the rollback copy."""
        return self.cfg.rollback and step % self.every == 0

    def passed(self, step: int, snapshot: dict | None) -> None:
        """Step `step` passed every rule; `snapshot` copies the weights it started from (None: rollback is off)."""
        if snapshot is not None:
            self.last_good, self.last_good_step = snapshot, step

    def apply(self, verdict: Verdict, policy, steps_done: int) -> tuple[str, int]:
        """Restore what the verdict asks for.

        Returns the stop reason, saying what was kept, and how many updates the kept weights have.
        """
        if verdict.rule == "converged":
            return f"{verdict.reason}; kept the current weights", steps_done
        if self.last_good is not None:
            policy.load_trainable_state(self.last_good)
            kept = "the input weights" if self.last_good_step == 0 else f"the weights after step {self.last_good_step}"
            return f"{verdict.reason}; rolled back to {kept}, the last state that passed", self.last_good_step
        if steps_done == 0:
            return f"{verdict.reason}; kept the input weights (no update was applied)", 0
        return f"{verdict.reason}; kept the current weights (stop.rollback is off: no copy to restore)", steps_done

    def state_dict(self) -> dict:
        return {"window": list(self.window), "last_good_step": self.last_good_step, "target": self.target,
                "log_ratio": self.log_ratio, "steered": list(self.steered), "agreement": list(self.agreement),
                "gaps": list(self.gaps), "lr_factor": self.lr_factor, "paced": self.paced,
                "first_gap": self.first_gap}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s values, each checked for form first (ValueError names the first that is not)."""
        real = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        pairs = lambda v: isinstance(v, list) and all(isinstance(p, (list, tuple)) and len(p) == 2  # noqa: E731
                                                      and all(map(real, p)) for p in v)
        forms = {"window": pairs, "agreement": pairs, "gaps": lambda v: isinstance(v, list) and all(map(real, v)),
                 "last_good_step": lambda v: type(v) is int and v >= 0, "target": lambda v: v is None or real(v),
                 "log_ratio": lambda v: v is None or real(v), "first_gap": lambda v: v is None or real(v),
                 "lr_factor": real, "paced": lambda v: isinstance(v, list) and all(isinstance(p, dict) for p in v),
                 "steered": lambda v: isinstance(v, list) and len(v) == 2 and type(v[0]) is int
                 and (v[1] is None or real(v[1]))}
        off = next((k for k, ok in forms.items() if k not in state or not ok(state[k])), None)
        if off is not None:
            raise ValueError(f"the stop rules' {off} is out of form")
        self.window = deque((tuple(w) for w in state["window"]), maxlen=self.cfg.window)
        self.last_good_step = state["last_good_step"]
        self.target, self.log_ratio = state["target"], state["log_ratio"]
        self.steered = (int(state["steered"][0]), state["steered"][1])
        self.agreement = deque((tuple(a) for a in state["agreement"]), maxlen=self.cfg.window)
        self.gaps = deque(state["gaps"], maxlen=2 * self.cfg.window)
        self.lr_factor, self.paced = float(state["lr_factor"]), list(state["paced"])
        self.first_gap = state["first_gap"]


def judge(*, target: float | None, tolerance: float, heldout: dict | None, stop_reason: str) -> dict:
    """Whether a finished run met its goal, and on what evidence.

    A target run with held-out prompts meets it when the after-report's 95% interval on those prompts overlaps
    target x (1 +- `tolerance`) (`stop.heldout_tolerance`) and its mean is within twice the tolerance: the
    measurement cannot tell it from a run that met it, and its point is near (a run stops on a measurement
    within the tolerance; the after-report samples anew, so its mean may land a little further). A fixed-tau
    closed form (`--method scale`) meets it by construction (its logits are checked). Any other run meets it when a
    stop rule saw it converge (the student's entropy reached the teacher's, or the target,
    over the training window); a run that used every step without that did not.

    Returns:
        {"met": bool, "evidence": str, "advice": str (what to change first; "" when met)}.
    """
    if target is not None and heldout is not None:
        h = heldout["entropy"]["mean"]
        lo, hi = heldout["intervals"].get("entropy_these_prompts") or heldout["intervals"]["entropy"] or (h, h)
        band = (target * (1 - tolerance), target * (1 + tolerance))
        met = lo <= band[1] and hi >= band[0] and abs(h - target) <= 2 * tolerance * target
        evidence = (f"held-out entropy {h:.4f} ({lo:.4f}-{hi:.4f}, 95%) is {(h - target) / target:+.1%} of the target "
                    f"{target:.4f}; an interval reaching within {tolerance:.0%} and a mean within "
                    f"{2 * tolerance:.0%} needed")
        below = h < target
    else:
        met = stop_reason.startswith(("converged", "closed form"))  # a closed form is exact, and checked
        evidence = stop_reason if met else (f"{stop_reason}, and the student's entropy never came within "
                                            "stop.entropy_tolerance of its teacher's over stop.window steps")
        below = True
    if met:
        return {"met": True, "evidence": evidence, "advice": ""}
    advice = ("give it more steps (--steps: a budget; a run stops when it meets the goal) or a larger --lr / "
              "train.max_lr_factor" if below else
              "it overshot the target: lower --lr or train.max_lr_factor")
    return {"met": False, "evidence": evidence, "advice": advice}
