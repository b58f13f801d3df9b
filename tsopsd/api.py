"""The Python API: what the command line does, for an RL loop that reheats without a subprocess.

    import tsopsd
    report = tsopsd.reheat("ckpt/", "prompts.jsonl", "reheated/", config="lora", overrides={"train.steps": 50})
    report = tsopsd.reheat(model, "prompts.jsonl", tokenizer=tok, config="lora")    # a model in memory, in place
    result = tsopsd.measure_entropy("ckpt/", "prompts.jsonl")                        # a path, as the CLI
    result = tsopsd.measure_entropy(model, ["sum 12 =", "add to 7 ="], tokenizer=tok)  # a model in memory

Both raise `TsopsdError` on bad input (with the CLI's one-line message) and `TrainingStopped` when a guard
stopped training; nothing here prints unless `show_progress`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path


def reheat(model, prompts: str | Path | Sequence[str], out: str | Path | None = None, *, tokenizer=None,
           config: str | Path | None = None, overrides: dict | None = None, show_progress: bool = False) -> dict:
    """TS-OPSD on `model` with `prompts`; returns the report (what `OUT/reheat_report.json` holds).

    Args:
        model: a checkpoint folder (as `tsopsd reheat CKPT` takes; then `out` is required), or a causal LM in
            memory with its `tokenizer`: it is trained **in place** and comes back holding the reheated weights
            (a LoRA run's adapter merged into it), in the dtype and on the device it came in, frozen
            (`requires_grad` as it was) and in eval mode. The teacher is a frozen copy taken at the start
            (full mode) or the same weights with the adapter off (LoRA).
        prompts: a prompt file, or (a model in memory) the prompts as strings, used as they are.
        out: the output folder; for a model in memory optional (None: nothing is written; with a folder, the
            merged checkpoint is written there as `tsopsd reheat --save merged` would).
        config: a YAML file or a shipped config's name (`lora`, `full`, ...); `overrides` dotted keys as `--set`
            takes them: {"train.steps": 50, "teacher.target_entropy": 0.8}.
    """
    from tsopsd.checkpoint import Checkpoint
    from tsopsd.config import load_config
    from tsopsd.errors import TsopsdError
    from tsopsd.loop import reheat as run

    keys = {"data.prompts": str(prompts) if isinstance(prompts, (str, Path)) else None, **(overrides or {})}
    if isinstance(model, (str, Path)):
        if out is None or keys["data.prompts"] is None:
            raise TsopsdError("reheat of a checkpoint folder needs a prompt file and out= (the output folder)")
        return run(load_config(config, {"model.path": str(model), "output.out": str(out)} | keys),
                   show_progress=show_progress)
    if tokenizer is None:
        raise TsopsdError("reheat of a model in memory needs its tokenizer= as well")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TsopsdError("reheat of a model in memory runs in one process; for several GPUs reheat a checkpoint "
                          "folder under torchrun")
    first, name = next(model.parameters()), getattr(model, "name_or_path", "") or "a model in memory"
    keys |= {"model.path": name, "model.device": str(first.device), "model.dtype": str(first.dtype).removeprefix("torch."),
             "output.save": "merged", "output.save_every": 0} | ({} if out is not None else {"output.checkpoint_every": 0})
    with tempfile.TemporaryDirectory(prefix="tsopsd-api-") as folder:
        scratch = Path(folder)
        if keys["data.prompts"] is None:
            keys["data.prompts"] = str(scratch / "prompts.jsonl")
            Path(keys["data.prompts"]).write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        keys["output.out"] = str(out if out is not None else scratch / "reheated")
        cfg = load_config(config, keys)
        if cfg.output.resume:
            raise TsopsdError("reheat of a model in memory cannot resume: reheat a checkpoint folder for that")
        ckpt = Checkpoint(model=model, tokenizer=tokenizer, path=Path(name), base_path=None, dtype=first.dtype,
                          source="a model in memory")
        return _in_place(ckpt, lambda: run(cfg, show_progress=show_progress, model=ckpt, write=out is not None))


def _in_place(ckpt, reheat_it) -> dict:
    """Run `reheat_it` on the model in memory of `ckpt`; its tokenizer padding, and the model's flags and mode, as
    they were, whatever happens."""
    model, tokenizer = ckpt.model, ckpt.tokenizer
    if getattr(tokenizer, "pad_token", None) is None:  # batched rollouts pad (left), as `load_checkpoint` sets up
        tokenizer.pad_token = tokenizer.eos_token
    flags, training = {name: p.requires_grad for name, p in model.named_parameters()}, model.training
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return reheat_it()
    finally:
        tokenizer.padding_side = side
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, False))
        model.train(training)


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
