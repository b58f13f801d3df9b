"""`tsopsd measure-entropy` and `tsopsd watch`: a checkpoint's entropy, a run's entropy over its checkpoints.

    tsopsd measure-entropy ckpt/ --prompts prompts.jsonl --samples-per-prompt 4 --json
    tsopsd watch rl-run/ --prompts prompts.jsonl --once
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tsopsd.cli.frame import Base, Debug, Device, Dtype, Json, MaxPromptTokens, PromptField, Prompts, Quiet, Seed, emit, run_body
from tsopsd.cli.options import ConfigFile, Method
from tsopsd.errors import ExitCode, TsopsdError


def measure_entropy(
    ckpts: Annotated[list[Path], typer.Argument(
        help="A checkpoint folder (save_pretrained) or PEFT adapter folder; or an RL run folder (checkpoint-N, "
             "global_step_N inside), or several checkpoints: then every one is measured, in step order.")],
    prompts: Prompts,
    samples_per_prompt: Annotated[int, typer.Option(help="Completions sampled per prompt (k).")] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="Completion length cap.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy).")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold (1: off).")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Top-k sampling (0: off).")] = 0,
    reference: Annotated[Optional[Path], typer.Option(help="Reference checkpoint (same tokenizer) for KL, agreement, effective T.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N prompts.")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences sampled and scored together.")] = 16,
    seed: Seed = 0,
    base: Base = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    prompt_field: PromptField = None,
    max_prompt_tokens: MaxPromptTokens = None,
    as_json: Json = False,
    out: Annotated[Optional[Path], typer.Option(help="Also write the JSON result to this file.")] = None,
    collapse_ratio: Annotated[float, typer.Option(
        help="Several checkpoints: entropy below this fraction of the first checkpoint's marks the collapse.")] = 0.5,
    plot: Annotated[Optional[Path], typer.Option(
        help="Several checkpoints: also draw entropy over steps to this PNG (needs matplotlib).")] = None,
    precision: Annotated[float, typer.Option(
        help="Sample in rounds until the mean entropy's 95% interval is within +-P of it (0.05: +-5%); 0: one round.")] = 0.05,
    max_samples_per_prompt: Annotated[Optional[int], typer.Option(
        help="Cap of --precision's rounds (default 4 x --samples-per-prompt).")] = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Measure token entropy and diversity of a checkpoint's own rollouts (and drift from a reference).

    Given a run folder or several checkpoints: measure each, in step order, mark the collapse, say which to reheat.
    """
    def body() -> None:
        from tsopsd import console
        from tsopsd.metrics import measure_checkpoint
        from tsopsd.paths import check_out_name, check_writes, check_writes_apart, temporary
        from tsopsd.prompts import check_prompt_file
        from tsopsd.trajectory import find_checkpoints
        from tsopsd.writing import check_writable

        console.setup_logging(quiet=quiet)
        writes = {"--out": out, "--plot": plot}  # each written beside and renamed into place:
        writes |= {f"{flag}'s temporary": temporary(p) for flag, p in writes.items() if p}
        for flag, path in writes.items():
            if path is not None:  # found out now, not after the whole measurement
                check_out_name(path, flag)
                check_writable(path, folder=False)
        check_writes(writes, {**{"checkpoint" if len(ckpts) == 1 else f"checkpoint {i + 1}": c
                                 for i, c in enumerate(ckpts)}, "prompt file": prompts,
                              "reference": reference, "adapter base": base})
        check_writes_apart(writes)
        check_prompt_file(prompts)
        if plot is not None and plot.suffix.lower() not in (".png", ".svg", ".pdf"):
            raise TsopsdError(f"--plot {plot}: name a .png, .svg or .pdf file")
        if plot is not None:
            from tsopsd.charts import have_matplotlib

            if not have_matplotlib():
                raise TsopsdError("--plot needs matplotlib: pip install 'tsopsd[plot]'")
        found = find_checkpoints(ckpts)
        if found:
            return _trajectory(found)
        if plot is not None:
            raise TsopsdError("--plot draws entropy over several checkpoints: give a run folder or several checkpoints")
        ckpt = ckpts[0]
        result = measure_checkpoint(
            ckpt, prompts, samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, reference=reference, limit=limit,
            batch_size=batch_size, seed=seed, base=base, device=device, dtype=dtype, prompt_field=prompt_field,
            max_prompt_tokens=max_prompt_tokens, precision=precision, max_samples_per_prompt=max_samples_per_prompt,
            show_progress=not quiet)
        from tsopsd.tables import metrics_table

        emit(result, as_json=as_json, out=out,
              table=lambda: metrics_table({str(ckpt): result["metrics"]}, title="tsopsd measure-entropy"))

    def _trajectory(found) -> None:
        from tsopsd.tables import trajectory_table
        from tsopsd.trajectory import measure_trajectory

        result = measure_trajectory(
            found, prompts, reference=reference, collapse_ratio=collapse_ratio, samples_per_prompt=samples_per_prompt,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, limit=limit,
            batch_size=batch_size, seed=seed, base=base, device=device, dtype=dtype, prompt_field=prompt_field,
            max_prompt_tokens=max_prompt_tokens, precision=precision, max_samples_per_prompt=max_samples_per_prompt,
            show_progress=not quiet)
        if plot is not None:
            from tsopsd.charts import save_trajectory_png

            result["plot"] = str(save_trajectory_png(plot, result))
            logging.getLogger("tsopsd").info("wrote %s", result["plot"])
        emit(result, as_json=as_json, out=out, table=lambda: trajectory_table(result))
        if not as_json and result["reheat"].get("command"):  # beneath the table: the command, ready to run
            sys.stdout.write(f"next: reheat the collapsed checkpoint back to the first one's entropy:\n  "
                             f"{result['reheat']['command']}\n")

    run_body(body, debug=debug)



