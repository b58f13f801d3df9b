"""The closed form of fixed-tau TS-OPSD (`teacher.method: scale`): the model whose logits are z0 / tau everywhere.

    what = scale_logits_(model, tau, original)      # a weight edit, from the untouched `original` copy
    error = check_scaled(model, teacher, ids, tau)  # max |tau * z' - z| / max |z| on real prompts
    tau, rows = solve_tau(edit, measure, target, [])  # tau for a target entropy, from the edited model's rollouts

With a divergence over the full vocabulary toward q_tau = softmax(z0 / tau), a student whose logits are z0 / tau
at every context has divergence 0 at every position: the loss's global optimum, reached by editing weights
instead of training. `scale_logits_` makes it, exactly, by family:
- a final norm with an affine weight (and bias), before a head without bias: the norm's output / tau (weight and
  bias / tau; a Gemma norm, which multiplies by 1 + weight, gets weight' = (1 + weight) / tau - 1);
- a norm without weight (OLMo) or a head with a bias (Phi): the head's weight and bias / tau, untied from the
  input embedding first where they share it;
- a soft-capped head (Gemma 2/3) also gets its cap / tau: (cap/tau) tanh((z/tau) / (cap/tau)) = cap tanh(z/cap) / tau.
Logit scales applied after the head (Cohere, Granite) are linear, so the edit before them carries through.
Every edit is checked on the module itself before it is kept, and the whole model after it (`check_scaled`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable

import torch

from tsopsd.errors import TsopsdError
from tsopsd.family import causal_lm, final_norm

log = logging.getLogger(__name__)

TAU_RANGE = (1 / 16, 64.0)  # where a target's solve may look
MAX_TRIES = 8  # measurements of the edited model a target's solve may take
CHECK_POSITIONS = 8  # positions per prompt whose logits `check_scaled` compares (4 x 8 x V, in float64)


@torch.no_grad()
def scale_logits_(model, tau: float, original) -> str:
    """Edit `model` in place so its logits are `original`'s / tau (`original`: an untouched copy with the same
    module names, the teacher; the edit starts from it, so solving tau may call this again; or `model` itself, to
    divide its logits by tau once more). Returns what was edited, in words. Raises TsopsdError for a family whose
    final layers it cannot edit exactly."""
    lm, src = causal_lm(model), causal_lm(original)
    head, src_head = lm.get_output_embeddings(), src.get_output_embeddings()
    cap = getattr(src.config, "final_logit_softcapping", None)
    if cap:
        lm.config.final_logit_softcapping = cap / tau
    norm, src_norm = final_norm(lm), final_norm(src)
    weight = getattr(norm, "weight", None) if norm is not None else None
    if weight is not None and getattr(head, "bias", None) is None and _scale_norm(norm, src_norm, tau):
        return f"final norm / {tau:.6g}" + (", soft cap / tau" if cap else "")
    if head is None or not hasattr(head, "weight"):
        raise TsopsdError(f"--method scale: {type(lm).__name__} has neither a final norm with a weight nor an LM "
                          "head to scale; use --method distill")
    emb = lm.get_input_embeddings()
    untied = emb is not None and head.weight is emb.weight
    if untied:  # the head gets its own copy of the shared matrix, then the edit
        head.weight = torch.nn.Parameter(src_head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        lm.config.tie_word_embeddings = False
        if hasattr(lm.config, "get_text_config"):
            lm.config.get_text_config().tie_word_embeddings = False
    head.weight.copy_(src_head.weight.to(head.weight.dtype) / tau)
    if getattr(head, "bias", None) is not None:
        head.bias.copy_(src_head.bias.to(head.bias.dtype) / tau)
    return (f"LM head / {tau:.6g}" + (" (untied from the input embedding)" if untied else "")
            + (", soft cap / tau" if cap else ""))


def _scale_norm(norm, src, tau: float) -> bool:
    """The final norm's output / tau: weight (and bias) / tau, or a Gemma norm's (1 + weight) / tau - 1, whichever
    the module computes (tried on a random input against the original's output / tau). False: neither (left as
    the original)."""
    x = torch.randn(4, src.weight.shape[-1], generator=torch.Generator().manual_seed(0)).to(src.weight)
    want = src(x).double() / tau
    weight = src.weight.detach().clone()  # `src` may be `norm` itself (an edit on top of an edit): kept first
    bias = src.bias.detach().clone() if getattr(src, "bias", None) is not None else None
    for kind in ("plain", "one plus"):
        w = weight / tau if kind == "plain" else (1 + weight.double()) / tau - 1
        norm.weight.copy_(w.to(norm.weight.dtype))
        if bias is not None:
            norm.bias.copy_(bias / tau)
        got = norm(x.to(norm.weight.dtype)).double()
        if torch.allclose(got, want, rtol=_rtol(norm.weight.dtype), atol=_rtol(norm.weight.dtype) * want.abs().max()):
            return True
    norm.weight.copy_(weight)
    if bias is not None:
        norm.bias.copy_(bias)
    return False


def _rtol(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


@torch.no_grad()
def check_scaled(model, original, ids: torch.Tensor, tau: float, *, compute=None) -> float:
    """Max |tau * z' - z| / max |z| over the next-token logits of the last CHECK_POSITIONS positions of `ids` (a
    batch of real prompts), z from
    `original`, z' from the edited `model`; raises TsopsdError past the dtype's rounding (a family the edit
    does not fit)."""
    keep = {"logits_to_keep": CHECK_POSITIONS}  # the last positions only: never B x T x V logits at a 150k vocabulary
    with compute or contextlib.nullcontext():
        edited = model(input_ids=ids, **keep).logits.double()
    plain = original(input_ids=ids, **keep).logits.double()
    error = float((edited * tau - plain).abs().max() / plain.abs().max().clamp_min(1e-12))
    dtype = next(causal_lm(original).parameters()).dtype
    if not math.isfinite(error) or error > _rtol(dtype):
        raise TsopsdError(f"--method scale: the edited model's logits x {tau:.4g} differ from the input's by "
                          f"{error:.2e} of their range ({type(causal_lm(model)).__name__}): the edit does not fit this "
                          "family; use --method distill")
    return error


def next_tau(tries: list[tuple[float, float]], target: float) -> float:
    """The next tau to measure, from (tau, entropy) measured so far, in the order measured: the secant of log
    entropy against log tau between the nearest measurements on either side of the target (bracketed; the
    bracket's middle instead when the last two landed on the same side, so a curve that saturates cannot stall
    the secant on one end), else from the nearest two (a slope of 2 while there is one: the entropy of a peaked
    distribution rises faster than tau)."""
    pts = sorted((math.log(t), math.log(max(h, 1e-9))) for t, h in tries)
    goal = math.log(target)
    below = [p for p in pts if p[1] < goal]
    above = [p for p in pts if p[1] >= goal]
    if below and above:
        (a, ha), (b, hb) = max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])
        stalled = len(tries) >= 3 and (tries[-1][1] < target) == (tries[-2][1] < target)
        x = (a + b) / 2 if stalled or hb == ha else a + (goal - ha) * (b - a) / (hb - ha)
    else:
        (a, ha) = min(pts, key=lambda p: abs(p[1] - goal))
        others = [p for p in pts if p[0] != a]
        slope = 2.0
        if others:
            b, hb = min(others, key=lambda p: abs(p[0] - a))
            if (hb - ha) * (b - a) > 0:
                slope = (hb - ha) / (b - a)
        x = a + max(-math.log(4), min(math.log(4), (goal - ha) / slope))  # at most x4 a try
    return float(min(max(math.exp(x), TAU_RANGE[0]), TAU_RANGE[1]))


def solve_tau(edit: Callable[[float], None], measure: Callable[[], dict], target: float,
              tries: list[tuple[float, float]]) -> tuple[float, list[dict]]:
    """tau for `target`: `edit(tau)` makes the model's logits the input's / tau, `measure()` gives {"entropy", "low",
    "high"} of the edited model's own rollouts. From the (tau, entropy) already known (the input at tau = 1, where it
    was measured), `next_tau` steps until a measurement's 95% interval holds the target, at most MAX_TRIES, or there
    is nowhere new to look. The tau nearest the target is left applied. Returns (tau, one row per measurement)."""
    tries, rows = list(tries), []
    tau = next_tau(tries, target) if tries else 1.5
    for _ in range(MAX_TRIES):
        edit(tau)
        m = measure()
        rows.append({"tau": tau, "entropy": m["entropy"], "low": m["low"], "high": m["high"]})
        log.info("closed form: tau %.4f gives held-out entropy %.4f (%.4f-%.4f); target %.4f", tau, m["entropy"],
                 m["low"], m["high"], target)
        if m["low"] <= target <= m["high"]:
            return tau, rows
        tries.append((tau, m["entropy"]))
        tau = next_tau(tries, target)
        if any(math.isclose(tau, t, rel_tol=1e-3) for t, _ in tries):  # nowhere new to look (at the range's edge)
            break
    best = min(rows, key=lambda r: abs(r["entropy"] - target))
    if best is not rows[-1]:
        edit(best["tau"])
    return best["tau"], rows


def solve_scale(run, before: dict | None) -> tuple[float, list[dict]]:
    """`solve_tau` for the run's target on its held-out prompts (to `teacher.precision`), the student edited from the
    frozen teacher's weights."""
    student, teacher = run.policy.student, run.policy.teacher.model

    def measure() -> dict:
        m = run.evaluate(precision=run.cfg.teacher.precision or None, warn_wide=False)
        h = m["entropy"]["mean"]
        lo, hi = m["intervals"].get("entropy_these_prompts") or m["intervals"]["entropy"] or (h, h)
        return {"entropy": h, "low": lo, "high": hi}

    known = [(1.0, before["entropy"]["mean"])] if before is not None else []  # the input itself: tau = 1
    return solve_tau(lambda tau: scale_logits_(student, tau, teacher), measure, run.state.target, known)
