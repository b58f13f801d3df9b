"""`tsopsd measure-entropy`: load a checkpoint and prompts, sample, measure.

    result = run_measure("ckpt/", "prompts.jsonl", samples_per_prompt=4)
    result["metrics"]["entropy"]["mean"]
"""

from __future__ import annotations

import logging
from pathlib import Path

from tsopsd import __version__
from tsopsd.checkpoint import load_checkpoint
from tsopsd.console import progress
from tsopsd.metrics import measure
from tsopsd.prompts import load_prompts

log = logging.getLogger(__name__)


def run_measure(ckpt: str | Path, prompts: str | Path, *, samples_per_prompt: int = 4, max_new_tokens: int = 256,
                temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, reference: str | Path | None = None,
                limit: int | None = None, batch_size: int = 16, seed: int = 0, base: str | Path | None = None,
                device: str = "auto", dtype: str = "auto", prompt_field: str | None = None,
                max_prompt_tokens: int | None = None, show_progress: bool = True) -> dict:
    """Measure a checkpoint; returns the JSON-ready result documented in the README."""
    model_ckpt = load_checkpoint(ckpt, base=base, device=device, dtype=dtype)
    ref_model = None
    if reference is not None:
        ref_ckpt = load_checkpoint(reference, device=device, dtype=dtype)
        if ref_ckpt.tokenizer.get_vocab() != model_ckpt.tokenizer.get_vocab():
            from tsopsd.errors import TsopsdError

            raise TsopsdError(f"reference {reference} has a different tokenizer than {ckpt}: they must share one")
        ref_model = ref_ckpt.model
    items = load_prompts(prompts, model_ckpt.tokenizer, prompt_field=prompt_field,
                         max_prompt_tokens=max_prompt_tokens, limit=limit)
    log.info("measuring %s on %d prompts x %d samples", ckpt, len(items), samples_per_prompt)
    with progress(show_progress) as task:
        metrics = measure(model_ckpt.model, model_ckpt.tokenizer, items, reference=ref_model,
                          samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, top_k=top_k, batch_size=batch_size, seed=seed,
                          progress=task)
    device_used = next(model_ckpt.model.parameters()).device
    return {
        "checkpoint": str(ckpt),
        "reference": str(reference) if reference is not None else None,
        "prompts_file": str(prompts),
        "device": str(device_used),
        "dtype": str(model_ckpt.dtype).removeprefix("torch."),
        "tsopsd_version": __version__,
        "metrics": metrics,
    }
