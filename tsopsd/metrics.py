"""Entropy and drift metrics, computed exactly from full-vocabulary logits on completion tokens.

    report = measure(model, tokenizer, prompts, samples_per_prompt=4, reference=ref_model)

Per-token maths (z: logits over the vocabulary, p = softmax(z), r = softmax(z_ref)):

    H(p)        = logsumexp(z) - sum_v p_v z_v                 entropy in nats
    H_T(p)      = H(softmax(z / T))                             entropy at temperature T
    KL(p || r)  = sum_v p_v (log p_v - log r_v)
    top-k overlap = |topk(p) ∩ topk(r)| / k

Token statistics are averaged over valid completion tokens only (prompt, padding and everything
after EOS never count); an empty selection gives 0, never NaN. Sequence statistics (length,
distinct-n, unique-completion rate) are computed among the k samples of each prompt, then averaged
over prompts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from tsopsd.prompts import Prompt
from tsopsd.rollout import Rollout, sample_rollouts
from tsopsd.scoring import as_scorer

TOPK = (5, 10)


# ---- per-token maths on (N, V) logits -------------------------------------------------------------

def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(N,) entropy in nats of softmax(logits / temperature)."""
    z = logits.float() / temperature
    logp = z.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


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


def temperature_for_entropy(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], target: float,
                            *, low: float = 0.05, high: float = 50.0, chunk_size: int = 1024,
                            tol: float = 1e-4, max_iter: int = 60) -> float | None:
    """The T at which the mean entropy of softmax(head(hidden) / T) equals `target`, by bisection.

    Mean entropy is increasing in T (for non-constant logits), so bisection on log T converges.

    Returns:
        T, or None when the target lies outside [H(low), H(high)].
    """
    def mean_h(t: float) -> float:
        total = sum(float(entropy(head(hidden[s:s + chunk_size]), t).sum())
                    for s in range(0, hidden.shape[0], chunk_size))
        return total / max(hidden.shape[0], 1)

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


# ---- sequence statistics ---------------------------------------------------------------------------

def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Unique n-grams / all n-grams across `sequences` (0 when there are none)."""
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def sequence_stats(rollout: Rollout, eos_ids: Sequence[int]) -> dict[str, float]:
    """Length, distinct-1/2 and unique-completion rate among the samples of each prompt."""
    completions = rollout.completions()
    groups: dict[int, list[list[int]]] = {}
    for idx, comp in zip(rollout.prompt_index.tolist(), completions):
        # EOS is not content: two answers differing only in having stopped are not "distinct".
        groups.setdefault(idx, []).append([t for t in comp if t not in eos_ids])
    d1 = [distinct_n(g, 1) for g in groups.values()]
    d2 = [distinct_n(g, 2) for g in groups.values()]
    unique = [len({tuple(c) for c in g}) / len(g) for g in groups.values()]
    lengths = [len(c) for c in completions]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {
        "response_length": mean(lengths),
        "distinct_1": mean(d1),
        "distinct_2": mean(d2),
        "unique_completion_rate": mean(unique),
    }


# ---- token statistics from hidden states -----------------------------------------------------------

def token_stats(logits: torch.Tensor, ref_logits: torch.Tensor | None = None,
                sampling_temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-position statistics for (n, V) logits (and a reference's, same vocabulary)."""
    out = {
        "entropy": entropy(logits),
        "top1_prob": logits.float().softmax(-1).amax(-1),
    }
    if sampling_temperature not in (0, 1):
        out["entropy_sampling"] = entropy(logits, sampling_temperature)
    if ref_logits is not None:
        out["kl_model_ref"] = kl_divergence(logits, ref_logits)
        out["kl_ref_model"] = kl_divergence(ref_logits, logits)
        out["top1_agreement"] = (logits.argmax(-1) == ref_logits.argmax(-1)).float()
        for k in TOPK:
            out[f"top{k}_overlap"] = topk_overlap(logits, ref_logits, k)
    return out


def summarize_entropy(values: torch.Tensor) -> dict[str, float]:
    """Mean, p10/p50/p90 and the mean of the top 20% highest-entropy tokens."""
    if values.numel() == 0:
        return {"mean": 0.0, "p10": 0.0, "p50": 0.0, "p90": 0.0, "top20_mean": 0.0}
    v = values.double()
    q = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    top = v.sort(descending=True).values[: max(1, math.ceil(0.2 * v.numel()))]
    return {"mean": float(v.mean()), "p10": float(q[0]), "p50": float(q[1]), "p90": float(q[2]),
            "top20_mean": float(top.mean())}


# Effective temperature is found on at most this many positions (seeded subsample) to bound its cost.
MAX_EFFECTIVE_T_POSITIONS = 16384


