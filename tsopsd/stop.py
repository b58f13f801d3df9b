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

The rules own the rollback copy and the convergence window; both are part of the resumable state.
The copy holds the weights at the start of a step that passed, taken every `stop.rollback_every`
steps: every step for LoRA (a few MB, kept on the device), every 10th for full fine-tuning, where a
copy is every weight (16 GB for an 8B model in bf16, in host memory) and copying it each step would
cost more than the step's update. A rollback then returns to the newest copy, up to N-1 steps older
than the last step that passed; the stop reason says which.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tsopsd.config import StopConfig
from tsopsd.loss import ChunkStats


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
        self.target: float | None = None  # the target entropy a tracking run holds the student at

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
        steps = f"steps {step + 2 - len(self.window)}-{step + 1}"
        tol = self.cfg.entropy_tolerance
        if self.target is not None:
            if abs(mean_s - self.target) <= tol * self.target:
                return Verdict("converged", f"converged: student entropy {mean_s:.4f} within {tol:.0%} of the "
                                            f"target {self.target:.4f} over {steps}")
        elif mean_s >= mean_t * (1 - tol):
            return Verdict("converged", f"converged: student entropy {mean_s:.4f} within {tol:.0%} of the "
                                        f"teacher's {mean_t:.4f} over {steps}")
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
        return {"window": list(self.window), "last_good_step": self.last_good_step}

    def load_state_dict(self, state: dict) -> None:
        self.window = deque((tuple(w) for w in state["window"]), maxlen=self.cfg.window)
        self.last_good_step = state["last_good_step"]
