"""Per-token divergences between the heated teacher and the student, over the full vocabulary.

With student logits z (policy p = softmax(z)) and frozen teacher logits z0, the teacher is

    q_tau = softmax(z0 / tau)        (only the teacher is scaled; the student stays at T=1)

and per completion token:

    forward_kl  = KL(q_tau || p) = sum_v q_v (log q_v - log p_v)          (default; mode-covering)
    reverse_kl  = KL(p || q_tau) = sum_v p_v (log p_v - log q_v)          (mode-seeking)
    jsd (beta)  = beta KL(q_tau || m) + (1 - beta) KL(p || m),   m = beta q_tau + (1 - beta) p

The loss is the sum over valid completion tokens divided by their count (clamped to 1, so an empty
mask gives 0, not NaN). Everything is computed in float32.

`chunked_divergence_backward` evaluates the LM heads chunk by chunk on (N, D) hidden states and
back-propagates each chunk at once, so only chunk x V logits are alive at any moment (never B x T x V),
and the head is computed once per chunk (no recomputation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, divergence: str = "forward_kl",
                     teacher_temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """(n,) divergence per position between the heated teacher and the student.

    Args:
        student_logits: (n, V) student logits (T=1).
        teacher_logits: (n, V) the frozen teacher's raw logits; divided by `teacher_temperature` here.
        divergence: forward_kl, reverse_kl or jsd.
        beta: jsd weight of the teacher, 0 < beta < 1.
    """
    logp = student_logits.float().log_softmax(-1)
    logq = (teacher_logits.float() / teacher_temperature).log_softmax(-1)
    if divergence == "forward_kl":
        return (logq.exp() * (logq - logp)).sum(-1)
    if divergence == "reverse_kl":
        return (logp.exp() * (logp - logq)).sum(-1)
    if divergence == "jsd":
        logm = torch.logsumexp(torch.stack([logq + math.log(beta), logp + math.log1p(-beta)]), dim=0)
        kl_qm = (logq.exp() * (logq - logm)).sum(-1)
        kl_pm = (logp.exp() * (logp - logm)).sum(-1)
        return beta * kl_qm + (1 - beta) * kl_pm
    raise ValueError(f"unknown divergence '{divergence}': use {', '.join(DIVERGENCES)}")


def masked_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                      **kwargs) -> torch.Tensor:
    """Mean divergence over positions where `mask`, for (B, T, V) logits and a (B, T) mask (reference form)."""
    per_token = token_divergence(student_logits.flatten(0, -2), teacher_logits.flatten(0, -2), **kwargs)
    m = mask.flatten().float()
    return (per_token * m).sum() / m.sum().clamp_min(1)


@dataclass
class ChunkStats:
    """Sums over the chunk positions, for logging (no gradients)."""

    divergence: float = 0.0
    student_entropy: float = 0.0
    teacher_entropy: float = 0.0  # of q_tau
    kl_student_original: float = 0.0  # KL(student || original at T=1)
    top1_agreement: float = 0.0  # argmax(student) == argmax(original)
    nonfinite: bool = False

    def add(self, other: ChunkStats) -> None:
        for f in ("divergence", "student_entropy", "teacher_entropy", "kl_student_original", "top1_agreement"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.nonfinite = self.nonfinite or other.nonfinite


@torch.no_grad()
def _stats(student_logits: torch.Tensor, teacher_logits: torch.Tensor, per_token: torch.Tensor, tau: float) -> ChunkStats:
    logp = student_logits.float().log_softmax(-1)
    log_orig = teacher_logits.float().log_softmax(-1)
    logq = (teacher_logits.float() / tau).log_softmax(-1)
    p = logp.exp()
    return ChunkStats(
        divergence=float(per_token.sum()),
        student_entropy=float(-(p * logp).sum()),
        teacher_entropy=float(-(logq.exp() * logq).sum()),
        kl_student_original=float((p * (logp - log_orig)).sum()),
        top1_agreement=float((student_logits.argmax(-1) == teacher_logits.argmax(-1)).sum()),
        nonfinite=not bool(torch.isfinite(per_token).all()),
    )


def chunked_divergence_backward(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                                student_head: Callable[[torch.Tensor], torch.Tensor],
                                teacher_head: Callable[[torch.Tensor], torch.Tensor], *, normalizer: float,
                                divergence: str, teacher_temperature: float, beta: float = 0.5,
                                chunk_size: int = 1024, backward: bool = True) -> ChunkStats:
    """Sum of per-token divergences / `normalizer`, back-propagated chunk by chunk.

    Args:
        student_hidden: (N, D) student hidden states at completion positions (part of the autograd graph).
        teacher_hidden: (N, D) frozen teacher hidden states at the same positions.
        student_head, teacher_head: (n, D) -> (n, V) float32 logits.
        normalizer: number of valid tokens in the whole step (so micro-batches add up to the mean).
        chunk_size: positions per chunk; 0 means all at once.
        backward: run backward (False: statistics only).

    Returns:
        Statistics summed over the N positions (divide by N for means).
    """
    n = student_hidden.shape[0]
    step = chunk_size or max(n, 1)
    # Cut the graph at the hidden states: each chunk's backward stops here and accumulates into
    # leaf.grad; one backward through the trunk follows at the end.
    leaf = student_hidden.detach().requires_grad_(backward and student_hidden.requires_grad)
    total = ChunkStats()
    for s in range(0, n, step):
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden[s:s + step])
        with torch.set_grad_enabled(leaf.requires_grad):
            student_logits = student_head(leaf[s:s + step])
            per_token = token_divergence(student_logits, teacher_logits, divergence=divergence,
                                         teacher_temperature=teacher_temperature, beta=beta)
        total.add(_stats(student_logits.detach(), teacher_logits, per_token.detach(), teacher_temperature))
        if leaf.requires_grad and not total.nonfinite:
            (per_token.sum() / max(normalizer, 1.0)).backward()
        del teacher_logits, student_logits, per_token
    if leaf.requires_grad and leaf.grad is not None and not total.nonfinite:
        student_hidden.backward(leaf.grad)
    return total
