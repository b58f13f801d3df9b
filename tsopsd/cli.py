"""Command-line interface: a thin Typer layer over library functions.

    tsopsd measure-entropy ckpt/ --prompts prompts.jsonl --samples-per-prompt 4 --json
    tsopsd reheat ckpt/ --prompts prompts.jsonl --out reheated/ --temperature 1.5
    tsopsd plan ckpt/config.json --config configs/qwen3-4b-1gpu.yaml --gpus 1 --gpu-memory 80GB
    tsopsd demo

Exit codes: `errors.ExitCode`, the one table (docs/reference.md, "Exit codes"). Errors are one line on
stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer

from tsopsd.errors import ExitCode, TrainingStopped, TsopsdError
from tsopsd.runtime import cuda_allocator, ignore_signals, on_bus_error, restore_signals, utf8_mode


class _Command(typer.core.TyperCommand):
    """Help as users read it: a switch shows no `<bool>` type, the usage line names `CKPT`, not `{CKPT}`."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
        return params

    def collect_usage_pieces(self, ctx):
        return [piece.replace("{", "").replace("}", "") for piece in super().collect_usage_pieces(ctx)]


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Reheat entropy-collapsed LM checkpoints by temperature-scaled on-policy self-distillation.",
)

T = TypeVar("T")