def watch(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="The RL run's folder of checkpoint-N / "
                                                                     "global_step_N checkpoints.")],
    prompts: Annotated[Path, typer.Option("--prompts", "-p", help="Prompts to measure each checkpoint on (and to "
                                                                   "solve the reheat's tau on).")],
    once: Annotated[bool, typer.Option("--once", help="Look once, act, exit (cron, SLURM chains); default: poll until "
                                                      "the rule fires.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between looks.")] = 300.0,
    settle: Annotated[float, typer.Option(help="A checkpoint counts once no file in it changed for this many "
                                               "seconds (still being written otherwise).")] = 60.0,
    collapse_ratio: Annotated[float, typer.Option(help="Collapsed: entropy below this x the first checkpoint's.")] = 0.5,
    min_entropy: Annotated[Optional[float], typer.Option(help="Or below this many nats.")] = None,
    consecutive: Annotated[int, typer.Option(help="...for this many checkpoints in a row.")] = 1,
    method: Annotated[Method, typer.Option(help="How to reheat: scale (the closed form, seconds) or distill.")] =
    Method.scale,
    target_entropy: Annotated[Optional[float], typer.Option(help="Reheat to this entropy (default: the first "
                                                                  "checkpoint's, before the collapse).")] = None,
    config: ConfigFile = None,
    samples_per_prompt: Annotated[int, typer.Option(help="Samples per prompt in each measurement.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="Completion length cap in each measurement.")] = 256,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto (cuda when present, else cpu), cpu, cuda:N.")] = "auto",
    as_json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Follow an RL run's checkpoints; when entropy collapses, write NAME-reheated beside the checkpoint and print how
    to resume from it. Exit 0: nothing to do; 3: reheated (resume from the printed path); 2: bad input."""
    def body() -> int:
        from tsopsd import console
        from tsopsd.watch import watch as follow

        console.setup_logging(quiet=quiet)
        result = follow(run_dir, prompts, once=once, interval=interval, settle=settle, ratio=collapse_ratio,
                        min_entropy=min_entropy, consecutive=consecutive, method=method.value, config=config,
                        target_entropy=target_entropy, samples_per_prompt=samples_per_prompt,
                        max_new_tokens=max_new_tokens, seed=seed, device=device, show_progress=not quiet)
        if as_json:
            emit(result, as_json=True, out=None, table=lambda: None)
        else:
            lines = [f"{c['checkpoint']}: entropy {c['entropy']:.4f}" for c in result["checkpoints"]]
            if result["status"] == "nothing":
                lines.append(f"no collapse ({result['rule']['words']})")
            else:
                what = "reheated" if result["status"] == "reheated" else "reheated already"
                lines.append(f"collapse at {result['fired_at']} ({result['rule']['words']}): {what} -> {result['reheated']}")
                lines += [f"  {name}: {command}" for name, command in result["resume"].items()]
            typer.echo("\n".join(lines))
        return ExitCode.REHEATED if result["status"] == "reheated" else ExitCode.DONE

    code = run_body(body, debug=debug)
    if code:
        raise typer.Exit(int(code))

