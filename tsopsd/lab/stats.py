"""Statistics for the lab: pass@k, and bootstrap intervals over seeds, plain and paired.

    pass_at_k(n=16, c=3, k=8)                      # unbiased pass@k from n samples with c correct
    interval([0.61, 0.70, 0.66, ...])              # mean and 95% percentile-bootstrap interval
    paired([..start A per seed..], [..B..])        # A - B per seed: mean, interval, real (excludes 0)

A difference between two starts is called real only when the 95% bootstrap interval of the per-seed
paired differences excludes 0 (seed s of every start uses the same prompts and RL seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tsopsd.intervals import prompt_interval

BOOTSTRAP = 10_000


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k draws without replacement from n samples (c correct) is correct
    (Chen et al. 2021, the unbiased estimator)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def interval(values: Sequence[float], *, level: float = 0.95, resamples: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Mean of `values` and its percentile-bootstrap interval (resampling the values with replacement): the
    product's bootstrap (`intervals.prompt_interval`, one value per seed here instead of per prompt)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("no values")
    lo, hi = prompt_interval(torch.tensor(xs, dtype=torch.float64), seed=seed, reps=resamples, level=level)
    return {"mean": sum(xs) / len(xs), "low": lo, "high": hi, "n": len(xs)}


def paired(a: Sequence[float], b: Sequence[float], **kwargs) -> dict:
    """`interval` of the per-seed differences a[s] - b[s]; ``real`` when the interval excludes 0."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need the same seeds, got {len(a)} and {len(b)}")
    out = interval([x - y for x, y in zip(a, b)], **kwargs)
    out["real"] = out["low"] > 0 or out["high"] < 0
    return out
