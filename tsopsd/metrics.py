"""Measuring a model: entropy, diversity and drift of its own rollouts (`tsopsd measure-entropy`).

    result = measure_checkpoint("ckpt/", "prompts.jsonl", samples_per_prompt=4)   # what the CLI prints
    report = measure(model, tokenizer, prompts, samples_per_prompt=4, reference=ref_model)

Computed exactly from full-vocabulary logits on completion tokens (the maths is in `distributions`).

Token statistics are averaged over valid completion tokens only (prompt, padding and everything
after EOS never count); an empty selection gives 0, never NaN. Sequence statistics (length,
distinct-n, unique-completion rate) are computed among the k samples of each prompt, then averaged
over prompts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tsopsd import __version__
from tsopsd.batch import Rollout, concat
from tsopsd.checkpoint import load_checkpoint
from tsopsd.config import MAX_NEW_TOKENS, MAX_SAMPLES_PER_PROMPT, SEED_LIMIT
from tsopsd.console import progress
from tsopsd.distributions import entropy, kl_divergence, summarize_entropy, temperature_for_entropy, topk_overlap
from tsopsd.errors import TsopsdError
from tsopsd.family import eos_token_ids, max_positions
from tsopsd.intervals import WIDE, describe, prompt_interval, ratio_interval, relative_half_width, samples_for
from tsopsd.prompts import Prompt, fit_prompts, load_prompts, read_records
from tsopsd.rollout import sample_rollouts
from tsopsd.scoring import as_scorer

log = logging.getLogger(__name__)

TOPK = (5, 10)


# ---- sequence statistics ---------------------------------------------------------------------------

def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Unique n-grams / all n-grams across `sequences` (0 when there are none)."""
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def sequence_stats(rollout: Rollout, eos_ids: Sequence[int], *, seed: int = 0) -> dict:
    """Length, distinct-1/2 and unique-completion rate among the samples of each prompt (rates with their
    95% intervals over prompts in ``intervals``)."""
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
    per_prompt = lambda xs: prompt_interval(torch.tensor(xs, dtype=torch.float64), seed=seed)  # noqa: E731
    return {
        "response_length": mean(lengths),
        "distinct_1": mean(d1),
        "distinct_2": mean(d2),
        "unique_completion_rate": mean(unique),
        "intervals": {"distinct_1": per_prompt(d1), "distinct_2": per_prompt(d2),
                      "unique_completion_rate": per_prompt(unique)},
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


# ---- representations ------------------------------------------------------------------------------

def layer_similarity(states: torch.Tensor, ref_states: torch.Tensor) -> dict | None:
    """Per-layer similarity of two models' hidden states on the same sequences, in float64.

    Args:
        states, ref_states: (n, L, D) each decoder layer's output at each sequence's final position.

    Returns:
        ``cosine``: per layer, the mean over sequences of cos(h_model, h_ref) (1.0 = same direction);
        ``linear_cka``: per layer, linear CKA across the n sequences (Kornblith et al. 2019), 1.0 when the
        two sets of states are the same up to rotation and scale; null with fewer than 2 sequences or
        states that do not vary. None when the layer counts or widths differ.
    """
    if states.shape != ref_states.shape or states.ndim != 3:
        return None
    x, y = states.double(), ref_states.double()
    cosine = torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-30).mean(0)  # (L,)
    cka = []
    for layer in range(x.shape[1]):
        a = x[:, layer] - x[:, layer].mean(0)
        b = y[:, layer] - y[:, layer].mean(0)
        k, m = a @ a.T, b @ b.T
        norms = k.norm() * m.norm()
        cka.append(float((k * m).sum() / norms) if x.shape[0] > 1 and norms > 0 else None)
    return {"cosine": [float(c) for c in cosine], "linear_cka": cka}


# Effective temperature is found on at most this many positions (seeded subsample) to bound its cost.
MAX_EFFECTIVE_T_POSITIONS = 16384


