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
from tsopsd.batch import Rollout
from tsopsd.checkpoint import load_checkpoint
from tsopsd.config import MAX_SAMPLES_PER_PROMPT
from tsopsd.console import progress
from tsopsd.distributions import entropy, kl_divergence, summarize_entropy, temperature_for_entropy, topk_overlap
from tsopsd.errors import TsopsdError
from tsopsd.family import eos_token_ids, max_positions
from tsopsd.prompts import Prompt, load_prompts, prompt_room
from tsopsd.rollout import sample_rollouts
from tsopsd.scoring import as_scorer

log = logging.getLogger(__name__)

TOPK = (5, 10)


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
                  micro_batch: int = 8, chunk_size: int = 1024, seed: int = 0, keep_token_entropy: bool = False) -> dict:
    """Token metrics of `model` on the completions of `rollout`, teacher-forced.

    `model` and `reference` are modules or `Scorer`s (a Scorer can view a PEFT model's base).

    Returns a dict with ``entropy`` (summary at T=1), ``entropy_at_sampling_temperature``,
    ``top1_prob``, ``tokens`` and, with a reference, a ``reference`` dict (its ``layers`` from
    `layer_similarity`, on the final position of every rollout row).
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
        ref["layers"] = layer_similarity(torch.cat(layers[0]), torch.cat(layers[1])) if layers[0] else None
        result["reference"] = ref
    return result


def measure(model, tokenizer, prompts: Sequence[Prompt], *, reference=None, samples_per_prompt: int = 4,
            max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
            batch_size: int = 16, score_batch: int | None = None, seed: int = 0,
            verifier: Callable[[int, str], bool] | None = None,
            keep_token_entropy: bool = False, done_everywhere: Callable[[bool], bool] | None = None,
            progress: Callable[[str, int], Callable[[int], None]] | None = None) -> dict:
    """Sample k completions per prompt and measure entropy and diversity (and drift vs a reference).

    Args:
        score_batch: sequences per scoring forward (default `batch_size`); a run passes its training
            micro-batch, so the report's scoring needs no more activation memory than a training step.
        verifier: optional ``verifier(prompt index, completion text) -> correct``; adds ``accuracy``,
            the fraction of sampled completions it accepts.
        keep_token_entropy: also return every completion token's entropy (``token_entropy``).
        progress: optional factory ``progress(description, total) -> advance(n)``.

    Returns:
        A JSON-ready dict (fields documented in README.md, "measure-entropy --json").
    """
    total = len(prompts) * samples_per_prompt
    advance = progress("sampling", total) if progress else None
    rollout = sample_rollouts(model, tokenizer, prompts, samples_per_prompt=samples_per_prompt,
                              max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              batch_size=batch_size, seed=seed, on_batch=advance,
                              done_everywhere=done_everywhere)
    result = score_rollout(model, rollout, reference=reference, sampling_temperature=temperature,
                           micro_batch=score_batch or batch_size, seed=seed, keep_token_entropy=keep_token_entropy)
    result.update(sequence_stats(rollout, eos_token_ids(model, tokenizer)))
    if verifier is not None:
        texts = [tokenizer.decode(c, skip_special_tokens=True) for c in rollout.completions()]
        ok = [verifier(int(i), t) for i, t in zip(rollout.prompt_index.tolist(), texts)]
        result["accuracy"] = sum(ok) / max(len(ok), 1)
    result.update({"prompts": len(prompts), "samples_per_prompt": samples_per_prompt, "temperature": temperature,
                   "max_new_tokens": max_new_tokens, "seed": seed})
    return result


def check_options(*, samples_per_prompt: int, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                  limit: int | None, batch_size: int, max_prompt_tokens: int | None) -> None:
    """`measure-entropy`'s sampling options: every bad one in one line (TsopsdError), before anything loads."""
    bad = [f"{name} must be {rule}, got {value}" for name, value, ok, rule in (
        ("--samples-per-prompt", samples_per_prompt, 1 <= samples_per_prompt <= MAX_SAMPLES_PER_PROMPT,
         f"in 1..{MAX_SAMPLES_PER_PROMPT} (more prompts narrow the estimate, more samples of one prompt barely do)"),
        ("--max-new-tokens", max_new_tokens, max_new_tokens >= 1, ">= 1"),
        ("--temperature", temperature, math.isfinite(temperature) and temperature >= 0, "a number >= 0"),
        ("--top-p", top_p, 0 < top_p <= 1, "in (0, 1]"),
        ("--top-k", top_k, top_k >= 0, ">= 0"),
        ("--limit", limit, limit is None or limit >= 1, ">= 1"),
        ("--batch-size", batch_size, batch_size >= 1, ">= 1"),
        ("--max-prompt-tokens", max_prompt_tokens, max_prompt_tokens is None or max_prompt_tokens >= 1, ">= 1"),
    ) if not ok]
    if bad:
        raise TsopsdError("; ".join(bad))


def measure_checkpoint(ckpt: str | Path, prompts: str | Path, *, samples_per_prompt: int = 4,
                       max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                       reference: str | Path | None = None, limit: int | None = None, batch_size: int = 16,
                       seed: int = 0, base: str | Path | None = None, device: str = "auto", dtype: str = "auto",
                       prompt_field: str | None = None, max_prompt_tokens: int | None = None,
                       show_progress: bool = True) -> dict:
    """Load a checkpoint (and a reference) and prompts, then `measure`; returns the JSON the CLI prints."""
    check_options(samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                  top_p=top_p, top_k=top_k, limit=limit, batch_size=batch_size, max_prompt_tokens=max_prompt_tokens)
    model_ckpt = load_checkpoint(ckpt, base=base, device=device, dtype=dtype)
    ref_model = None
    if reference is not None:
        ref_ckpt = load_checkpoint(reference, device=device, dtype=dtype)
        if ref_ckpt.tokenizer.get_vocab() != model_ckpt.tokenizer.get_vocab():
            raise TsopsdError(f"reference {reference} has a different tokenizer than {ckpt}: they must share one")
        ref_model = ref_ckpt.model
    items = load_prompts(prompts, model_ckpt.tokenizer, prompt_field=prompt_field,
                         max_prompt_tokens=max_prompt_tokens, limit=limit,
                         room=prompt_room(max_positions(model_ckpt.model), max_new_tokens))
    log.info("measuring %s on %d prompts x %d samples", ckpt, len(items), samples_per_prompt)
    with progress(show_progress) as task:
        metrics = measure(model_ckpt.model, model_ckpt.tokenizer, items, reference=ref_model,
                          samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, top_k=top_k, batch_size=batch_size, seed=seed,
                          progress=task)
    return {
        "checkpoint": str(ckpt),
        "reference": str(reference) if reference is not None else None,
        "prompts_file": str(prompts),
        "device": str(next(model_ckpt.model.parameters()).device),
        "dtype": str(model_ckpt.dtype).removeprefix("torch."),
        "tsopsd_version": __version__,
        "metrics": metrics,
    }
