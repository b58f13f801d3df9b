"""A run's entropy trajectory: every checkpoint of an RL run measured the same way, in step order.

    found = find_checkpoints([Path("checkpoints/proj/exp")])      # [(step, folder), ...] or [] for one model
    result = measure_trajectory(found, "prompts.jsonl", samples_per_prompt=4)

`tsopsd measure-entropy RUN_DIR` (or several folders, kept in the order given) lands here. Recognized below a
run folder, one level down, in step order: TRL's `checkpoint-N/`, verl's `global_step_N/` (its model in
`actor/huggingface/` or `actor/`), then any other model folder. A verl step is loaded from `actor/huggingface/` when that
holds weights, else from the actor's rank shards (`verl_fsdp`). Each checkpoint is measured on the same prompts with the
same seed, against one reference (`--reference`, default the first checkpoint), loaded one at a time,
so memory holds the reference and one checkpoint. The first checkpoint whose mean entropy falls below
`collapse_ratio` x the first one's marks the collapse, and that checkpoint is the one to reheat: it has
all the RL progress made before the collapse, and the steps after it trained on near-identical rollouts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from tsopsd.errors import TsopsdError
from tsopsd.verl_fsdp import is_actor

log = logging.getLogger(__name__)

STEP = re.compile(r"(?:global_step_|checkpoint-)(\d+)$")  # TRL's and verl's names: the only ones that name a step
INSIDE = ("", "actor", "huggingface")  # where a run's step folder keeps its model


def is_model_folder(path: Path) -> bool:
    """A folder `load_checkpoint` takes: a model or adapter folder, or a verl actor (its huggingface/ always
    holds a config.json, with weights or without, so the actor is what counts)."""
    if not path.is_dir():
        return False
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file() or is_actor(path)


def _model_in(folder: Path) -> Path | None:
    for sub in INSIDE:
        candidate = folder / sub if sub else folder
        if is_model_folder(candidate):
            return candidate
    return None


def step_of(folder: Path) -> int | None:
    m = STEP.search(folder.name)
    return int(m[1]) if m else None


def find_checkpoints(paths: Sequence[Path]) -> list[tuple[int | None, Path]]:
    """The checkpoints to measure, as (step, model folder); [] when `paths` is one model folder.

    Paths given keep the order they were given in. A path that is a model folder is one checkpoint; otherwise
    its subfolders that hold a model (directly or where verl keeps it) are, in step order (`checkpoint-N`,
    `global_step_N`), then those without a step by name. Only those two names give a step: `reheated2` does not.
    """
    paths = [Path(p) for p in paths]
    if len(paths) == 1 and (is_model_folder(paths[0]) or is_actor(paths[0] / "actor")):
        return []  # one checkpoint (a verl step folder too: the loader finds its actor/)
    found: list[tuple[int | None, Path]] = []
    for path in paths:
        if not path.exists():
            raise TsopsdError(f"checkpoint not found: {path}")
        model = _model_in(path)
        if model is not None:
            found.append((step_of(path), model))
            continue
        inside = [(step_of(child), _model_in(child)) for child in sorted(path.iterdir())  # .checkpoint-9.tmp: half
                  if child.is_dir() and not child.name.startswith(".")]                    # written, never read
        inside = [(s, m) for s, m in inside if m is not None]
        inside = sorted((x for x in inside if x[0] is not None), key=lambda x: x[0]) + [x for x in inside if x[0] is None]
        if not inside:
            if len(paths) == 1:
                return []  # one path, no model and no checkpoints: the single-checkpoint loader says what is wrong
            raise TsopsdError(f"no checkpoint in {path}: expected a model folder or folders such as checkpoint-N "
                              "or global_step_N holding one")
        found += inside
    return found


def collapse_point(entropies: Sequence[float], ratio: float, *, min_entropy: float | None = None,
                   consecutive: int = 1) -> int | None:
    """Index of the first measurement that ends `consecutive` in a row below `ratio` x the first one's entropy (or
    below `min_entropy` nats), or None: the collapse rule of `measure-entropy RUN_DIR`, `watch` and the TRL
    callback."""
    if not entropies:
        return None
    floor = max(ratio * entropies[0], min_entropy or 0.0)
    run = 0
    for i, h in enumerate(entropies):
        run = run + 1 if h < floor else 0
        if run >= consecutive:
            return i
    return None


def measure_trajectory(found: list[tuple[int | None, Path]], prompts: str | Path, *, reference: Path | None = None,
                       collapse_ratio: float = 0.5, samples_per_prompt: int = 4, max_new_tokens: int = 256,
                       temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, limit: int | None = None,
                       batch_size: int = 16, seed: int = 0, base: Path | None = None, device: str = "auto",
                       dtype: str = "auto",
                       prompt_field: str | None = None, max_prompt_tokens: int | None = None,
                       precision: float | None = None, max_samples_per_prompt: int | None = None,
                       show_progress: bool = True) -> dict:
    """Measure every checkpoint of `found` (see `find_checkpoints`); JSON-ready (docs/reference.md, "A run's trajectory")."""
    import gc

    from tsopsd import __version__
    from tsopsd.checkpoint import load_checkpoint
    from tsopsd.console import progress
    from tsopsd.family import max_positions
    from tsopsd.metrics import check_options, measure
    from tsopsd.prompts import fit_prompts, load_prompts, read_records

    check_options(seed=seed, samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                  top_p=top_p, top_k=top_k, limit=limit, batch_size=batch_size, max_prompt_tokens=max_prompt_tokens,
                  precision=precision, max_samples_per_prompt=max_samples_per_prompt)
    if not 0 < collapse_ratio < 1:
        raise TsopsdError(f"--collapse-ratio must be in (0, 1), got {collapse_ratio}")
    ref_path = Path(reference) if reference is not None else found[0][1]
    read_records(prompts, prompt_field, limit)  # a bad prompt file is found before any model loads
    ref = load_checkpoint(ref_path, base=base, device=device, dtype=dtype)
    items = load_prompts(prompts, ref.tokenizer, prompt_field=prompt_field, max_prompt_tokens=max_prompt_tokens,
                         limit=limit)
    items, max_new_tokens = fit_prompts(items, max_positions(ref.model), max_new_tokens)
    rows = []
    log.info("measuring %d checkpoints on %d prompts x %d samples against %s", len(found), len(items),
             samples_per_prompt, ref_path)
    with progress(show_progress) as task:
        advance = task("checkpoints", len(found))
        for step, folder in found:
            ck = ref if folder.resolve() == ref_path.resolve() else load_checkpoint(folder, base=base, device=device,
                                                                                          dtype=dtype)
            if ck.tokenizer.get_vocab() != ref.tokenizer.get_vocab():
                raise TsopsdError(f"{folder} has a different tokenizer than {ref_path}: a run's checkpoints share one")
            metrics = measure(ck.model, ck.tokenizer, items, reference=ref.model, samples_per_prompt=samples_per_prompt,
                              max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              batch_size=batch_size, seed=seed, precision=precision,
                              max_samples_per_prompt=max_samples_per_prompt)
            rows.append({"step": step, "checkpoint": str(folder), "metrics": metrics})
            if ck is not ref:
                del ck
                gc.collect()
            advance(1)
    entropies = [r["metrics"]["entropy"]["mean"] for r in rows]
    at = collapse_point(entropies, collapse_ratio)
    first = entropies[0]
    if at is None:
        advice = {"checkpoint": None, "step": None,
                  "why": f"no collapse: entropy stayed above {collapse_ratio:g} x the first checkpoint's ({first:.4f})"}
    else:
        import shlex

        chosen = rows[at]["checkpoint"]
        advice = {"checkpoint": chosen, "step": rows[at]["step"],
                  "why": f"the first checkpoint whose entropy ({entropies[at]:.4f}) is below {collapse_ratio:g} x the "
                         f"first one's ({first:.4f}): it keeps the RL progress made before the collapse",
                  # back to the entropy before the collapse, on the same prompts
                  "command": shlex.join(["tsopsd", "reheat", chosen, "--prompts", str(prompts), "--out",
                                         f"{Path(chosen).name}-reheated", "--target-entropy-from", rows[0]["checkpoint"]])}
    return {
        "checkpoints": rows, "reference": str(ref_path), "prompts_file": str(prompts),
        "collapse": {"ratio": collapse_ratio, "first_entropy": first, "index": at,
                     "step": rows[at]["step"] if at is not None else None},
        "reheat": advice, "tsopsd_version": __version__,
        "device": str(next(ref.model.parameters()).device), "dtype": str(ref.dtype).removeprefix("torch."),
    }
