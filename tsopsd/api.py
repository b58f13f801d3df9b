"""The Python API: what the command line does, for an RL loop that reheats without a subprocess.

    import tsopsd
    report = tsopsd.reheat("ckpt/", "prompts.jsonl", "reheated/", config="lora", overrides={"train.steps": 50})
    report = tsopsd.reheat(model, "prompts.jsonl", tokenizer=tok, config="lora")    # a model in memory, in place
    result = tsopsd.measure_entropy("ckpt/", "prompts.jsonl")                        # a path, as the CLI
    result = tsopsd.measure_entropy(model, ["sum 12 =", "add to 7 ="], tokenizer=tok)  # a model in memory

Both raise `TsopsdError` on bad input (with the CLI's one-line message) and `TrainingStopped` when a guard
stopped training or nothing was trained (its `code` is the CLI's exit code); a run that ended without meeting
its goal returns its report with `status` "goal_not_met" (the CLI's exit 4): check `report["status"] == "met"`.
Nothing here prints unless `show_progress`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch


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
    from tsopsd.folders import holds_weights_of
    from tsopsd.loop import reheat as run

    if overrides is not None and not (isinstance(overrides, dict) and all(isinstance(k, str) for k in overrides)):
        raise TsopsdError(f"reheat: overrides= must be a dict of dotted keys, such as {{'train.steps': 50}}, got "
                          f"{type(overrides).__name__}")
    keys = {"data.prompts": str(prompts) if isinstance(prompts, (str, Path)) else None, **(overrides or {})}
    if isinstance(model, (str, Path)):
        if out is None or keys["data.prompts"] is None:
            raise TsopsdError("reheat of a checkpoint folder needs a prompt file and out= (the output folder)")
        return run(load_config(config, {"model.path": str(model), "output.out": str(out)} | keys),
                   show_progress=show_progress)
    if tokenizer is None:
        raise TsopsdError("reheat of a model in memory needs its tokenizer= as well")
    _refuse(model, tokenizer, what="reheat")  # before anything is touched
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TsopsdError("reheat of a model in memory runs in one process; for several GPUs reheat a checkpoint "
                          "folder under torchrun")
    if out is not None and holds_weights_of(Path(out), model):
        raise TsopsdError(f"reheat: out={out} holds the weights this model came with (the folder it was loaded from, "
                          "or a copy): writing there would replace them; choose a new folder")
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
        with _borrowed(model, tokenizer, what="reheat"):
            return run(cfg, show_progress=show_progress, model=ckpt, write=out is not None)


def _refuse(model, tokenizer, *, what: str) -> None:
    """What `what` cannot take, in one line (TsopsdError): a model that is no causal LM or is not loaded, a tokenizer
    that is no tokenizer or has nothing to pad with, a PEFT model to train (its adapter would train beside tsopsd's)."""
    from tsopsd.errors import TsopsdError

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config") or next(model.parameters(), None) is None:
        raise TsopsdError(f"{what}: model must be a transformers causal LM (or a checkpoint folder), got "
                          f"{type(model).__name__}")
    if isinstance(tokenizer, (str, Path)) or not callable(tokenizer) or not hasattr(tokenizer, "get_vocab"):
        raise TsopsdError(f"{what}: tokenizer= must be the model's transformers tokenizer, got {type(tokenizer).__name__}")
    if what == "reheat" and hasattr(model, "peft_config"):
        raise TsopsdError("reheat of a PEFT model in memory: its adapter would train beside tsopsd's; merge it first "
                          "(model = model.merge_and_unload()) or reheat its saved adapter folder")
    if next(model.parameters()).device.type == "meta":
        raise TsopsdError(f"{what}: the model's weights are on the meta device (not loaded)")
    pad = getattr(tokenizer, "pad_token", None)
    if pad is None and getattr(tokenizer, "eos_token", None) is None:
        raise TsopsdError(f"{what}: the tokenizer has neither a pad token nor an eos token to pad with: set "
                          "tokenizer.pad_token")


@contextlib.contextmanager
def _borrowed(model, tokenizer, *, what: str):
    """The caller's model and tokenizer set up for a run, and put back as they were whatever happens: a pad token
    (the eos token) where there is none, left padding, eval mode; `requires_grad`, train/eval and the tokenizer's
    padding as they came, and torch's global random state (an RL loop that measures between its steps samples
    what it would have sampled without the measurement). `_refuse`s first, before anything is touched."""
    _refuse(model, tokenizer, what=what)
    pad = tokenizer.pad_token
    flags, training, side = {name: p.requires_grad for name, p in model.named_parameters()}, model.training, \
        tokenizer.padding_side
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            if pad is None:  # batched rollouts pad (left), as `load_checkpoint` sets up
                tokenizer.pad_token = tokenizer.eos_token
            tokenizer.padding_side = "left"
            model.eval()  # train mode would turn on dropout and a gradient-checkpointed model's use_cache=False
            yield
        finally:
            if pad is None:
                tokenizer.pad_token = None
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
    from tsopsd.family import max_positions
    from tsopsd.metrics import check_options, measure
    from tsopsd.prompts import Prompt, fit_prompts, load_prompts

    if tokenizer is None:
        raise TsopsdError("measure_entropy of a model in memory needs its tokenizer= as well")
    check_options(seed=seed, samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens, precision=precision,
                  temperature=options.get("temperature", 1.0), top_p=options.get("top_p", 1.0),
                  top_k=options.get("top_k", 0), batch_size=options.get("batch_size", 16), limit=None,
                  max_prompt_tokens=None, max_samples_per_prompt=options.get("max_samples_per_prompt"))
    with _borrowed(model, tokenizer, what="measure_entropy"):
        if isinstance(prompts, (str, Path)):
            items = load_prompts(prompts, tokenizer)
        else:
            if isinstance(prompts, str) or not all(isinstance(p, str) and p.strip() for p in prompts) or not prompts:
                raise TsopsdError("measure_entropy: prompts must be a prompt file or a non-empty list of non-empty strings")
            items = [Prompt(text, tuple(tokenizer(text)["input_ids"])) for text in prompts]
        items, max_new_tokens = fit_prompts(items, max_positions(model), max_new_tokens)
        return measure(model, tokenizer, items, reference=reference, samples_per_prompt=samples_per_prompt,
                       max_new_tokens=max_new_tokens, precision=precision, seed=seed, **options)
