"""95% intervals for measurements made on sampled completions: a bootstrap over prompts, samples nested.

    lo, hi = ratio_interval(sums, counts, prompt_of, seed=0)      # a token-weighted mean: sum(sums) / sum(counts)
    lo, hi = prompt_interval(values)                               # a mean over prompts of per-prompt values

A measurement samples k completions for each of P prompts and averages over completion tokens. Its
error has two sources: which completions were sampled (a few rare hot tokens carry a low mean) and which
prompts were asked (the prompts are a sample of the tasks the model will see). The two-stage bootstrap
draws both again: P prompts with replacement, then, within each drawn prompt, its samples with
replacement, and recomputes the statistic; the 2.5% and 97.5% quantiles of the redraws are the interval
(the percentile method). Resampling both stages counts the within-prompt spread a little more than once,
so the interval leans wide rather than narrow: the price of honest intervals from few prompts.

Everything here is float64 on the CPU, seeded, and independent of the rest of tsopsd.
"""

from __future__ import annotations

import math

import torch

LEVEL = 0.95
REPS = 1000  # bootstrap redraws: the interval's ends move by well under 1% of its width between seeds
WIDE = 0.10  # an interval wider than +-10% of its mean gets a warning


def _grouped(values: torch.Tensor, prompt_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, K) values of each prompt's samples, zero-padded, and (P,) how many each prompt has."""
    _, group = torch.unique(prompt_of, return_inverse=True)
    P = int(group.max()) + 1 if group.numel() else 0
    counts = torch.bincount(group, minlength=P)
    order = torch.argsort(group, stable=True)
    starts = counts.cumsum(0) - counts
    slot = torch.arange(group.numel()) - starts[group[order]]
    out = torch.zeros(P, int(counts.max()) if P else 0, dtype=torch.float64)
    out[group[order], slot] = values[order].double()
    return out, counts


def ratio_interval(sums: torch.Tensor, counts: torch.Tensor, prompt_of: torch.Tensor, *, seed: int = 0,
                   reps: int = REPS, level: float = LEVEL, over_prompts: bool = True) -> tuple[float, float] | None:
    """Interval of sum(sums) / sum(counts) over samples (e.g. entropy summed over each completion's tokens and
    its token count), resampling prompts, then each drawn prompt's samples. None with no counted sample.

    Args:
        sums, counts: (S,) per sample; counts >= 0.
        prompt_of: (S,) which prompt each sample answers (any integer labels).
        over_prompts: False keeps the prompts as they are and resamples only their samples: the uncertainty
            of the mean on *these* prompts (what a run steering on a fixed held-out set needs), not on
            prompts like them.
    """
    if sums.numel() == 0 or float(counts.sum()) <= 0:
        return None
    s, k = _grouped(sums, prompt_of)
    n, _ = _grouped(counts, prompt_of)
    P, K = s.shape
    g = torch.Generator().manual_seed(seed)
    stats = []
    chunk = max(1, 2_000_000 // max(P * K, 1))  # redraws at a time: bounded memory for any P x K
    for start in range(0, reps, chunk):
        b = min(chunk, reps - start)
        prompts = torch.randint(P, (b, P), generator=g) if over_prompts else torch.arange(P).expand(b, P)  # stage 1
        within = (torch.rand(b, P, K, generator=g, dtype=torch.float64) * k[prompts, None]).long()  # stage 2: samples
        mine = torch.arange(K) < k[prompts, None]  # a drawn prompt contributes as many samples as it has
        num = (s[prompts[..., None], within] * mine).sum((1, 2))
        den = (n[prompts[..., None], within] * mine).sum((1, 2))
        stats.append(torch.where(den > 0, num / den.clamp_min(1e-300), torch.nan))
    return _percentiles(torch.cat(stats), level)


def prompt_interval(values: torch.Tensor, *, seed: int = 0, reps: int = REPS,
                    level: float = LEVEL) -> tuple[float, float] | None:
    """Interval of the mean of per-prompt `values` (P,), e.g. each prompt's distinct-completion rate among its
    samples, resampling prompts. None without prompts."""
    v = values.double().flatten()
    if v.numel() == 0:
        return None
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(v.numel(), (reps, v.numel()), generator=g)
    return _percentiles(v[draws].mean(1), level)


def _percentiles(stats: torch.Tensor, level: float) -> tuple[float, float] | None:
    stats = stats[~torch.isnan(stats)].sort().values
    if stats.numel() == 0:
        return None
    tail = (1 - level) / 2

    def at(p: float) -> float:
        x = p * (stats.numel() - 1)
        lo = int(math.floor(x))
        hi = min(lo + 1, stats.numel() - 1)
        return float(stats[lo] + (stats[hi] - stats[lo]) * (x - lo))

    return at(tail), at(1 - tail)


def relative_half_width(mean: float, interval: tuple[float, float] | None) -> float:
    """Half the interval's width over |mean| (inf when the mean is 0 or there is no interval)."""
    if interval is None or mean == 0:
        return math.inf
    return (interval[1] - interval[0]) / 2 / abs(mean)


def samples_for(relative: float, have: int, precision: float) -> int:
    """About how many samples give +-`precision` when `have` gave +-`relative` (the width shrinks as 1/sqrt(n))."""
    if not math.isfinite(relative) or precision <= 0:
        return have
    return max(have, math.ceil(have * (relative / precision) ** 2))


def describe(mean: float, interval: tuple[float, float] | None, *, digits: int = 4) -> str:
    """'0.7611 (0.7303-0.7907)', or the mean alone without an interval."""
    if interval is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({interval[0]:.{digits}f}-{interval[1]:.{digits}f})"
