"""Reheat inside a TRL run: `ReheatCallback`, a `transformers.TrainerCallback` for `GRPOTrainer` (or any Trainer).

    from tsopsd.integrations.trl import ReheatCallback
    trainer = GRPOTrainer(model=..., ..., callbacks=[ReheatCallback(held_out_prompts, every=10)])

Every `every` optimizer steps it measures the policy in memory on its own held-out prompts (`measure_entropy`: the
policy's own rollouts at T=1, mean token entropy with a 95% interval; torch's random state is put back after, so the
run samples what it would have without the callback). The trainer's own logged `entropy` is kept beside them.
The collapse rule, in words: **`consecutive` measurements in a row below `ratio` x the entropy at the run's start
(or below `min_entropy` nats)**. When it fires,
at most `max_reheats` times a run and not within `cooldown` steps of the last, it reheats the policy in place with
the closed form (`tsopsd.closed_form`: the final norm, or the head, / tau), tau solved on the held-out prompts
until a measurement's 95% interval holds the target (default: the entropy at the run's start). Why the closed form
here: it is the exact optimum of fixed-tau TS-OPSD, it takes a few measurements and no optimizer, and in the lab its
heat survived continued RL better than a trained reheat's (docs/lab.md, "Why train?").

What it keeps consistent:
- **The optimizer**: the Adam moments of every parameter the edit changed are reset (zeroed, step kept): they
  were accumulated for the old scale of that parameter, and a moment ten times too large would undo the edit on
  the next steps. Other parameters keep theirs.
- **A PEFT policy** (LoRA): the edit goes into the base model's final norm (or head), frozen and outside the
  adapter: the policy in memory is reheated, but an adapter saved from it does not hold the heat. Save the merged
  model (`merge_and_unload()`) to keep it; the callback logs this once.
- **The reference model** (GRPO's beta > 0) is left as it is: the KL term keeps pulling toward the run's start.
- **vLLM generation** (`use_vllm`): TRL loads the policy's weights into vLLM whenever `global_step` changed since
  the last load; the reheat happens in `on_step_end`, after the step's update, so the next generation loads it.
- **Gradient accumulation**: `on_step_end` runs after an optimizer step, never between micro-batches.

It logs `tsopsd/entropy` (with `tsopsd/entropy_low`, `_high`), `tsopsd/reheats` and `tsopsd/tau` into the
trainer's `state.log_history`, and one line per reheat to the `tsopsd` logger. Cost when nothing fires: one
held-out measurement every `every` steps (`bench/callback_overhead.py` measures it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import TrainerCallback

from tsopsd.closed_form import scale_logits_, solve_tau
from tsopsd.errors import TsopsdError
from tsopsd.family import causal_lm
from tsopsd.trajectory import collapse_point

log = logging.getLogger("tsopsd")


class ReheatCallback(TrainerCallback):
    """See the module's docstring.

    Args:
        prompts: held-out prompts (strings, tokenized as they are): the rule and the solve measure on these.
        every: measure every this many optimizer steps.
        ratio, min_entropy, consecutive: the collapse rule.
        target_entropy: the reheat's target in nats (default: the entropy measured at the run's start).
        cooldown: steps after a reheat before the next may fire; max_reheats: per run.
        samples_per_prompt, max_new_tokens, precision: each measurement (`tsopsd.measure_entropy`).
        method: "scale" (the closed form, default) or "distill" (a short TS-OPSD run in place, plain models only;
            `config` and `overrides` as `tsopsd.reheat` takes them).
    """

    def __init__(self, prompts: Sequence[str], *, every: int = 10, ratio: float = 0.5, min_entropy: float | None = None,
                 consecutive: int = 2, target_entropy: float | None = None, cooldown: int = 50, max_reheats: int = 3,
                 samples_per_prompt: int = 4, max_new_tokens: int = 256, precision: float | None = 0.1, seed: int = 0,
                 method: str = "scale", config: str | None = None, overrides: dict | None = None):
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise TsopsdError("ReheatCallback: prompts must be a non-empty list of non-empty strings")
        if every < 1 or consecutive < 1 or cooldown < 0 or max_reheats < 0 or not 0 < ratio < 1:
            raise TsopsdError("ReheatCallback: every and consecutive must be >= 1, cooldown and max_reheats >= 0, "
                              "ratio in (0, 1)")
        self.prompts, self.every, self.ratio, self.min_entropy = list(prompts), every, ratio, min_entropy
        self.consecutive, self.target, self.cooldown, self.max_reheats = consecutive, target_entropy, cooldown, max_reheats
        if method not in ("scale", "distill"):
            raise TsopsdError(f"ReheatCallback: method must be 'scale' or 'distill', got {method!r}")
        self.method, self.config, self.overrides = method, config, dict(overrides or {})
        self.measure_kw = {"samples_per_prompt": samples_per_prompt, "max_new_tokens": max_new_tokens,
                           "precision": precision, "seed": seed}
        self.start: float | None = None
        self.since: list[float] = []  # held-out entropies measured since the start or the last reheat
        self.reheats: list[dict] = []
        self.tau = 1.0  # the policy's logits are the trained weights' / tau since the last reheat
        self.train_entropy: list[tuple[int, float]] = []  # (step, the trainer's logged entropy)

    # ---- measurements ----
    def measure(self, model, tokenizer) -> dict:
        from tsopsd.api import measure_entropy

        m = measure_entropy(model, self.prompts, tokenizer=tokenizer, **self.measure_kw)  # train/eval put back
        lo, hi = m["intervals"]["entropy"] or (m["entropy"]["mean"],) * 2
        return {"entropy": m["entropy"]["mean"], "low": lo, "high": hi}

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.method == "distill" and hasattr(model, "peft_config"):
            raise TsopsdError("ReheatCallback(method='distill') trains the whole policy in place and cannot take a PEFT "
                              "model: use method='scale' (the closed form)")
        if self.start is None:
            self.start = self.measure(model, processing_class)["entropy"]
            self._log(state, {"tsopsd/entropy": self.start, "tsopsd/reheats": 0})
            log.info("ReheatCallback: entropy at the start %.4f nats; collapse: below %s, %d measurement(s) in a row",
                     self.start, self._floor_words(), self.consecutive)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """The trainer's own `entropy` (GRPO logs its rollouts' mean token entropy): kept beside the held-out
        measurements and said in the reheat's log line. It is measured on training rollouts at the run's sampling
        temperature, without an interval, so the rule decides on the held-out measurements only."""
        if logs and isinstance(logs.get("entropy"), (int, float)):
            self.train_entropy.append((state.global_step, float(logs["entropy"])))

    def on_step_end(self, args, state, control, model=None, optimizer=None, processing_class=None, **kwargs):
        if state.global_step % self.every:
            return
        m = self.measure(model, processing_class)
        self._log(state, {"tsopsd/entropy": m["entropy"], "tsopsd/entropy_low": m["low"],
                          "tsopsd/entropy_high": m["high"], "tsopsd/reheats": len(self.reheats)})
        self.since.append(m["entropy"])
        last = self.reheats[-1]["step"] if self.reheats else None
        fired = collapse_point([self.start, *self.since], self.ratio, min_entropy=self.min_entropy,
                               consecutive=self.consecutive) is not None
        if not fired or len(self.reheats) >= self.max_reheats or \
                (last is not None and state.global_step - last < self.cooldown):
            return
        target = self.target if self.target is not None else self.start
        reheat = self.reheat if self.method == "scale" else self.distill
        record = reheat(model, processing_class, optimizer, target, m["entropy"])
        record["step"] = state.global_step
        self.reheats.append(record)
        self.since = []
        self._log(state, {"tsopsd/entropy": record["entropy"], "tsopsd/entropy_low": record["low"],
                          "tsopsd/entropy_high": record["high"], "tsopsd/tau": record["tau"],
                          "tsopsd/reheats": len(self.reheats)})
        trained = f"; the trainer's own entropy {self.train_entropy[-1][1]:.4f}" if self.train_entropy else ""
        log.info("ReheatCallback: step %d: held-out entropy %.4f below %s%s; reheated (" + self.method + ", tau %.3f): %.4f "
                 "(%.4f-%.4f), target %.4f", state.global_step, m["entropy"], self._floor_words(), trained, record["tau"],
                 record["entropy"], record["low"], record["high"], target)

    def _floor_words(self) -> str:
        return f"{self.ratio:g} x the start's ({self.ratio * (self.start or 0):.4f})" + (
            f" or {self.min_entropy:g} nats" if self.min_entropy else "")

    # ---- the reheat ----
    @torch.no_grad()
    def reheat(self, model, tokenizer, optimizer, target: float, now: float) -> dict:
        """The closed form in place, tau solved on the held-out prompts; the changed parameters' moments reset."""
        if hasattr(model, "peft_config") and not self.reheats:
            log.warning("ReheatCallback: a PEFT policy: the heat goes into the base model's final norm (or head), "
                        "outside the adapter; save the merged model to keep it")
        before = {id(p): (float(p.detach().float().sum()), float(p.detach().float().norm())) for p in model.parameters()}
        lm, applied = causal_lm(model), [1.0]

        def edit(tau: float) -> None:  # on top of what is there: no copy of the model
            scale_logits_(lm, tau / applied[0], lm)
            applied[0] = tau

        tau, rows = solve_tau(edit, lambda: self.measure(model, tokenizer), target, [(1.0, now)])
        m = next(r for r in rows if r["tau"] == tau)
        changed = [p for p in model.parameters() if before.get(id(p)) != (float(p.detach().float().sum()),
                                                                           float(p.detach().float().norm()))]
        reset = 0
        if optimizer is not None:
            for p in changed:
                state = optimizer.state.get(p)
                for key in ("exp_avg", "exp_avg_sq"):
                    if state is not None and key in state:
                        state[key].zero_()
                        reset += 1
        self.tau *= tau
        return {"tau": tau, "entropy": m["entropy"], "low": m["low"], "high": m["high"], "target": target,
                "measurements": len(rows), "parameters_changed": len(changed), "moments_reset": reset}

    def distill(self, model, tokenizer, optimizer, target: float, now: float) -> dict:
        """A short TS-OPSD run on the policy in place (`tsopsd.reheat` on the model in memory, full mode), to the
        target on the held-out prompts; every Adam moment reset, since every weight moved."""
        from tsopsd.api import reheat

        keys = {"train.mode": "full", "output.save": "merged", "teacher.temperature": None,
                "teacher.target_entropy": target, "teacher.target_entropy_from": None,
                "rollout.max_new_tokens": self.measure_kw["max_new_tokens"], "seed": self.measure_kw["seed"]}
        report = reheat(model, self.prompts, tokenizer=tokenizer, config=self.config, overrides=keys | self.overrides)
        reset = 0
        for state in (optimizer.state.values() if optimizer is not None else ()):
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key].zero_()
                    reset += 1
        m = self.measure(model, tokenizer)
        return {"tau": report["teacher_temperature"], "entropy": m["entropy"], "low": m["low"], "high": m["high"],
                "target": target, "steps": report["steps_run"], "status": report["status"],
                "parameters_changed": sum(1 for _ in model.parameters()), "moments_reset": reset}

    @staticmethod
    def _log(state, values: dict) -> None:
        state.log_history.append({**values, "step": state.global_step})
