"""Distribution maths on (N, V) logits: entropy, KL, top-k overlap, the temperature for an entropy.

    entropy(logits, temperature=1.5)                      # (N,) nats
    temperature_for_entropy(hidden, head, target=0.8)     # T with mean H(softmax(head(h) / T)) = target

With z the logits over the vocabulary, p = softmax(z), r = softmax(z_ref):

    H(p)        = logsumexp(z) - sum_v p_v z_v                 entropy in nats
    H_T(p)      = H(softmax(z / T))                             entropy at temperature T
    KL(p || r)  = sum_v p_v (log p_v - log r_v)
    top-k overlap = |topk(p) ∩ topk(r)| / k

Pure functions of tensors; nothing here imports the rest of tsopsd.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(N,) entropy in nats of softmax(logits / temperature), in float32."""
    z = logits.float() / temperature
    logp = z.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_sum_float64(logits: torch.Tensor, temperature: float = 1.0) -> float:
    """Sum over rows of the entropy of softmax(logits / temperature), computed in float64 (a reference)."""
    logp = (logits.double() / temperature).log_softmax(-1)
    return float(-(logp.exp() * logp).sum())


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """(N,) KL(p || q) with p = softmax(logits_p), q = softmax(logits_q)."""
    logp = logits_p.float().log_softmax(-1)
    logq = logits_q.float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def topk_overlap(logits_a: torch.Tensor, logits_b: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) fraction of the k most likely tokens under a that are among the k most likely under b."""
    k = min(k, logits_a.shape[-1])
    a = logits_a.topk(k, dim=-1).indices  # (N, k)
    b = logits_b.topk(k, dim=-1).indices
    return (a[:, :, None] == b[:, None, :]).any(-1).float().mean(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask`; 0 (not NaN) when nothing is selected."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def summarize_entropy(values: torch.Tensor) -> dict[str, float]:
    """Mean, p10/p50/p90 and the mean of the top 20% highest-entropy tokens."""
    if values.numel() == 0:
        return {"mean": 0.0, "p10": 0.0, "p50": 0.0, "p90": 0.0, "top20_mean": 0.0}
    v = values.double()
    q = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    top = v.sort(descending=True).values[: max(1, math.ceil(0.2 * v.numel()))]
    return {"mean": float(v.mean()), "p10": float(q[0]), "p50": float(q[1]), "p90": float(q[2]),
            "top20_mean": float(top.mean())}


def mean_entropy(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], temperature: float = 1.0,
                 *, chunk_size: int = 1024) -> float:
    """Mean entropy of softmax(head(hidden) / T) over the rows of (N, D) `hidden`, one chunk of logits at a time."""
    total = sum(float(entropy(head(hidden[s:s + chunk_size]), temperature).sum())
                for s in range(0, hidden.shape[0], chunk_size))
    return total / max(hidden.shape[0], 1)


def temperature_for_entropy(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], target: float,
                            *, low: float = 0.05, high: float = 50.0, chunk_size: int = 1024,
                            tol: float = 1e-4, max_iter: int = 60) -> float | None:
    """The T at which the mean entropy of softmax(head(hidden) / T) equals `target`, by bisection.

    Mean entropy is increasing in T (for non-constant logits), so bisection on log T converges.

    Returns:
        T, or None when the target lies outside [H(low), H(high)].
    """
    def mean_h(t: float) -> float:
        return mean_entropy(hidden, head, t, chunk_size=chunk_size)

    if hidden.shape[0] == 0 or not (mean_h(low) <= target <= mean_h(high)):
        return None
    lo, hi = math.log(low), math.log(high)
    for _ in range(max_iter):
        mid = (lo + hi) / 2
        if mean_h(math.exp(mid)) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol:
            break
    return math.exp((lo + hi) / 2)
