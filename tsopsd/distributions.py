"""Distribution maths on (N, V) logits: entropy, KL, top-k overlap, the temperature for an entropy.

    entropy(logits, temperature=1.5)                      # (N,) nats
    temperature_for_entropy(hidden, head, target=0.8)     # T with mean H(softmax(head(h) / T)) = target
    solve_increasing(f, target, start=1.5, low=1, high=50, tol=1e-4)   # Newton on log x, safeguarded

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
from dataclasses import dataclass

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
    v = values.double().flatten()
    s = v.sort().values  # one sort for the quantiles and the top 20%
    n = s.numel()

    def quantile(p: float) -> torch.Tensor:
        # torch.quantile's "linear" rule, with indices known from the shape: no data-dependent op (torch.quantile
        # checks its arguments with one, which `tsopsd plan`'s fake tensors cannot answer on some torch versions)
        at = p * (n - 1)
        lo = int(math.floor(at))
        hi = min(lo + 1, n - 1)
        return s[lo] + (s[hi] - s[lo]) * (at - lo)

    top = s[n - max(1, math.ceil(0.2 * n)):]
    return {"mean": float(v.mean()), "p10": float(quantile(0.1)), "p50": float(quantile(0.5)),
            "p90": float(quantile(0.9)), "top20_mean": float(top.mean())}


def entropy_and_slope(logits: torch.Tensor, temperature: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) entropy H of q = softmax(logits / T) and (N,) its derivative dH/dT, in float32; T a number or one per
    row ((N, 1)).

    With z = logits / T: dH/dT = Var_q(logits) / T^3 = Var_q(z) / T (non-negative: H rises with T).
    """
    z = logits.float() / temperature
    logq = z.log_softmax(-1)
    q = logq.exp()
    h = -(q * logq).sum(-1)
    mean = (q * z).sum(-1, keepdim=True)
    var = (q * (z - mean).square_()).sum(-1)
    return h, var / (temperature.squeeze(-1) if isinstance(temperature, torch.Tensor) else temperature)


# A selective heat (`teacher.heat`): the teacher at tau where it heats, the original (T = 1) elsewhere.
@dataclass(frozen=True)
class Heat:
    """Where a step's teacher is heated: `masks`, one bool per completion position of each micro-batch (None for
    a micro-batch without any; the whole list None: every position), and `min_p` (over the original's plausible
    candidates only, `keep_plausible_`; 0: over the whole vocabulary)."""

    masks: list[torch.Tensor | None] | None = None
    min_p: float = 0.0


MASKED = 1e4  # a logit out of the plausible set: this far below the row's max (probability 0 even at T = 50)


def keep_plausible_(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """In place: shifted so each row's max is 0, and every token with p < min_p * p_max (p = softmax(logits), the
    original's) set to -MASKED, so softmax(logits / T) spreads over the plausible candidates only, at any T.
    min_p 0: only the shift (softmax and entropy are unchanged by it)."""
    logits.sub_(logits.amax(-1, keepdim=True))
    if min_p > 0:
        logits.masked_fill_(logits < math.log(min_p), -MASKED)
    return logits


def row_temperatures(tau: float, heated: torch.Tensor | None) -> float | torch.Tensor:
    """tau where `heated` (a bool per row), 1 elsewhere, as an (N,) tensor; tau itself without a mask."""
    if heated is None:
        return tau
    return torch.where(heated, tau, 1.0).to(torch.float32)


def entropy_sums(parts: list[torch.Tensor], head: Callable[[torch.Tensor], torch.Tensor], temperature: float,
                 *, chunk_size: int = 1024, heated: list[torch.Tensor | None] | None = None,
                 min_p: float = 0.0) -> list[float]:
    """[sum of H, sum of dH/dT, rows] of softmax(head(h) / T) over the rows of (n, D) hidden `parts`,
    one chunk of logits at a time; the sums in float64 (lists of floats add across processes). A selective
    heat: `heated` (a bool per row of each part; T = 1 elsewhere, where dH/dT is 0) and `min_p`
    (`keep_plausible_`)."""
    sums = [0.0, 0.0, 0.0]
    for i, hidden in enumerate(parts):
        for c in range(0, hidden.shape[0], chunk_size):
            mask = heated[i][c:c + chunk_size] if heated is not None and heated[i] is not None else None
            z = keep_plausible_(head(hidden[c:c + chunk_size]).float(), min_p) if min_p else head(hidden[c:c + chunk_size])
            temps = row_temperatures(temperature, mask)
            h, slope = entropy_and_slope(z, temps if mask is None else temps[:, None])
            if mask is not None:
                slope = slope * mask
            sums[0] += float(h.double().sum())
            sums[1] += float(slope.double().sum())
            sums[2] += h.shape[0]
    return sums


@dataclass(frozen=True)
class Solution:
    """`solve_increasing`'s answer: x, f(x), how many evaluations, and whether f(x) hit the target
    (False: the target lies outside [f(low), f(high)] and x is the nearer bound)."""

    x: float
    value: float
    evaluations: int
    reached: bool


def solve_increasing(f: Callable[[float], tuple[float, float]], target: float, *, start: float, low: float,
                     high: float, tol: float, max_iter: int = 50) -> Solution:
    """x in [low, high] with f(x) = target (within `tol`) for an increasing f, by Newton's method on log x.

    `f(x)` returns (f(x), f'(x)), one evaluation each (for an entropy, one pass over the logits gives
    both). Safeguarded: a Newton step that leaves the bracket known to hold the root tries the bound
    itself once (so an unreachable target is found in one evaluation), then bisects. From a good
    `start` (the previous step's tau) two or three evaluations suffice.
    """
    lo, hi = math.log(low), math.log(high)
    bounds = (lo, hi)
    u = math.log(min(max(start, low), high))
    value, n = float("nan"), 0
    for n in range(1, max_iter + 1):
        value, slope = f(math.exp(u))
        if abs(value - target) <= tol:
            return Solution(math.exp(u), value, n, True)
        if value < target:
            if u >= bounds[1]:
                return Solution(high, value, n, False)  # even the highest x stays below the target
            lo = u
        else:
            if u <= bounds[0]:
                return Solution(low, value, n, False)  # even the lowest x stays above the target
            hi = u
        d = slope * math.exp(u)  # df/du
        nxt = u - (value - target) / d if d > 0 and math.isfinite(d) else None
        if nxt is None or not lo < nxt < hi:
            if nxt is not None and nxt >= hi == bounds[1]:
                nxt = hi  # beyond the top of the range: try the bound itself
            elif nxt is not None and nxt <= lo == bounds[0]:
                nxt = lo
            else:
                nxt = (lo + hi) / 2
        if hi - lo < 1e-12:
            break
        u = nxt
    return Solution(math.exp(u), value, n, abs(value - target) <= tol)


def temperature_for_entropy(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], target: float,
                            *, low: float = 0.05, high: float = 50.0, chunk_size: int = 1024,
                            tol: float = 1e-5, start: float = 1.0) -> float | None:
    """The T at which the mean entropy of softmax(head(hidden) / T) equals `target` (within `tol` nats).

    Mean entropy is increasing in T; `solve_increasing` finds it with a few passes over the logits.

    Returns:
        T, or None when the target lies outside [H(low), H(high)].
    """
    if hidden.shape[0] == 0:
        return None

    def mean_h(t: float) -> tuple[float, float]:
        h, slope, n = entropy_sums([hidden], head, t, chunk_size=chunk_size)
        return h / n, slope / n

    found = solve_increasing(mean_h, target, start=start, low=low, high=high, tol=tol)
    return found.x if found.reached else None
