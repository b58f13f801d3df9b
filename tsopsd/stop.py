"""Stop rules: when a reheat run stops early, and what it keeps.

    rules = StopRules(cfg.stop)
    verdict = rules.check(step, stats, n_tokens)     # None: go on
    rules.passed(step, snapshot)                     # this step's starting weights passed every rule

Three rules, checked on every step's statistics (summed over ranks) before its update is applied:

- **non-finite**: a NaN/inf divergence. The run stops, keeps the last state that passed and exits 1.
- **drift**: top-1 agreement with the input on the step's rollouts below `stop.min_top1_agreement`:
  the current weights drifted; with `stop.rollback` the last state that passed is restored.
- **converged**: the student's mean entropy over the last `stop.window` steps reached the teacher's
  within `stop.entropy_tolerance` (with a target entropy: is within that tolerance of the target, on
  either side): the run is done; the current weights are kept.

A target run with held-out prompts is **steered** (`stop.heldout_every`): every N steps, before the
step, the held-out prompts are measured and the target the teacher is solved for on the *training*
rollouts (the training target) is set so that the held-out entropy meets the user's target:

    ratio = held-out entropy / training entropy (the last 3 steps), a running mean of its log
    training target = target / ratio                                       (clamped to 1/3x..3x the target)

The ratio compares the held-out prompts with the last 3 training steps, not the whole window, so it
barely lags a student that is still heating (a 10-step window mean lags it by 5 steps: on the demo the
first ratio came out 1.5 where it was about 1, and steered the wrong way). Such a run converges on the
held-out measurement: its 95% interval (on these prompts: their samples resampled) holds the target, is
no wider than +-2x `stop.heldout_tolerance` and its mean is within the tolerance; the training window
alone never stops it. A measurement too noisy to say does not stop it.

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


@dataclass(frozen=True)
class Verdict:
    """Why a run stops: which rule (nonfinite, drift, converged) and what it saw."""

    rule: str
    reason: str

    @property
    def failure(self) -> bool:
        """A guard stopped the run (exit 1; the last good state is written) rather than it finishing."""
        return self.rule in ("nonfinite", "drift")


class StopRules:
    def __init__(self, cfg: StopConfig, *, mode: str = "lora"):
        self.cfg = cfg
        self.every = cfg.rollback_every or (1 if mode == "lora" else 10)
        self.window: deque[tuple[float, float]] = deque(maxlen=cfg.window)  # (student, teacher) entropy
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
        agreement = stats.top1_agreement / n
        if agreement < self.cfg.min_top1_agreement:
            return Verdict("drift", f"drift guard: top-1 agreement {agreement:.3f} < {self.cfg.min_top1_agreement} "
                                    f"at step {step + 1}")
        self.window.append((stats.student_entropy / n, stats.teacher_entropy / n))
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

    def set_goal(self, goal: float | None, *, steering: bool) -> None:
        """The user's target (None: a fixed tau); the training target starts there unless a resume restored it."""
        self.goal, self.steering = goal, steering and goal is not None
        if self.target is None:
            self.target = goal

    def steers(self, step: int) -> bool:
        """Whether step `step` begins with a held-out measurement."""
        return self.steering and step > 0 and step % self.cfg.heldout_every == 0 and len(self.window) > 0

    def steer(self, step: int, heldout: float, interval: tuple[float, float] | None) -> Verdict | None:
        """Set the training target from the held-out entropy measured before step `step`; the verdict when the
        held-out measurement meets the goal."""
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
        inside = interval is not None and interval[0] <= self.goal <= interval[1]
        narrow = interval is not None and (interval[1] - interval[0]) / 2 <= 2 * tol * self.goal
        if inside and narrow and abs(heldout - self.goal) <= tol * self.goal:
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
                "log_ratio": self.log_ratio, "steered": list(self.steered)}

    def load_state_dict(self, state: dict) -> None:
        self.window = deque((tuple(w) for w in state["window"]), maxlen=self.cfg.window)
        self.last_good_step = state["last_good_step"]
        self.target, self.log_ratio = state["target"], state["log_ratio"]
        self.steered = (int(state["steered"][0]), state["steered"][1])
