"""The heated teacher: solving tau for a target entropy and checking the teacher before training.

    found = solve_temperature(teacher, [hidden], target=2.1, start=1.5)   # re-solved every step
    check_teacher(teacher, rollout, found.x)

The teacher is the checkpoint as loaded, frozen forever; its distribution is softmax(z0 / tau) with
z0 the model's own output logits (soft-capping and logit scaling included, see `scoring.head_logits`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from tsopsd.batch import Rollout, position_ids_from_mask, prediction_mask
from tsopsd.distributions import (
    Heat,
    Solution,
    entropy,
    entropy_sum_float64,
    entropy_sums,
    keep_plausible_,
    solve_increasing,
)
from tsopsd.errors import TsopsdError
from tsopsd.family import grouped_kv_attention
from tsopsd.scoring import Scorer

# A checkpoint whose mean entropy at T=1 is this close to log V is untrained or broken.
NEAR_UNIFORM = 0.9
# A teacher this close to log V teaches noise: tau is too high.
TEACHER_NEAR_UNIFORM = 0.98


# The range tau is solved in: below 1 the teacher would be colder than the checkpoint, above 50 it is noise.
TAU_RANGE = (1.0, 50.0)


def solve_temperature(teacher: Scorer, hidden: list[torch.Tensor | None], target: float, *, start: float,
                      total: Callable[[list[float]], list[float]] | None = None, chunk_size: int = 1024,
                      tol: float = 1e-4, max_iter: int = 50, heat: Heat | None = None) -> Solution:
    """The tau at which the teacher's mean entropy over the tokens of `hidden` equals `target`.

    Args:
        hidden: the teacher's (n, D) hidden states at completion positions, one per micro-batch (None
            for a skipped one): what the step computes anyway, so solving costs passes of the LM head
            only (two or three from the previous step's tau).
        start: where Newton's method starts (the previous step's tau).
        total: sums a list of floats over ranks (data-parallel runs solve on the whole step's tokens;
            every rank gets the same tau); None: this process's tokens only.
        tol: relative tolerance on the entropy.
        heat: a selective heat (`heat_masks`, `distributions.Heat`): tau is solved for the mean entropy of the
            teacher as the loss sees it.

    Returns:
        `distributions.Solution`: tau, the teacher's entropy there, evaluations, and whether the
        target was reached (False: it lies outside tau in `TAU_RANGE`; tau is the nearer bound).
    """
    keep = [i for i, h in enumerate(hidden) if h is not None]
    parts = [hidden[i] for i in keep]
    masks = [heat.masks[i] for i in keep] if heat is not None and heat.masks is not None else None
    min_p = heat.min_p if heat is not None else 0.0

    @torch.no_grad()
    def mean_and_slope(tau: float) -> tuple[float, float]:
        sums = entropy_sums(parts, teacher.logits, tau, chunk_size=chunk_size or 1024, heated=masks, min_p=min_p)
        h, slope, n = total(sums) if total is not None else sums
        if not n:  # no completion tokens anywhere: nothing to solve on, tau stays where it starts
            return target, 1.0
        return h / n, slope / n

    return solve_increasing(mean_and_slope, target, start=start, low=TAU_RANGE[0], high=TAU_RANGE[1],
                            tol=tol * max(target, 1e-6), max_iter=max_iter)


@torch.no_grad()
def heat_masks(teacher: Scorer, hidden: list[torch.Tensor | None], fraction: float, *,
               chunk_size: int = 1024) -> list[torch.Tensor | None]:
    """`teacher.heat: forking`: which completion positions the teacher heats, one bool per row of each micro-batch's
    (n, D) `hidden` (None stays None): the `fraction` of this step's positions where the original is least sure
    (highest entropy at T = 1, the "forking tokens" where a rollout branches); the others are taught the original
    as it is. On this process's positions (data-parallel ranks each take their own fraction)."""
    entropies = []
    for h in hidden:
        if h is None:
            entropies.append(None)
            continue
        step = chunk_size or max(h.shape[0], 1)
        entropies.append(torch.cat([entropy(teacher.logits(h[c:c + step])) for c in range(0, h.shape[0], step)])
                         if h.shape[0] else h.new_zeros(0))
    flat = torch.cat([e for e in entropies if e is not None] or [torch.zeros(0)])
    if not flat.numel():
        return [None if e is None else e.bool() for e in entropies]
    k = max(1, math.ceil(fraction * flat.numel()))
    threshold = flat.topk(k).values[-1]
    return [None if e is None else e >= threshold for e in entropies]


