"""Per-token divergences between the heated teacher and the student, over the full vocabulary.

With student logits z (policy p = softmax(z)) and frozen teacher logits z0, the teacher is

    q_tau = softmax(z0 / tau)        (only the teacher is scaled; the student stays at T=1)

and per completion token:

    forward_kl  = KL(q_tau || p) = sum_v q_v (log q_v - log p_v)          (default; mode-covering)
    reverse_kl  = KL(p || q_tau) = sum_v p_v (log p_v - log q_v)          (mode-seeking)
    jsd (beta)  = beta KL(q_tau || m) + (1 - beta) KL(p || m),   m = beta q_tau + (1 - beta) p

The loss is the sum over valid completion tokens divided by their count (clamped to 1, so an empty
mask gives 0, not NaN). Everything is computed in float32.

`token_divergence` is the plain autograd form (the reference the tests check against).
`chunked_divergence_backward` is what training runs: it evaluates the LM heads chunk by chunk on
(N, D) hidden states, computes each chunk's gradient w.r.t. the logits by hand
(`divergence_and_grad`) and back-propagates it at once, so only a few chunk x V tensors are alive at
any moment (never B x T x V), and the head runs once per chunk (no recomputation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tsopsd.distributions import MASKED
from tsopsd.family import is_fake

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
    """Sums over the chunk positions, for logging (no gradients).

    As a step accumulates them they are 0-dim device tensors (nothing is read back per chunk); `sums` reads
    them all at once, and `from_sums` makes the floats the stop rules and logs use.
    """

    divergence: float | torch.Tensor = 0.0
    student_entropy: float | torch.Tensor = 0.0
    teacher_entropy: float | torch.Tensor = 0.0  # of q_tau
    kl_student_original: float | torch.Tensor = 0.0  # KL(student || original at T=1)
    top1_agreement: float | torch.Tensor = 0.0  # argmax(student) == argmax(original)
    nonfinite: bool | torch.Tensor = False

    def fields(self) -> list:
        return [self.divergence, self.student_entropy, self.teacher_entropy, self.kl_student_original,
                self.top1_agreement, self.nonfinite]

    def sums(self) -> torch.Tensor | list[float]:
        """The fields (non-finite as 0/1) for summing across processes (see `from_sums`): one float64 device tensor
        where they are device tensors (read back once, by the backend's `sum`), else floats."""
        values = self.fields()
        on = next((v for v in values if isinstance(v, torch.Tensor)), None)
        if on is None:
            return [float(v) for v in values]
        return torch.stack([v.to(torch.float64) if isinstance(v, torch.Tensor) else
                            torch.zeros((), dtype=torch.float64, device=on.device) + float(v) for v in values])

    @classmethod
    def from_sums(cls, values: list[float]) -> ChunkStats:
        d, se, te, kl, top1, bad = values
        return cls(divergence=d, student_entropy=se, teacher_entropy=te, kl_student_original=kl, top1_agreement=top1,
                   nonfinite=bad > 0)

    def add(self, other: ChunkStats) -> None:
        for f in ("divergence", "student_entropy", "teacher_entropy", "kl_student_original", "top1_agreement"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.nonfinite = self.nonfinite | other.nonfinite  # `|`, not `or`: a device flag is not read here


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n,) sum_v a[n, v] * b[n, v] without an (n, V) temporary.

    On CPU a dot product per row streams both operands at memory speed (twice as fast as the batched
    matmul `einsum` becomes); on a GPU one kernel beats n launches.
    """
    if a.device.type == "cpu" and not is_fake(a):
        return torch.stack([x.dot(y) for x, y in zip(a, b)]) if len(a) else a.new_zeros(0)
    return torch.einsum("nv,nv->n", a, b)


class Workspace:
    """Reusable float32 (rows, V) buffers for the chunk loop.

    At a 150k vocabulary one chunk x V tensor is hundreds of MB, which the allocator maps fresh from the
    OS on every allocation: the page faults cost more than the arithmetic done on it. Working in a few
    buffers kept across chunks and micro-batches removes them without raising the peak.
    """

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, like: torch.Tensor) -> torch.Tensor:
        n, v = like.shape
        buf = self._buffers.get(name)
        if buf is None or buf.shape[1] != v or buf.shape[0] < n or buf.device != like.device:
            buf = torch.empty((n, v), dtype=torch.float32, device=like.device)
            self._buffers[name] = buf
        return buf[:n]


@torch.no_grad()
def divergence_and_grad(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, divergence: str,
                        teacher_temperature: float | torch.Tensor, beta: float = 0.5, grad_scale: float | None = None,
                        workspace: Workspace | None = None, min_p: float = 0.0) -> tuple[torch.Tensor | None, ChunkStats]:
    """Per-token divergence, its gradient w.r.t. the student logits, and logging statistics, by hand.

    All three divergences have dL/dp_v = g_v with a simple g, and through the softmax
    dL/dz = p * (g - sum_v p_v g_v):

        forward_kl: dL/dz = p - q
        reverse_kl: g = log p - log q             -> dL/dz = p * (g - KL(p||q))
        jsd:        g = (1 - beta)(log p - log m) -> dL/dz = p * (g - sum_v p_v g_v)

    Computing this directly, in place and in `workspace` buffers, keeps about five (n, V) float32
    tensors alive instead of the dozen autograd saves through log_softmax, allocates none of them anew
    when a workspace is reused, and shares the softmaxes with the statistics. Pass `teacher_logits`
    without keeping a reference: it is worked on in place.

    Args:
        student_logits, teacher_logits: (n, V); the teacher's are raw (divided by tau here).
        grad_scale: multiply the gradient by this (1 / number of valid tokens); None: no gradient.
        workspace: buffers to reuse across calls (the returned gradient lives in one of them, valid
            until the next call with the same workspace).

    Returns:
        (grad (n, V) float32 or None, statistics summed over the n positions)
    """
    ws = workspace if workspace is not None else Workspace()
    z = student_logits.float()  # read only
    z_max = z.amax(-1, keepdim=True)
    # top-1 agreement: the original's argmax is a maximum of the student's (one argmax pass, not two)
    top1 = (z.gather(-1, teacher_logits.argmax(-1, keepdim=True)) == z_max).sum().double()
    # log p = z - max - log s and p = exp(z - max) / s, with s = sum exp(z - max)
    logp = torch.sub(z, z_max, out=ws.get("logp", z))
    p = torch.exp(logp, out=ws.get("p", z))
    s = p.sum(-1, keepdim=True)
    p.div_(s)
    logp.sub_(s.log_())
    p_logp = _rowdot(p, logp)
    student_entropy = -p_logp.sum().double()
    # From here on the teacher's logits are worked on in place (they were handed over).
    z0 = teacher_logits.float()
    del teacher_logits
    p_z0 = _rowdot(p, z0)
    m0 = z0.amax(-1, keepdim=True)
    logq = z0.sub_(m0)
    q = torch.exp(logq, out=ws.get("q", z))
    lse0 = m0.squeeze(-1) + q.sum(-1).log_()
    # KL(student || original at T=1) = sum p log p - sum p z0 + logsumexp(z0), since sum p = 1
    kl_orig = (p_logp - p_z0 + lse0).sum().double()
    if min_p:  # a plausible-set heat: the tail (p < min_p * p_max) gets no mass (`keep_plausible_`)
        logq.masked_fill_(logq < math.log(min_p), -MASKED)
    logq.div_(teacher_temperature)  # (z0 - max) / tau, tau a number or one per row; its max is 0
    torch.exp(logq, out=q)
    sq = q.sum(-1, keepdim=True)
    q.div_(sq)
    logq.sub_(sq.log_())  # log_softmax(z0 / tau)
    q_logq = _rowdot(q, logq)
    teacher_entropy = -q_logq.sum().double()
    want_grad = grad_scale is not None
    if divergence == "forward_kl":
        per_token = q_logq - _rowdot(q, logp)
        grad = p.sub_(q) if want_grad else None
    elif divergence == "reverse_kl":
        g = logp.sub_(logq)  # log p - log q
        per_token = _rowdot(p, g)
        grad = g.sub_(per_token[:, None]).mul_(p) if want_grad else None
    elif divergence == "jsd":
        # log m = log(beta q + (1 - beta) p)
        logm = torch.add(logp, math.log1p(-beta), out=ws.get("m", z))
        torch.logaddexp(logq.add_(math.log(beta)), logm, out=logm)
        logq.sub_(math.log(beta))
        kl_qm = q_logq - _rowdot(q, logm)
        g = logp.sub_(logm)
        per_token = beta * kl_qm + (1 - beta) * _rowdot(p, g)
        grad = None
        if want_grad:
            g.mul_(1 - beta)
            grad = g.sub_(_rowdot(p, g)[:, None]).mul_(p)
    else:
        raise ValueError(f"unknown divergence '{divergence}': use {', '.join(DIVERGENCES)}")
    if grad is not None:
        grad.mul_(grad_scale)
    # each chunk's sums as the chunk's dtype gives them, accumulated in float64 (device tensors: no read-back)
    stats = ChunkStats(divergence=per_token.sum().double(), student_entropy=student_entropy,
                       teacher_entropy=teacher_entropy, kl_student_original=kl_orig, top1_agreement=top1,
                       nonfinite=~torch.isfinite(per_token).all())
    return grad, stats


def chunked_divergence_backward(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                                student_head: Callable[[torch.Tensor], torch.Tensor],
                                teacher_head: Callable[[torch.Tensor], torch.Tensor], *, normalizer: float,
                                divergence: str, teacher_temperature: float | torch.Tensor, beta: float = 0.5,
                                chunk_size: int = 1024, backward: bool = True,
                                workspace: Workspace | None = None, min_p: float = 0.0) -> ChunkStats:
    """Sum of per-token divergences / `normalizer`, back-propagated chunk by chunk.

    Args:
        student_hidden: (N, D) student hidden states at completion positions (part of the autograd graph).
        teacher_hidden: (N, D) frozen teacher hidden states at the same positions.
        student_head, teacher_head: (n, D) -> (n, V) float32 logits.
        normalizer: number of valid tokens in the whole step (so micro-batches add up to the mean).
        teacher_temperature: tau, or (N,) one per position (a selective heat: 1 where it does not heat).
        min_p: a selective heat over the original's plausible candidates (`distributions.keep_plausible_`).
        chunk_size: positions per chunk; 0 means all at once.
        backward: run backward (False: statistics only). With it, the trunk is back-propagated exactly
            once, with zeros when no chunk gave a gradient (no positions, or a non-finite divergence), so
            every call runs the same backward whatever its data; the head's parameters get every chunk's
            gradient (a non-finite step is discarded by the stop rules, `stop.StopRules.check`).
        workspace: chunk buffers to reuse (pass one across micro-batches; default: one for this call).

    Returns:
        Statistics summed over the N positions (divide by N for means).
    """
    n = student_hidden.shape[0]
    step = chunk_size or max(n, 1)
    # Cut the graph at the hidden states: each chunk's backward stops here and accumulates into
    # leaf.grad; one backward through the trunk follows at the end.
    leaf = student_hidden.detach().requires_grad_(backward and student_hidden.requires_grad)
    workspace = workspace if workspace is not None else Workspace()
    total = ChunkStats()
    for s in range(0, n, step):
        with torch.set_grad_enabled(leaf.requires_grad):
            student_logits = student_head(leaf[s:s + step])  # autograd keeps only the head's inputs
        with torch.no_grad():  # the teacher's logits are handed over, not kept: freed inside once used
            tau = teacher_temperature if not isinstance(teacher_temperature, torch.Tensor) else \
                teacher_temperature[s:s + step, None]
            grad, stats = divergence_and_grad(student_logits.detach(), teacher_head(teacher_hidden[s:s + step]),
                                              divergence=divergence, teacher_temperature=tau, min_p=min_p,
                                              beta=beta, workspace=workspace,
                                              grad_scale=1.0 / max(normalizer, 1.0) if leaf.requires_grad else None)
        total.add(stats)
        if grad is not None:  # a non-finite chunk's too: whether it was is not read here (the trunk gets zeros)
            student_logits.backward(grad)
        del student_logits, grad
    if leaf.requires_grad:
        if leaf.grad is None:
            student_hidden.backward(torch.zeros_like(student_hidden))
        else:  # zeros where any chunk was non-finite, decided on the device
            student_hidden.backward(torch.where(torch.as_tensor(total.nonfinite, device=leaf.grad.device), 0.0,
                                                leaf.grad))
    return total
