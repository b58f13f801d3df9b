"""The Python API: what the command line does, for an RL loop that reheats without a subprocess.

    from tsopsd.api import measure_entropy, reheat
    report = reheat("ckpt/", "prompts.jsonl", "reheated/", config="lora", overrides={"train.steps": 50})
    result = measure_entropy("ckpt/", "prompts.jsonl")                               # a path, as the CLI
    result = measure_entropy(model, ["sum 12 =", "add to 7 ="], tokenizer=tok)       # a model in memory

Both raise `TsopsdError` on bad input (with the CLI's one-line message) and `TrainingStopped` when a guard
stopped training; nothing here prints unless `show_progress`. (Not `from tsopsd import reheat`: the package's
submodule `tsopsd.reheat`, the loop, takes that name on the package as soon as it is imported.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def reheat(checkpoint: str | Path, prompts: str | Path, out: str | Path, *, config: str | Path | None = None,
           overrides: dict | None = None, show_progress: bool = False) -> dict:
    """Run `tsopsd reheat CHECKPOINT --prompts PROMPTS --out OUT [--config CONFIG]` with `overrides` (dotted config
    keys, as `--set` takes them: {"train.steps": 50, "teacher.target_entropy": 0.8}). Returns the report that
    `OUT/reheat_report.json` holds."""
    from tsopsd.config import load_config
    from tsopsd.reheat import reheat as run

    cfg = load_config(config, {"model.path": str(checkpoint), "data.prompts": str(prompts), "output.out": str(out),
                               **(overrides or {})})
    return run(cfg, show_progress=show_progress)


def measure_entropy(model, prompts: str | Path | Sequence[str], *, tokenizer=None, samples_per_prompt: int = 4,
                    max_new_tokens: int = 256, precision: float | None = 0.05, seed: int = 0, reference=None,
                    show_progress: bool = False, **options) -> dict:
    """Entropy and diversity of a model's own rollouts, each mean with its 95% interval (`measure-entropy`).

    Args:
        model: a checkpoint folder (as the CLI takes) or a causal LM in memory (then `tokenizer` is needed).
        prompts: a prompt file, or the prompts as strings (tokenized as they are, no chat template).
        reference: for a model in memory, another in memory (same tokenizer); for a path, a path.
        options: the other `measure-entropy` settings (temperature, top_p, top_k, batch_size, ...).

    Returns:
        For a path, what `measure-entropy --json` prints; for a model in memory, its `metrics` part.
    """
    if isinstance(model, (str, Path)):
        from tsopsd.metrics import measure_checkpoint

        return measure_checkpoint(model, prompts, samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
                                  precision=precision, seed=seed, reference=reference, show_progress=show_progress,
                                  **options)
    from tsopsd.errors import TsopsdError
    from tsopsd.metrics import measure
    from tsopsd.prompts import Prompt, load_prompts

    if tokenizer is None:
        raise TsopsdError("measure_entropy of a model in memory needs its tokenizer= as well")
    if isinstance(prompts, (str, Path)):
        items = load_prompts(prompts, tokenizer)
    else:
        items = [Prompt(text, tuple(tokenizer(text)["input_ids"])) for text in prompts]
    return measure(model, tokenizer, items, reference=reference, samples_per_prompt=samples_per_prompt,
                   max_new_tokens=max_new_tokens, precision=precision, seed=seed, **options)