def _version(value: bool) -> None:
    if value:
        from tsopsd import __version__

        print(f"tsopsd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """Reheat entropy-collapsed LM checkpoints by temperature-scaled on-policy self-distillation."""


def _fail(message: str, code: int) -> typer.Exit:
    first = str(message).strip().splitlines()[0] if str(message).strip() else type(message).__name__
    from tsopsd.parallel import launched_rank

    if launched_rank() == 0:  # under torchrun, rank 0 speaks for all (errors name the ranks)
        print(f"tsopsd: error: {first}", file=sys.stderr, flush=True)
    return typer.Exit(code)


def _run(fn: Callable[[], T], *, debug: bool) -> T:
    """Run a command body: bad input exits 2, a stopped run its `TrainingStopped.code`, a crash 1; one line each."""
    try:
        return fn()
    except (typer.Exit, typer.Abort):
        raise
    except TsopsdError as e:
        if debug:
            traceback.print_exc()
        raise _fail(str(e), ExitCode.BAD_INPUT) from None
    except TrainingStopped as e:  # a guard stopped training (OUT holds the last good state), or nothing trained
        raise _fail(str(e), e.code) from None
    except Exception as e:  # noqa: BLE001 - the one place that turns crashes into one line
        if not _disk_full(e):
            raise _unexpected(e, debug) from None
        where = getattr(e, "filename", None) or "the output"
        raise _fail(f"no space left on device writing {where}: free some, then rerun (with --resume where a run "
                    "folder was kept)", ExitCode.BAD_INPUT) from None
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM; --debug shows where it landed
        if debug:
            traceback.print_exc()
        raise _fail("interrupted", ExitCode.INTERRUPTED) from None


def _disk_full(e: BaseException) -> bool:
    """A full disk or quota, however the writing library reported it (safetensors says it in words)."""
    return (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left on device" in str(e)


def _unexpected(e: BaseException, debug: bool) -> typer.Exit:
    if debug:
        traceback.print_exc()
    return _fail(f"unexpected failure: {type(e).__name__}: {e} (rerun with --debug for the traceback)", ExitCode.CRASH)


def _emit(result: dict, *, as_json: bool, out: Optional[Path], table: Callable[[], object]) -> None:
    if out is not None:  # written beside and renamed, so the file is never half there
        from tsopsd.writing import remove_stale_temporaries, write_file

        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        write_file(out, json.dumps(result, indent=2) + "\n")
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    else:
        from rich.console import Console

        console = Console()
        if not console.is_terminal:  # piped: wide enough for the widest table rather than 80 columns
            console = Console(width=160)
        console.print(table())


# ---- shared options ----------------------------------------------------------------------------
Ckpt = Annotated[Path, typer.Argument(metavar="CKPT", help="Checkpoint folder (save_pretrained) or PEFT adapter folder.")]
Prompts = Annotated[Path, typer.Option("--prompts", "-p", help="Prompt file: .jsonl, .txt or .parquet.")]
Base = Annotated[Optional[Path], typer.Option(help="Base model folder for an adapter (default: from adapter_config.json).")]
Device = Annotated[str, typer.Option(help="auto (cuda when present, else cpu), cpu, cuda, cuda:N.")]
Dtype = Annotated[str, typer.Option(help="auto (bf16 on cuda, fp32 on cpu), float32, bfloat16, float16.")]
PromptField = Annotated[Optional[str], typer.Option(help="Field (column) holding the prompt; default prompt, then messages.")]
MaxPromptTokens = Annotated[Optional[int], typer.Option(help="Left-truncate longer prompts (warned).")]
Seed = Annotated[int, typer.Option(help="Random seed (sampling).")]
Json = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or info lines on stderr.")]


@app.command("measure-entropy", cls=_Command)
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

        _emit(result, as_json=as_json, out=out,
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
        _emit(result, as_json=as_json, out=out, table=lambda: trajectory_table(result))
        if not as_json and result["reheat"].get("command"):  # beneath the table: the command, ready to run
            sys.stdout.write(f"next: reheat the collapsed checkpoint back to the first one's entropy:\n  "
                             f"{result['reheat']['command']}\n")

    _run(body, debug=debug)


class Mode(str, Enum):
    lora = "lora"
    full = "full"


class Save(str, Enum):
    adapter = "adapter"
    merged = "merged"


class Parallel(str, Enum):
    auto = "auto"
    ddp = "ddp"
    fsdp = "fsdp"


class Divergence(str, Enum):
    forward_kl = "forward_kl"
    reverse_kl = "reverse_kl"
    jsd = "jsd"


# ---- reheat's options (plan takes the same) -------------------------------------------------------
# Panels of `reheat --help` (and `plan --help`). A flag that sets a config key takes its help and its default from
# that key's field (tsopsd/config.py), as configs/default.yaml does.
INPUTS, TEACHER, ROLLOUT, TRAINING, OUTPUT, RUN = "Inputs", "Teacher", "Rollout", "Training", "Output", "Run"

# The config key of every flag that sets one (`reheat` and `plan` share most): the one table from flags to keys.
FLAG_KEYS = {
    "prompts": "data.prompts", "out": "output.out", "base": "model.base", "device": "model.device",
    "dtype": "model.dtype", "mode": "train.mode", "save": "output.save", "parallel": "train.parallel",
    "method": "teacher.method", "divergence": "loss.divergence", "beta": "loss.beta", "steps": "train.steps",
    "prompts_per_step": "rollout.prompts_per_step", "samples_per_prompt": "rollout.samples_per_prompt",
    "max_new_tokens": "rollout.max_new_tokens", "lr": "train.lr", "seed": "seed", "eval_prompts": "data.eval_prompts",
    "precision": "teacher.precision", "resume": "output.resume", "overwrite": "output.overwrite",
    "report_to": "output.report_to", "checkpoint_every": "output.checkpoint_every",
    "temperature": "teacher.temperature", "target_entropy": "teacher.target_entropy",
    "target_entropy_from": "teacher.target_entropy_from",
}
TEACHER_FLAGS = ("temperature", "target_entropy", "target_entropy_from")  # one replaces the file's teacher choice


def _opt(flag: str, *short: str, panel: str, extra: str = "", help: str = ""):
    """A reheat/plan option: `help` for a flag of the command line alone; a flag in FLAG_KEYS says its key's help
    (and, where it has one, the key's default)."""
    key = FLAG_KEYS.get(flag.removeprefix("--").replace("-", "_"))
    if key is not None:
        from tsopsd.config import config_default, help_of

        said = help_of(key)
        help = said + ("" if said.endswith(".") else ".")  # as written: it may open with a value (lora: ...)
        default = config_default(key)
        if not (default is None or default is False or default == ""):
            extra += f" (default {default})"
    return typer.Option(flag, *short, help=help + extra, rich_help_panel=panel)


ConfigFile = Annotated[Optional[Path], _opt("--config", "-c", panel=INPUTS,
                                            help="YAML config (see configs/); flags override it.")]
Temperature = Annotated[Optional[float], _opt("--temperature", panel=TEACHER)]
TargetEntropy = Annotated[Optional[float], _opt("--target-entropy", panel=TEACHER)]
TargetFrom = Annotated[Optional[Path], _opt("--target-entropy-from", panel=TEACHER)]


class Method(str, Enum):
    distill = "distill"
    scale = "scale"


MethodOpt = Annotated[Optional[Method], _opt("--method", panel=TEACHER)]
ModeOpt = Annotated[Optional[Mode], _opt("--mode", panel=TRAINING)]
SaveOpt = Annotated[Optional[Save], _opt("--save", panel=OUTPUT)]
ParallelOpt = Annotated[Optional[Parallel], _opt("--parallel", panel=TRAINING)]
DivergenceOpt = Annotated[Optional[Divergence], _opt("--divergence", panel=TEACHER)]
Beta = Annotated[Optional[float], _opt("--beta", panel=TEACHER)]
Steps = Annotated[Optional[int], _opt("--steps", panel=TRAINING)]
PerStep = Annotated[Optional[int], _opt("--prompts-per-step", panel=ROLLOUT)]
Samples = Annotated[Optional[int], _opt("--samples-per-prompt", panel=ROLLOUT)]
NewTokens = Annotated[Optional[int], _opt("--max-new-tokens", panel=ROLLOUT)]
Lr = Annotated[Optional[float], _opt("--lr", panel=TRAINING)]
SeedOpt = Annotated[Optional[int], _opt("--seed", panel=RUN)]
DeviceOpt = Annotated[Optional[str], _opt("--device", panel=RUN)]
DtypeOpt = Annotated[Optional[str], _opt("--dtype", panel=RUN)]
SetOpt = Annotated[Optional[list[str]], _opt("--set", panel=INPUTS,
                                             help="Any config key: --set train.lora_r=8 (repeatable).")]
JsonOpt = Annotated[bool, _opt("--json", panel=RUN, help="Print exactly one JSON object on stdout.")]
QuietOpt = Annotated[bool, _opt("--quiet", "-q", panel=RUN, help="No progress or info lines on stderr.")]
DebugOpt = Annotated[bool, _opt("--debug", panel=RUN, help="Show tracebacks.")]


def _overrides(model_path: Path, flags: dict, set_: list[str] | None) -> dict:
    """Config overrides from a command's flags ({parameter name: value}; None or False: not given, FLAG_KEYS
    names the key) and its --set pairs; a teacher flag replaces the file's teacher choice."""
    from tsopsd.config import parse_set

    def value(v):
        return v.value if isinstance(v, Enum) else str(v) if isinstance(v, Path) else v

    given = {k: v for k, v in flags.items() if v is not None and v is not False}
    teacher = {FLAG_KEYS[k]: value(flags.get(k)) for k in TEACHER_FLAGS}
    overrides = {"model.path": str(model_path)}
    overrides |= {FLAG_KEYS[k]: value(v) for k, v in given.items() if k not in TEACHER_FLAGS}
    if any(v is not None for v in teacher.values()):
        overrides.update(teacher)
    overrides.update(parse_set(set_ or []))
    return overrides


@app.command(cls=_Command)
def reheat(
    ckpt: Ckpt,
    prompts: Annotated[Optional[Path], _opt("--prompts", "-p", panel=INPUTS,
                                            extra=" Required (a --resume reads the saved run's).")] = None,
    out: Annotated[Optional[Path], _opt("--out", "-o", panel=OUTPUT, extra=" Required.")] = None,
    config: ConfigFile = None,
    temperature: Temperature = None,
    target_entropy: TargetEntropy = None,
    target_entropy_from: TargetFrom = None,
    method: MethodOpt = None,
    mode: ModeOpt = None,
    save: SaveOpt = None,
    parallel: ParallelOpt = None,
    divergence: DivergenceOpt = None,
    beta: Beta = None,
    steps: Steps = None,
    prompts_per_step: PerStep = None,
    samples_per_prompt: Samples = None,
    max_new_tokens: NewTokens = None,
    lr: Lr = None,
    eval_prompts: Annotated[Optional[Path], _opt("--eval-prompts", panel=INPUTS)] = None,
    precision: Annotated[Optional[float], _opt("--precision", panel=TEACHER)] = None,
    checkpoint_every: Annotated[Optional[int], _opt("--checkpoint-every", panel=OUTPUT)] = None,
    resume: Annotated[bool, _opt("--resume", panel=RUN, extra=" Its saved config: no other flag needed.")] = False,
    overwrite: Annotated[bool, _opt("--overwrite", panel=OUTPUT)] = False,
    dry_run: Annotated[bool, _opt("--dry-run", panel=RUN, help="Print this run's plan (tsopsd plan) on the device it "
                                                               "would use (one GPU a rank, or the CPU); exit.")] = False,
    seed: SeedOpt = None,
    base: Annotated[Optional[Path], _opt("--base", panel=INPUTS)] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    set_: SetOpt = None,
    report_to: Annotated[Optional[str], _opt("--report-to", panel=OUTPUT,
                                             extra=" Written under OUT.logs/ (output.logging_dir).")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Reheat a checkpoint: on-policy self-distillation toward its own temperature-scaled logits."""
    def body() -> None:
        from tsopsd import console
        from tsopsd.config import load_config
        from tsopsd.parallel import launched_rank

        rank = launched_rank()  # under torchrun only rank 0 talks
        console.setup_logging(quiet=quiet or rank != 0)
        overrides = _overrides(ckpt, dict(
            prompts=prompts, out=out, base=base, device=device, dtype=dtype, mode=mode, save=save, parallel=parallel,
            method=method, divergence=divergence, beta=beta, steps=steps, prompts_per_step=prompts_per_step,
            samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens, lr=lr, seed=seed,
            eval_prompts=eval_prompts, precision=precision, resume=resume, overwrite=overwrite, report_to=report_to,
            checkpoint_every=checkpoint_every, temperature=temperature, target_entropy=target_entropy,
            target_entropy_from=target_entropy_from), set_)
        if dry_run:  # under torchrun every rank would plan the same: rank 0 does, alone
            if rank != 0:
                return
            cfg = load_config(config, overrides, inputs=False)
            if cfg.data.prompts and cfg.output.out:  # a dry run refuses what the run refuses, before planning
                from tsopsd.loop import check_run

                check_run(load_config(config, overrides), int(os.environ.get("WORLD_SIZE", "1")), dry_run=True)
            from tsopsd.checkpoint import resolve_device
            from tsopsd.plan import this_machine

            gpus = int(os.environ.get("WORLD_SIZE", "1"))  # the run's own device, dtype and memory, as it would run
            _plan_and_print(cfg, ckpt, this_machine(resolve_device(cfg.model.device), gpus), as_json=as_json)
            return
        from tsopsd.config import shipped_config
        from tsopsd.loop import reheat as run_reheat

        if resume and not overwrite:  # a saved config from a run begun with --overwrite resumes, it does not restart
            overrides.setdefault("output.overwrite", False)
        source = _saved_config(config, out, resume)
        cfg = load_config(source, overrides)
        started = time.time()
        try:
            report = run_reheat(cfg, show_progress=not quiet, config_file=shipped_config(source) if source else None)
            shield = ignore_signals()  # OUT is written: a signal from here on changes nothing (its own exit code)
        except TrainingStopped as e:  # a guard stop wrote OUT: its report is still the one object on stdout
            if e.report and rank == 0:
                _show_reheat(e.report, as_json=as_json)
            raise
        except KeyboardInterrupt:
            if debug:
                traceback.print_exc()
            raise _interrupted(Path(cfg.output.out), started, as_json=as_json) from None
        try:
            # Free the run's models now: under torchrun their reference cycles (FSDP state, hooks) can keep
            # process-group objects alive into interpreter shutdown, a known place for gloo to abort.
            gc.collect()
            if rank != 0:
                return
            _show_reheat(report, as_json=as_json)
            if report["status"] != "met":  # OUT is written, but it is not what was asked for: no hand-off
                raise _fail(f"goal not met ({report['goal']['evidence']}); {report['output']} is written, but "
                            f"{report['goal']['advice']}", ExitCode.GOAL_NOT_MET)
            if not as_json:  # beneath the table: what to run next with this OUT
                sys.stdout.write("\n".join(hand_off(report)) + "\n")
        finally:
            restore_signals(shield)

    _run(body, debug=debug)


def _given_hardware(gpus: int, memory: Optional[str], flops: Optional[float], bandwidth: Optional[float],
                    prompt_tokens: Optional[int]):
    """`tsopsd plan`'s --gpus, --gpu-memory, --gpu-flops, --gpu-bandwidth (checked, with --prompt-tokens) as a
    `plan.Hardware`; what is not given is the default's (an 80 GiB H100)."""
    from tsopsd.plan import Hardware, parse_bytes

    if not 1 <= gpus <= 2**16:
        raise TsopsdError(f"--gpus must be in 1..65536, got {gpus}")
    for name, v in (("--gpu-flops", flops), ("--gpu-bandwidth", bandwidth), ("--prompt-tokens", prompt_tokens)):
        if v is not None and not 0 < v < math.inf:
            raise TsopsdError(f"{name} must be a finite number > 0, got {v}")
    if prompt_tokens is not None and prompt_tokens > 2**24:
        raise TsopsdError(f"--prompt-tokens must be <= {2**24} (16M tokens), got {prompt_tokens}")
    default = Hardware()
    size = parse_bytes(memory) if memory is not None else default.memory
    if not 0 < size < 2**60:
        raise TsopsdError(f"--gpu-memory must be a finite size under 1 EiB, got {memory}")
    return Hardware(gpus=gpus, memory=size, flops=flops or default.flops, bandwidth=bandwidth or default.bandwidth)


def _plan_and_print(cfg, source: Path, hardware, *, as_json: bool, prompt_tokens: Optional[int] = None) -> dict:
    import warnings

    from tsopsd.console import planning_status
    from tsopsd.plan import plan
    from tsopsd.tables import plan_table

    with warnings.catch_warnings(), planning_status() as on_phase:
        warnings.simplefilter("ignore")  # transformers' deprecation notes about its checkpointing flags
        result = plan(cfg, source, hardware, prompt_tokens=prompt_tokens, on_phase=on_phase)

    def table():
        from rich.console import Group
        from rich.text import Text

        lines = [Text(f"to fit: {tip}") for tip in result["advice"]]
        return Group(plan_table(result), *lines)

    _emit(result, as_json=as_json, out=None, table=table)
    if not result["fits"]:  # the plan was printed; a script's `tsopsd plan ... && sbatch ...` must stop here
        gib = 2**30
        raise TsopsdError(f"does not fit: peak {result['peak_bytes'] / gib:.1f} GiB in {result['peak_phase']} + "
                          f"{result['reserved_bytes'] / gib:.1f} GiB reserve > {result['gpu_memory_bytes'] / gib:.0f} GiB "
                          f"per device" + (f"; try {result['advice'][0]}" if result["advice"] else ""))
    return result


@app.command(cls=_Command)
def plan(
    source: Annotated[Path, typer.Argument(help="Checkpoint folder or its config.json (only the config is read).")],
    config: ConfigFile = None,
    gpus: Annotated[int, typer.Option(help="Devices (ranks) the run will use.")] = 1,
    gpu_memory: Annotated[Optional[str], typer.Option(help="Memory per device, e.g. 80GB (default 80 GiB).")] = None,
    gpu_flops: Annotated[Optional[float], typer.Option(help="Peak dense FLOP/s per device (default 989e12, H100 bf16).")] = None,
    gpu_bandwidth: Annotated[Optional[float], typer.Option(help="Memory bytes/s per device (default 3.35e12, H100).")] = None,
    prompt_tokens: Annotated[Optional[int], typer.Option(help="Prompt length to plan (default data.max_prompt_tokens, else 512).")] = None,
    temperature: Temperature = None,
    target_entropy: TargetEntropy = None,
    target_entropy_from: TargetFrom = None,
    mode: ModeOpt = None,
    save: SaveOpt = None,
    parallel: ParallelOpt = None,
    divergence: DivergenceOpt = None,
    beta: Beta = None,
    steps: Steps = None,
    prompts_per_step: PerStep = None,
    samples_per_prompt: Samples = None,
    max_new_tokens: NewTokens = None,
    lr: Lr = None,
    dtype: DtypeOpt = None,
    set_: SetOpt = None,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Will a reheat run fit? One worst-case step on fake tensors: peak memory per phase, roofline time."""
    def body() -> None:
        from tsopsd.config import load_config

        overrides = _overrides(source, dict(
            dtype=dtype, mode=mode, save=save, parallel=parallel, divergence=divergence, beta=beta, steps=steps,
            prompts_per_step=prompts_per_step, samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
            lr=lr, temperature=temperature, target_entropy=target_entropy, target_entropy_from=target_entropy_from),
            set_)
        cfg = load_config(config, overrides, inputs=False)
        _plan_and_print(cfg, source, _given_hardware(gpus, gpu_memory, gpu_flops, gpu_bandwidth, prompt_tokens),
                        prompt_tokens=prompt_tokens, as_json=as_json)

    _run(body, debug=debug)


@app.command(cls=_Command)
def merge(
    adapter: Annotated[Path, typer.Argument(help="PEFT adapter folder (e.g. the output of reheat --save adapter).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the merged checkpoint.")],
    base: Base = None,
    dtype: Annotated[Optional[str], typer.Option(help="Save dtype (default: the base checkpoint's).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT.")] = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Merge a LoRA adapter into its base and save an ordinary checkpoint."""
    def body() -> None:
        from tsopsd import console
        from tsopsd.checkpoint import merge_adapter
        from tsopsd.output import adapter_record, carry_record
        from tsopsd.paths import check_out_name
        from tsopsd.state import OutputLock

        console.setup_logging(quiet=quiet)
        check_out_name(out)
        adapter_record(adapter)  # a damaged record is found before the merge, not after it
        lock = OutputLock(out)  # every writer of OUT takes its lock: a reheat writing it, or another merge
        lock.acquire()
        try:
            merge_adapter(adapter, out, base=base, dtype=dtype, overwrite=overwrite,
                          also=lambda folder: carry_record(adapter, folder, base))
        finally:
            lock.release()
        logging.getLogger("tsopsd").info("wrote %s (the adapter %s merged into its base)", out, adapter)

    _run(body, debug=debug)


@app.command(cls=_Command)
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
            _emit(result, as_json=True, out=None, table=lambda: None)
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

    code = _run(body, debug=debug)
    if code:
        raise typer.Exit(int(code))


@app.command(cls=_Command)
def demo(
    out: Annotated[Path, typer.Option(help="Working folder; what it builds is cached there.")] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option("--quick", help="Smaller budget (about a minute).")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Rebuild everything instead of reusing the cache.")] = False,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads. The toy model's time goes to per-operation overhead: "
                                                     "one thread is as fast, and does not stall on a shared machine.")] = 1,
    as_json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """SFT -> RL-collapsed -> reheated on a toy task, built offline; prints the before/after table."""
    def body() -> None:
        from tsopsd import console
        from tsopsd.lab.demo import run_demo, show_summary

        console.setup_logging(quiet=quiet)
        summary = run_demo(out, quick=quick, fresh=fresh, show_progress=not quiet, threads=threads)
        if as_json:
            _emit(summary, as_json=True, out=None, table=lambda: None)
            return
        show_summary(summary)

    _run(body, debug=debug)


def _saved_config(config: Optional[Path], out: Optional[Path], resume: bool) -> Optional[Path]:
    """`--resume` without `--config`: the saved run's config.yaml, so no flag needs retyping (flags given still
    override it, and a resume then names any that differs from the run)."""
    if config is not None or not resume or out is None:
        return config
    from tsopsd.state import run_dir_for

    saved = run_dir_for(Path(out)) / "config.yaml"
    return saved if saved.is_file() else None


def _interrupted(out: Path, started: float, *, as_json: bool) -> typer.Exit:
    """A reheat's Ctrl-C or SIGTERM, said as it landed: state saved (130, --resume), nothing saved yet (130, rerun),
    or after OUT was written (its report, and the exit code of its outcome)."""
    from tsopsd.state import STATE_FILE, run_dir_for

    run_dir, written = run_dir_for(out), out / "reheat_report.json"
    if (run_dir / STATE_FILE).is_file():
        return _fail(f"interrupted: state saved in {run_dir}; continue with --resume", ExitCode.INTERRUPTED)
    if written.is_file() and written.stat().st_mtime >= started:  # this run wrote OUT before the signal landed
        report = json.loads(written.read_text())
        _show_reheat(report, as_json=as_json)
        said = f"interrupted after {out} was written: it is complete (status {report.get('status')})"
        if report.get("status") == "met":  # done: the signal changed nothing
            logging.getLogger("tsopsd").warning(said)
            return typer.Exit(ExitCode.DONE)
        return _fail(said, ExitCode.GUARD_STOP if report.get("status") == "guard_stop" else ExitCode.GOAL_NOT_MET)
    return _fail("interrupted before any state was saved: nothing to resume; rerun", ExitCode.INTERRUPTED)


def _show_reheat(report: dict, *, as_json: bool) -> None:
    """The run's report: one JSON object on stdout, or the before/after table."""
    from tsopsd.output import teacher_line
    from tsopsd.tables import metrics_table

    columns = {"before": report["before"], "after": report["after"]} if report["before"] else {}
    if columns and report.get("after_training_prompts"):
        columns["after, training prompts"] = report["after_training_prompts"]
    _emit(report, as_json=as_json, out=None,
          table=lambda: metrics_table(columns, target=report["target_entropy"],
                                      title=f"tsopsd reheat: {teacher_line(report, 3)}, {report['steps_run']} steps, "
                                            f"{report['stop_reason']}; {report['status'].replace('_', ' ')}; "
                                            "held-out prompts"))


def hand_off(report: dict) -> list[str]:
    """What to run next with the written OUT: continuing RL from it (verl, TRL, vLLM), sampling at T=1."""
    out = os.path.abspath(report["output"])
    if report["save"] == "adapter":
        merged = out.rstrip("/") + "-merged"
        return [f"next: {out} is a PEFT adapter; merge it for RL frameworks that load one folder:",
                f"  tsopsd merge {out} --out {merged}",
                f"  verl: actor_rollout_ref.model.path={merged}   TRL/transformers: from_pretrained('{merged}')",
                f"  vLLM without merging: vllm serve BASE --enable-lora --lora-modules reheated={out}",
                "  sample at temperature 1.0: the entropy is in the weights now, not in the sampler"]
    return [f"next: continue RL from {out}",
            f"  verl: actor_rollout_ref.model.path={out}   TRL/transformers: from_pretrained('{out}')",
            f"  vLLM: vllm serve {out}",
            "  sample at temperature 1.0: the entropy is in the weights now, not in the sampler"]


def main() -> None:
    """The `tsopsd` command: usage errors too are one `tsopsd: error:` line (exit 2), never a framed box."""
    utf8_mode()
    on_bus_error()
    cuda_allocator()
    try:  # typer >= 0.2x carries its own copy of click
        from typer._click import exceptions as click_errors
    except ImportError:
        from click import exceptions as click_errors

    try:
        code = typer.main.get_command(app).main(prog_name="tsopsd", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as e:  # bare `tsopsd` or `tsopsd reheat`: the help, exit 0
        print(e.ctx.get_help() if e.ctx else "", flush=True)
        code = 0
    except click_errors.UsageError as e:
        command = e.ctx.command_path if e.ctx else "tsopsd"
        print(f"tsopsd: error: {e.format_message()} (see {command} --help)", file=sys.stderr, flush=True)
        code = 2
    except click_errors.ClickException as e:
        print(f"tsopsd: error: {e.format_message()}", file=sys.stderr, flush=True)
        code = e.exit_code or 2
    except typer.Abort:
        print("tsopsd: error: interrupted", file=sys.stderr, flush=True)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
