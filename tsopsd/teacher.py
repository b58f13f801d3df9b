"""The heated teacher: choosing tau and checking the teacher before training.

    tau = calibrate_temperature(teacher, rollout, target_entropy=2.1)
    check_teacher(teacher, rollout, tau)

The teacher is the checkpoint as loaded, frozen forever; its distribution is softmax(z0 / tau) with
z0 the model's own output logits (soft-capping and logit scaling included, see `scoring.head_logits`).
"""

from __future__ import annotations

import contextlib
import math

import torch

from tsopsd.batch import Rollout, position_ids_from_mask, prediction_mask
from tsopsd.distributions import entropy_sum_float64, mean_entropy, temperature_for_entropy
from tsopsd.errors import TsopsdError
from tsopsd.scoring import Scorer

# A checkpoint whose mean entropy at T=1 is this close to log V is untrained or broken.
NEAR_UNIFORM = 0.9
# A teacher this close to log V teaches noise: tau is too high.
TEACHER_NEAR_UNIFORM = 0.98


def calibrate_temperature(teacher: Scorer, rollout: Rollout, target_entropy: float, *, chunk_size: int = 1024) -> float:
    """The tau at which the teacher's mean entropy on `rollout`'s completion tokens equals the target."""
    with torch.no_grad():
        hidden = teacher.hidden(rollout)
    tau = temperature_for_entropy(hidden, teacher.logits, target_entropy, low=1.0, high=50.0, chunk_size=chunk_size,
                                  tol=1e-5)
    if tau is None:
        with torch.no_grad():
            h1 = mean_entropy(hidden, teacher.logits, 1.0, chunk_size=chunk_size)
        raise TsopsdError(f"target entropy {target_entropy:.4f} nats is not reachable with tau in [1, 50]: the "
                          f"checkpoint's entropy at T=1 is {h1:.4f} nats (a target must be higher than that)")
    return tau


@torch.no_grad()
def check_teacher(teacher: Scorer, rollout: Rollout, tau: float, *, measured_teacher_entropy: float | None = None,
                  dtype: torch.dtype = torch.float32, chunk_size: int = 512) -> dict[str, float]:
    """Guards at step 0, computed independently of the training path.

    Runs the model's own `forward` (its LM head and logit transforms; adapter disabled for LoRA) and
    computes, in float64, the mean entropy at T=1 and at tau on completion positions. Raises when the
    model is near uniform (random or broken weights), when the teacher at tau is near uniform, or when
    `measured_teacher_entropy` (what the training path computed) disagrees.

    Memory: one row at a time, cut after its last position of the chunk, and the logits of at most
    `chunk_size` positions per forward (`logits_to_keep`), so at most chunk_size x V logits (and their
    float64 copy) exist at once, never B x T x V. Each row's prefix runs once per chunk of its positions.
    """
    model = teacher.model
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
    with ctx:
        for b in range(r.input_ids.shape[0]):
            for s in range(max(first, 0), T - 1, step):
                keep = torch.arange(s, min(s + step, T - 1), device=r.input_ids.device)
                end = int(keep[-1]) + 1  # causal: nothing after the last kept position matters
                z = model(input_ids=r.input_ids[b:b + 1, :end], attention_mask=r.attention_mask[b:b + 1, :end],
                          position_ids=positions[b:b + 1, :end], logits_to_keep=keep, use_cache=False).logits[0]
                z = z[predict[b, keep]].double()  # (n, V), the positions that predict a completion token
                h1_sum += entropy_sum_float64(z, 1.0)
                h_tau_sum += entropy_sum_float64(z, tau)
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