def unreachable(target: float, found: Solution) -> TsopsdError:
    """The error for a target that no tau in `TAU_RANGE` reaches on the first step's rollouts."""
    if found.x <= TAU_RANGE[0]:
        return TsopsdError(f"target entropy {target:.4f} nats is not reachable with tau in [1, 50]: the checkpoint's "
                           f"entropy at T=1 is {found.value:.4f} nats (a target must be higher than that)")
    return TsopsdError(f"target entropy {target:.4f} nats is not reachable with tau in [1, 50]: the teacher's "
                       f"entropy at tau = 50 is only {found.value:.4f} nats")


@torch.no_grad()
def check_teacher(teacher: Scorer, rollout: Rollout, tau: float, *, measured_teacher_entropy: float | None = None,
                  dtype: torch.dtype = torch.float32, chunk_size: int = 512, heat: Heat | None = None) -> dict[str, float]:
    """Guards at step 0, computed independently of the training path.

    Runs the model's own `forward` (its LM head and logit transforms; adapter disabled for LoRA) and
    computes, in float64, the mean entropy at T=1 and at tau on completion positions. Raises when the
    model is near uniform (random or broken weights), when the teacher at tau is near uniform, or when
    `measured_teacher_entropy` (what the training path computed) disagrees. A selective `heat` is applied here
    too: its masks (one bool per completion position, micro-batch after micro-batch, so in row order; T = 1 where
    False) and its min_p (the plausible set).

    Memory: one row at a time, cut after its last position of the chunk, and the logits of at most
    `chunk_size` positions per forward (`logits_to_keep`), so at most chunk_size x V logits (and their
    float64 copy) exist at once, never B x T x V. Each row's prefix runs once per chunk of its positions.
    """
    model = teacher.model
    heated = None if heat is None or heat.masks is None else \
        torch.cat([h for h in heat.masks if h is not None] or [torch.zeros(0, dtype=torch.bool)])
    min_p = heat.min_p if heat is not None else 0.0
    ctx = model.disable_adapter() if teacher.adapter_disabled else contextlib.nullcontext()
    r = rollout.to(teacher.device)
    predict = prediction_mask(r)
    positions = position_ids_from_mask(r.attention_mask)
    step = chunk_size or r.input_ids.shape[1]
    h1_sum = h_tau_sum = 0.0
    n, log_v = 0, None
    # Completion positions are predicted from columns [P - 1, T - 1). Every row runs the same number of
    # forwards whatever its length (ranks of a sharded model must run the same forwards).
    first, T = r.prompt_width - 1, r.input_ids.shape[1]
    with ctx, grouped_kv_attention(model, r.input_ids):
        for b in range(r.input_ids.shape[0]):
            for s in range(max(first, 0), T - 1, step):
                keep = torch.arange(s, min(s + step, T - 1), device=r.input_ids.device)
                end = int(keep[-1]) + 1  # causal: nothing after the last kept position matters
                z = model(input_ids=r.input_ids[b:b + 1, :end], attention_mask=r.attention_mask[b:b + 1, :end],
                          position_ids=positions[b:b + 1, :end], logits_to_keep=keep, use_cache=False).logits[0]
                z = z[predict[b, keep]].double()  # (n, V), the positions that predict a completion token
                h1_sum += entropy_sum_float64(z, 1.0)
                temps = tau if heated is None else \
                    torch.where(heated[n:n + z.shape[0]].to(z.device), tau, 1.0).double()[:, None]
                h_tau_sum += entropy_sum_float64(keep_plausible_(z, min_p) if min_p else z, temps)
                n, log_v = n + z.shape[0], math.log(z.shape[-1])
                del z
    if not n:  # no completion tokens: nothing to check
        return {"entropy_t1": 0.0, "entropy_tau": 0.0, "log_vocab": log_v or 0.0}
    h1, h_tau = h1_sum / n, h_tau_sum / n
    if h1 >= NEAR_UNIFORM * log_v:
        raise TsopsdError(f"the checkpoint is near uniform (mean entropy {h1:.3f} nats vs log V = {log_v:.3f}): "
                          "random or broken weights; there is nothing to reheat")
    if h_tau >= TEACHER_NEAR_UNIFORM * log_v:
        raise TsopsdError(f"tau = {tau:.3f} makes the teacher near uniform ({h_tau:.3f} nats vs log V = {log_v:.3f}): "
                          "choose a lower --temperature or --target-entropy")
    if measured_teacher_entropy is not None:
        tolerance = 1e-3 if dtype == torch.float32 else 2e-2
        if abs(measured_teacher_entropy - h_tau) > tolerance * max(h_tau, 1e-6) + 1e-6:
            raise RuntimeError(f"teacher check failed: training path gives entropy {measured_teacher_entropy:.6f}, "
                               f"the model's own forward gives {h_tau:.6f} at tau={tau:.4f}")
    return {"entropy_t1": h1, "entropy_tau": h_tau, "log_vocab": log_v}
