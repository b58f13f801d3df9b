"""The options `reheat` and `plan` share, and the one table from flags to config keys.

A flag that sets a config key takes its help and its default from that key's field (tsopsd/config.py), as
configs/default.yaml does.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer


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
        from tsopsd.config_doc import config_default, help_of

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


def overrides_from(model_path: Path, flags: dict, set_: list[str] | None) -> dict:
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