@torch.no_grad()
def score_rollout(model, rollout: Rollout, *, reference=None, sampling_temperature: float = 1.0,
                  micro_batch: int = 8, chunk_size: int = 1024, seed: int = 0, keep_token_entropy: bool = False,
                  per_sample: bool = False, intervals: bool = True) -> dict:
    """Token metrics of `model` on the completions of `rollout`, teacher-forced.

    `model` and `reference` are modules or `Scorer`s (a Scorer can view a PEFT model's base).

    Returns a dict with ``entropy`` (summary at T=1), ``entropy_at_sampling_temperature``,
    ``top1_prob``, ``tokens``, ``intervals`` (95% bootstrap intervals over prompts, `intervals.ratio_interval`)
    and, with a reference, a ``reference`` dict (its ``layers`` from `layer_similarity`, on the final position
    of every rollout row). `per_sample`: also each sample's summed entropy, token count and prompt.
    `intervals=False` leaves the intervals out (`tsopsd plan`, whose fake tensors hold no values to resample).
    """
    model, reference = as_scorer(model), (as_scorer(reference) if reference is not None else None)
    layers = ([], []) if reference is not None else (None, None)  # per-layer final-position states
    hidden = model.hidden(rollout, micro_batch=micro_batch, layer_states=layers[0])  # (N, D)
    ref_hidden = None
    if reference is not None:
        ref_hidden = reference.hidden(rollout, micro_batch=micro_batch, layer_states=layers[1])
    per_token: dict[str, list[torch.Tensor]] = {}
    for s in range(0, hidden.shape[0], chunk_size):
        logits = model.logits(hidden[s:s + chunk_size])
        ref_logits = None
        if reference is not None:
            ref_logits = reference.logits(ref_hidden[s:s + chunk_size]).to(logits.device)
            if ref_logits.shape[-1] != logits.shape[-1]:
                raise TsopsdError(f"reference vocabulary ({ref_logits.shape[-1]}) differs from the model's "
                                  f"({logits.shape[-1]}): a reference must share the tokenizer")
        for k, v in token_stats(logits, ref_logits, sampling_temperature).items():
            per_token.setdefault(k, []).append(v.cpu())
        del logits, ref_logits
    cat = {k: torch.cat(v) for k, v in per_token.items()}
    n = hidden.shape[0]
    ent = cat.get("entropy", torch.zeros(0))
    counted = intervals or per_sample
    lengths = rollout.completion_lengths.cpu() if counted else None
    row_of = torch.repeat_interleave(torch.arange(lengths.numel()), lengths) if counted else None  # each position's row
    prompt_of = rollout.prompt_index.cpu()

    def per_row(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(lengths.numel(), dtype=torch.float64).index_add_(0, row_of, values.double())

    row_entropy = per_row(ent) if counted else None
    result = {
        "tokens": n,
        "entropy": summarize_entropy(ent),
        "entropy_at_sampling_temperature": summarize_entropy(cat.get("entropy_sampling", ent))["mean"],
        "top1_prob": float(cat["top1_prob"].double().mean()) if n else 0.0,
        "intervals": {"entropy": ratio_interval(row_entropy, lengths, prompt_of, seed=seed) if n and intervals
                      else None,
                      "entropy_these_prompts": ratio_interval(row_entropy, lengths, prompt_of, seed=seed,
                                                              over_prompts=False) if n and intervals else None},
    }
    if per_sample:
        result["per_sample"] = {"entropy": row_entropy, "tokens": lengths, "prompt": prompt_of}
    if keep_token_entropy:
        result["token_entropy"] = ent.tolist()
    if reference is not None:
        ref = {k: (float(cat[k].double().mean()) if n else 0.0)
               for k in ("kl_model_ref", "kl_ref_model", "top1_agreement") + tuple(f"top{k}_overlap" for k in TOPK)}
        result["intervals"]["top1_agreement"] = ratio_interval(
            per_row(cat["top1_agreement"]), lengths, prompt_of, seed=seed) if n and intervals else None
        sub = ref_hidden
        if n > MAX_EFFECTIVE_T_POSITIONS:
            g = torch.Generator().manual_seed(seed)
            sub = ref_hidden[torch.randperm(n, generator=g)[:MAX_EFFECTIVE_T_POSITIONS].to(ref_hidden.device)]
        ref["effective_temperature"] = temperature_for_entropy(
            sub, reference.logits, result["entropy"]["mean"], chunk_size=chunk_size)
        ref["layers"] = layer_similarity(torch.cat(layers[0]), torch.cat(layers[1])) if layers[0] else None
        result["reference"] = ref
    return result


def measure(model, tokenizer, prompts: Sequence[Prompt], *, reference=None, samples_per_prompt: int = 4,
            max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
            batch_size: int = 16, score_batch: int | None = None, seed: int = 0,
            verifier: Callable[[int, str], bool] | None = None,
            keep_token_entropy: bool = False, done_everywhere: Callable[[bool], bool] | None = None,
            progress: Callable[[str, int], Callable[[int], None]] | None = None,
            precision: float | None = None, max_samples_per_prompt: int | None = None,
            first_prompts: int | None = None, warn_wide: bool = True) -> dict:
    """Sample k completions per prompt and measure entropy and diversity (and drift vs a reference), each
    mean with its 95% interval (`intervals`: a bootstrap over prompts, samples nested in prompts).

    Args:
        score_batch: sequences per scoring forward (default `batch_size`); a run passes its training
            micro-batch, so the report's scoring needs no more activation memory than a training step.
        verifier: optional ``verifier(prompt index, completion text) -> correct``; adds ``accuracy``,
            the fraction of sampled completions it accepts.
        keep_token_entropy: also return every completion token's entropy (``token_entropy``).
        progress: optional factory ``progress(description, total) -> advance(n)``.
        precision: sample in rounds until the mean entropy's interval is within +-`precision` of it (0.05:
            +-5%), or until `max_samples_per_prompt` (default 4k) samples per prompt; ``precision`` in the
            result says which. A round adds prompts while some are unused (`first_prompts` starts with only
            the first ones: the prompts are then a pool to draw from), else samples to every prompt.
            None or 0: one round of k samples per prompt.
        warn_wide: warn when the interval is wider than +-10% of the mean, or `precision` was not reached (a run's
            steering measurements log their interval instead).

    Returns:
        A JSON-ready dict (fields documented in docs/reference.md, "`--json` fields").
    """
    k = samples_per_prompt
    cap = max_samples_per_prompt or 4 * k
    used = len(prompts) if first_prompts is None else min(len(prompts), max(1, first_prompts))
    counts = [k] * used  # samples so far of each prompt in use
    rounds: list[Rollout] = []
    samples: list[dict] = []  # each round's per-sample entropy sums, token counts and prompts
    plan = [(i, k) for i in range(used)]  # this round: (prompt, samples)
    why, last_rel, added_samples = None, math.inf, False
    while True:
        r = len(rounds)
        total = sum(m for _, m in plan)
        advance = progress("sampling" if r == 0 else f"sampling, round {r + 1}", total) if progress else None
        part = _sample_round(model, tokenizer, prompts, plan, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, top_k=top_k, batch_size=batch_size,
                             seed=seed if r == 0 else _round_seed(seed, r), on_batch=advance,
                             done_everywhere=done_everywhere)
        rounds.append(part)
        if not precision:
            break
        samples.append(score_rollout(model, part, micro_batch=score_batch or batch_size, seed=seed,
                                     per_sample=True, intervals=False)["per_sample"])  # the pooled interval is below
        h = torch.cat([x["entropy"] for x in samples])
        n = torch.cat([x["tokens"] for x in samples])
        mean = float(h.sum() / n.sum()) if int(n.sum()) else 0.0
        rel = relative_half_width(mean, ratio_interval(h, n, torch.cat([x["prompt"] for x in samples]), seed=seed))
        have = int(n.numel())
        if rel <= precision:
            why = f"reached: +-{rel:.1%} after {have} samples in {r + 1} round(s)"
            break
        if added_samples and rel > 0.9 * last_rel:  # 1.5x the samples or more, and the interval barely moved
            why = (f"stopped: more samples per prompt left the interval at +-{rel:.1%} ({have} samples on {used} "
                   "prompts): the spread between prompts dominates; more prompts would narrow it")
            break
        last_rel, added_samples = rel, False
        more = samples_for(rel, have, precision) - have
        if used < len(prompts):  # first new prompts: they narrow a spread between prompts, samples do not
            new = min(len(prompts) - used, max(1, math.ceil(more / k)))
            plan, used, counts = [(i, k) for i in range(used, used + new)], used + new, counts + [k] * new
        else:
            each = min(max(1, math.ceil(more / used)), cap - max(counts))
            if each <= 0:
                why = (f"stopped at the cap of {cap} samples per prompt: +-{rel:.1%} after {have} samples on {used} "
                       "prompts (more prompts narrow it when prompts differ; more samples when completions do)")
                break
            plan, counts = [(i, each) for i in range(used)], [c + each for c in counts]
            added_samples = sum(counts) >= 1.5 * have
    rollout = concat(rounds, pad_id=tokenizer.pad_token_id)
    result = score_rollout(model, rollout, reference=reference, sampling_temperature=temperature,
                           micro_batch=score_batch or batch_size, seed=seed, keep_token_entropy=keep_token_entropy)
    stats = sequence_stats(rollout, eos_token_ids(model, tokenizer), seed=seed)
    result["intervals"] |= stats.pop("intervals")
    result.update(stats)
    if verifier is not None:
        texts = [tokenizer.decode(c, skip_special_tokens=True) for c in rollout.completions()]
        ok = [verifier(int(i), t) for i, t in zip(rollout.prompt_index.tolist(), texts)]
        result["accuracy"] = sum(ok) / max(len(ok), 1)
        result["intervals"]["accuracy"] = ratio_interval(torch.tensor(ok, dtype=torch.float64),
                                                         torch.ones(len(ok)), rollout.prompt_index, seed=seed)
    mean, interval = result["entropy"]["mean"], result["intervals"]["entropy"]
    rel = relative_half_width(mean, interval)
    result.update({"prompts": used, "samples_per_prompt": k, "samples": int(rollout.input_ids.shape[0]),
                   "rounds": len(rounds), "temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed,
                   "precision": {"asked": precision or None,
                                 "relative_half_width": rel if math.isfinite(rel) else None, "outcome": why}})
    if why is not None:
        (log.info if why.startswith("reached") or not warn_wide else log.warning)("--precision %g: %s", precision, why)
    if rel > WIDE and warn_wide:
        need = samples_for(rel, result["samples"], WIDE)
        log.warning("mean entropy %s: the 95%% interval is +-%.0f%% of it (%d samples on %d prompts); about %d samples "
                    "(more prompts, or more samples per prompt) would narrow it to +-%.0f%%",
                    describe(mean, interval), 100 * min(rel, 99.99), result["samples"], used, need, 100 * WIDE)
    return result


def _round_seed(seed: int, round_: int) -> int:
    return (seed * 1_000_003 + round_ * 104_729 + 7) % (2**63 - 1)


def _sample_round(model, tokenizer, prompts: Sequence[Prompt], plan: list[tuple[int, int]], *, seed: int,
                  **sampling) -> Rollout:
    """`plan`'s prompts, m samples each (one m a round), as a Rollout whose `prompt_index` indexes `prompts`."""
    chosen, m = [i for i, _ in plan], plan[0][1]
    part = sample_rollouts(model, tokenizer, [prompts[i] for i in chosen], samples_per_prompt=m, seed=seed, **sampling)
    part.prompt_index = torch.tensor(chosen)[part.prompt_index.cpu()].to(part.prompt_index.device)
    return part


def check_options(*, samples_per_prompt: int, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                  limit: int | None, batch_size: int, max_prompt_tokens: int | None, precision: float | None = None,
                  max_samples_per_prompt: int | None = None, seed: int = 0) -> None:
    """`measure-entropy`'s sampling options: every bad one in one line (TsopsdError), before anything loads."""
    bad = [f"{name} must be {rule}, got {value}" for name, value, ok, rule in (
        ("--samples-per-prompt", samples_per_prompt, 1 <= samples_per_prompt <= MAX_SAMPLES_PER_PROMPT,
         f"in 1..{MAX_SAMPLES_PER_PROMPT} (more prompts narrow the estimate, more samples of one prompt barely do)"),
        ("--max-new-tokens", max_new_tokens, 1 <= max_new_tokens <= MAX_NEW_TOKENS, f"in 1..{MAX_NEW_TOKENS}"),
        ("--seed", seed, 0 <= seed < SEED_LIMIT, "in 0..2^63-1"),
        ("--temperature", temperature, math.isfinite(temperature) and temperature >= 0, "a number >= 0"),
        ("--top-p", top_p, 0 < top_p <= 1, "in (0, 1]"),
        ("--top-k", top_k, top_k >= 0, ">= 0"),
        ("--limit", limit, limit is None or limit >= 1, ">= 1"),
        ("--batch-size", batch_size, batch_size >= 1, ">= 1"),
        ("--max-prompt-tokens", max_prompt_tokens, max_prompt_tokens is None or max_prompt_tokens >= 1, ">= 1"),
        ("--precision", precision, precision is None or (math.isfinite(precision) and 0 <= precision < 1),
         "in [0, 1): 0.05 asks for a 95% interval within +-5% of the mean, 0 for one round"),
        ("--max-samples-per-prompt", max_samples_per_prompt, max_samples_per_prompt is None
         or samples_per_prompt <= max_samples_per_prompt <= MAX_SAMPLES_PER_PROMPT,
         f"in --samples-per-prompt..{MAX_SAMPLES_PER_PROMPT}"),
    ) if not ok]
    if bad:
        raise TsopsdError("; ".join(bad))


def measure_checkpoint(ckpt: str | Path, prompts: str | Path, *, samples_per_prompt: int = 4,
                       max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                       reference: str | Path | None = None, limit: int | None = None, batch_size: int = 16,
                       seed: int = 0, base: str | Path | None = None, device: str = "auto", dtype: str = "auto",
                       prompt_field: str | None = None, max_prompt_tokens: int | None = None,
                       precision: float | None = None, max_samples_per_prompt: int | None = None,
                       show_progress: bool = True) -> dict:
    """Load a checkpoint (and a reference) and prompts, then `measure`; returns the JSON the CLI prints."""
    check_options(seed=seed, samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                  top_p=top_p, top_k=top_k, limit=limit, batch_size=batch_size, max_prompt_tokens=max_prompt_tokens,
                  precision=precision, max_samples_per_prompt=max_samples_per_prompt)
    read_records(prompts, prompt_field, limit)  # a bad prompt file is found before any model loads
    model_ckpt = load_checkpoint(ckpt, base=base, device=device, dtype=dtype)
    ref_model = None
    if reference is not None:
        ref_ckpt = load_checkpoint(reference, device=device, dtype=dtype)
        if ref_ckpt.tokenizer.get_vocab() != model_ckpt.tokenizer.get_vocab():
            raise TsopsdError(f"reference {reference} has a different tokenizer than {ckpt}: they must share one")
        ref_model = ref_ckpt.model
    items = load_prompts(prompts, model_ckpt.tokenizer, prompt_field=prompt_field,
                         max_prompt_tokens=max_prompt_tokens, limit=limit)
    items, max_new_tokens = fit_prompts(items, max_positions(model_ckpt.model), max_new_tokens)
    log.info("measuring %s on %d prompts x %d samples", ckpt, len(items), samples_per_prompt)
    with progress(show_progress) as task:
        metrics = measure(model_ckpt.model, model_ckpt.tokenizer, items, reference=ref_model,
                          samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, top_k=top_k, batch_size=batch_size, seed=seed,
                          progress=task, precision=precision, max_samples_per_prompt=max_samples_per_prompt)
    return {
        "checkpoint": str(ckpt),
        "reference": str(reference) if reference is not None else None,
        "prompts_file": str(prompts),
        "device": str(next(model_ckpt.model.parameters()).device),
        "dtype": str(model_ckpt.dtype).removeprefix("torch."),
        "tsopsd_version": __version__,
        "max_new_tokens": max_new_tokens,
        "metrics": metrics,
    }
