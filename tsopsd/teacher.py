"""The heated teacher: choosing tau and checking the teacher before training.

    tau = calibrate_temperature(teacher, rollout, target_entropy=2.1)
    check_teacher(teacher, rollout, tau)

The teacher is the checkpoint as loaded, frozen forever; its distribution is softmax(z0 / tau) with
z0 the model's own output logits (soft-capping and logit scaling included, see `scoring.head_logits`).
"""

from __future__ import annotations

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
                  dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Guards at step 0, computed independently of the training path.

    Runs the model's own `forward` (full logits, adapter disabled for LoRA) on `rollout` and computes,
    in float64, the mean entropy at T=1 and at tau on completion positions. Raises when the model is
    near uniform (random or broken weights), when the teacher at tau is near uniform, or when
    `measured_teacher_entropy` (what the training path computed) disagrees.
    """
    model = teacher.model
    ctx = model.disable_adapter() if teacher.adapter_disabled else torch.no_grad()
    r = rollout.to(teacher.device)
    with ctx:
        logits = model(input_ids=r.input_ids, attention_mask=r.attention_mask,
                       position_ids=position_ids_from_mask(r.attention_mask)).logits
    z = logits[prediction_mask(r)].double()  # (N, V)
    del logits
    n = max(z.shape[0], 1)
    h1 = entropy_sum_float64(z, 1.0) / n
    h_tau = entropy_sum_float64(z, tau) / n
    log_v = math.log(z.shape[-1])
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