@torch.no_grad()
def score_rollout(model, rollout: Rollout, *, reference=None, sampling_temperature: float = 1.0,
                  micro_batch: int = 8, chunk_size: int = 1024, seed: int = 0, keep_token_entropy: bool = False) -> dict:
    """Token metrics of `model` on the completions of `rollout`, teacher-forced.

    `model` and `reference` are modules or `Scorer`s (a Scorer can view a PEFT model's base).

    Returns a dict with ``entropy`` (summary at T=1), ``entropy_at_sampling_temperature``,
    ``top1_prob``, ``tokens`` and, with a reference, a ``reference`` dict.
    """
    model, reference = as_scorer(model), (as_scorer(reference) if reference is not None else None)
    hidden = model.hidden(rollout, micro_batch=micro_batch)  # (N, D)
    ref_hidden = reference.hidden(rollout, micro_batch=micro_batch) if reference is not None else None
    per_token: dict[str, list[torch.Tensor]] = {}
    for s in range(0, hidden.shape[0], chunk_size):
        logits = model.logits(hidden[s:s + chunk_size])
        ref_logits = None
        if reference is not None:
            ref_logits = reference.logits(ref_hidden[s:s + chunk_size]).to(logits.device)
            if ref_logits.shape[-1] != logits.shape[-1]:
                from tsopsd.errors import TsopsdError

                raise TsopsdError(f"reference vocabulary ({ref_logits.shape[-1]}) differs from the model's "
                                  f"({logits.shape[-1]}): a reference must share the tokenizer")
        for k, v in token_stats(logits, ref_logits, sampling_temperature).items():
            per_token.setdefault(k, []).append(v.cpu())
        del logits, ref_logits
    cat = {k: torch.cat(v) for k, v in per_token.items()}
    n = hidden.shape[0]
    ent = cat.get("entropy", torch.zeros(0))
    result = {
        "tokens": n,
        "entropy": summarize_entropy(ent),
        "entropy_at_sampling_temperature": summarize_entropy(cat.get("entropy_sampling", ent))["mean"],
        "top1_prob": float(cat["top1_prob"].double().mean()) if n else 0.0,
    }
    if keep_token_entropy:
        result["token_entropy"] = ent.tolist()
    if reference is not None:
        ref = {k: (float(cat[k].double().mean()) if n else 0.0)
               for k in ("kl_model_ref", "kl_ref_model", "top1_agreement") + tuple(f"top{k}_overlap" for k in TOPK)}
        sub = ref_hidden
        if n > MAX_EFFECTIVE_T_POSITIONS:
            g = torch.Generator().manual_seed(seed)
            sub = ref_hidden[torch.randperm(n, generator=g)[:MAX_EFFECTIVE_T_POSITIONS].to(ref_hidden.device)]
        ref["effective_temperature"] = temperature_for_entropy(
            sub, reference.logits, result["entropy"]["mean"], chunk_size=chunk_size)
        result["reference"] = ref
    return result


def measure(model, tokenizer, prompts: Sequence[Prompt], *, reference=None, samples_per_prompt: int = 4,
            max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
            batch_size: int = 16, seed: int = 0, verifier: Callable[[int, str], bool] | None = None,
            keep_token_entropy: bool = False, all_done: Callable[[bool], bool] | None = None,
            progress: Callable[[str, int], Callable[[int], None]] | None = None) -> dict:
    """Sample k completions per prompt and measure entropy and diversity (and drift vs a reference).

    Args:
        verifier: optional ``verifier(prompt index, completion text) -> correct``; adds ``accuracy``,
            the fraction of sampled completions it accepts.
        keep_token_entropy: also return every completion token's entropy (``token_entropy``).
        progress: optional factory ``progress(description, total) -> advance(n)``.

    Returns:
        A JSON-ready dict (fields documented in README.md, "measure-entropy --json").
    """
    from tsopsd.rollout import eos_token_ids

    total = len(prompts) * samples_per_prompt
    advance = progress("sampling", total) if progress else None
    rollout = sample_rollouts(model, tokenizer, prompts, samples_per_prompt=samples_per_prompt,
                              max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              batch_size=batch_size, seed=seed, on_batch=advance, all_done=all_done)
    result = score_rollout(model, rollout, reference=reference, sampling_temperature=temperature,
                           micro_batch=batch_size, seed=seed, keep_token_entropy=keep_token_entropy)
    result.update(sequence_stats(rollout, eos_token_ids(model, tokenizer)))
    if verifier is not None:
        texts = [tokenizer.decode(c, skip_special_tokens=True) for c in rollout.completions()]
        ok = [verifier(int(i), t) for i, t in zip(rollout.prompt_index.tolist(), texts)]
        result["accuracy"] = sum(ok) / max(len(ok), 1)
    result.update({"prompts": len(prompts), "samples_per_prompt": samples_per_prompt, "temperature": temperature,
                   "max_new_tokens": max_new_tokens, "seed": seed})
    return result
