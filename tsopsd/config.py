"""One typed config for `tsopsd reheat`: nested frozen dataclasses, YAML files, overrides.

    cfg = load_config("configs/lora.yaml", {"teacher.temperature": 1.5, "train.steps": 100})

Precedence: dataclass defaults < the YAML file < overrides (CLI flags, then ``--set key=value``).
Unknown keys are rejected, values are coerced to the field's type, and every problem is reported
at once in one `ConfigError`. The resolved config is saved with the output as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tsopsd.errors import TsopsdError


class ConfigError(TsopsdError):
    """Invalid config: lists every problem found."""


def _key(default: Any = None, help: str = "", *, factory: Any = None):
    """A config key: its default and the one sentence that says what it does (configs/default.yaml's comment and
    the CLI flag's help are both made from it)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelConfig:
    path: str = _key("", "the checkpoint to reheat (the CLI's CKPT argument)")
    base: str | None = _key(None, "base model folder for an adapter input (default: from its adapter_config.json)")
    device: str = _key("auto", "auto (cuda when present, else cpu), cpu, cuda, cuda:N")
    dtype: str = _key("auto", "auto (bf16 on cuda, fp32 on cpu), float32, bfloat16, float16")


@dataclass(frozen=True)
class DataConfig:
    prompts: str = _key("", "prompt file: .jsonl (a prompt or messages field a line), .txt, .parquet (verl layout)")
    prompt_field: str | None = _key(None, "field (column) holding the prompt; default prompt, then messages")
    max_prompt_tokens: int | None = _key(None, "left-truncate longer prompts (warned)")
    limit: int | None = _key(None, "use only the first N prompts")
    eval_prompts: str | None = _key(None, "held-out prompts in a file of their own (e.g. other problem families); "
                                          "without it min(16, 20%) of the prompts are held out")


@dataclass(frozen=True)
class RolloutConfig:
    prompts_per_step: int = _key(8, "prompts per step")
    samples_per_prompt: int = _key(4, "on-policy completions per prompt, sampled from the current student at T=1")
    max_new_tokens: int = _key(256, "completion length cap")
    batch_size: int = _key(32, "sequences sampled together: the slots of continuous batching (a finished row's slot "
                               "takes the next row)")
    engine: Literal["auto", "model"] = _key("auto", "auto: tsopsd's lean decoder for Llama/Mistral/Qwen2/Qwen3, else "
                                                    "model.forward; model: always model.forward")
    compile: Literal["auto", "true", "false"] = _key(
        "auto", "reheat's lean decode step under torch.compile (CUDA graphs on a GPU); auto: on a GPU only. On, its KV "
                "cache and weight copies stay allocated between rollouts (the plan counts them); false frees them "
                "for training")


@dataclass(frozen=True)
class TeacherConfig:
    temperature: float | None = _key(1.5, "teacher temperature tau > 1: the teacher is softmax(z0 / tau) of the frozen "
                                          "input checkpoint")
    target_entropy: float | None = _key(None, "or: solve tau so the teacher's mean entropy is this many nats")
    target_entropy_from: str | None = _key(None, "or: that target is the entropy of this checkpoint (e.g. the SFT one "
                                                 "before RL)")
    precision: float = _key(0.05, "target_entropy_from: sample that checkpoint (all prompts, in rounds) until its 95% "
                                  "interval is within +-P (0: one round)")
    method: Literal["distill", "scale"] = _key("distill", "distill: train toward the teacher (TS-OPSD); scale: the "
                                                          "closed form, logits / tau by a weight edit (seconds, no "
                                                          "training)")
    heat: Literal["uniform", "forking", "plausible"] = _key(
        "uniform", "where the teacher heats: uniform (every position), forking (the most uncertain positions), "
                   "plausible (see docs/reference.md)")
    heat_fraction: float = _key(0.2, "forking: the share of a step's completion positions heated (highest entropy "
                                     "under the input)")
    heat_min_p: float = _key(0.001, "plausible: heat spreads over the tokens with p >= min_p x p_max under the input "
                                    "only")


@dataclass(frozen=True)
class LossConfig:
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = _key(
        "forward_kl", "forward_kl = KL(teacher || student), reverse_kl = KL(student || teacher), or jsd")
    beta: float = _key(0.5, "jsd only: the weight of the teacher in the mixture, 0 < beta < 1")
    chunk_size: int = _key(512, "completion positions per LM-head chunk (0: all at once); memory grows with chunk x "
                                "vocab")


@dataclass(frozen=True)
class TrainConfig:
    mode: Literal["lora", "full"] = _key("lora", "lora: train an adapter (the teacher is the same module with it "
                                                 "disabled); full: all weights (one frozen copy)")
    parallel: Literal["auto", "ddp", "fsdp"] = _key("auto", "under torchrun: ddp (replicas) or fsdp (FSDP2 shards); "
                                                            "auto: ddp when the model fits a device")
    steps: int = _key(200, "training steps: a budget, the run stops when it meets its goal (one that does not exits 4)")
    lr: float = _key(1e-4, "learning rate to start at: doubled every stop.window steps while the entropy gap closes "
                           "too slowly to meet the tolerance in half the steps left, up to max_lr_factor x lr")
    max_lr_factor: float = _key(32.0, "the lr may rise to this x lr (1: a fixed lr)")
    weight_decay: float = _key(0.0, "AdamW weight decay")
    warmup_steps: int = _key(0, "linear lr warmup steps")
    max_grad_norm: float = _key(1.0, "gradient clipping norm (0: no clipping)")
    micro_batch: int = _key(8, "sequences per student forward/backward; gradients accumulate over the step")
    activation_checkpointing: Literal["auto", "true", "false"] = _key(
        "auto", "recompute each decoder layer in backward; auto: on (cuda) where the plan says activations would "
                "not fit")
    share_prompts: bool = _key(True, "run a prompt once for its samples: rollout prefill, teacher and student passes "
                                     "(not under FSDP; the student's not under checkpointing)")
    lora_r: int = _key(16, "LoRA rank")
    lora_alpha: int = _key(32, "LoRA alpha (the adapter is scaled by alpha / r)")
    lora_target_modules: str = _key("all-linear", "all-linear, or a comma-separated list: q_proj,k_proj,v_proj,o_proj")


@dataclass(frozen=True)
class StopConfig:
    entropy_tolerance: float = _key(0.02, "stop once the student's entropy >= the teacher's x (1 - tolerance), both "
                                          "averaged over the last `window` steps")
    window: int = _key(5, "steps averaged by the stop rules (single steps are noisy)")
    min_top1_agreement: float = _key(0.9, "drift guard: stop below this top-1 agreement with the input, and roll back")
    rollback: bool = _key(True, "keep a copy of the last state that passed the guard")
    rollback_every: int | None = _key(None, "copy the weights every N steps; null: every step for lora (on device), "
                                            "10 for full (host RAM)")
    heldout_every: int = _key(10, "target runs: every N steps measure the held-out prompts and steer the training "
                                  "target so the held-out entropy meets the target (0: off, the training entropy "
                                  "meets it)")
    heldout_samples_per_prompt: int = _key(4, "samples of each held-out prompt at each of those measurements")
    heldout_tolerance: float = _key(0.05, "a target run stops once the held-out 95% interval holds the target, its mean "
                                          "within this fraction of it")


@dataclass(frozen=True)
class OutputConfig:
    out: str = _key("", "output folder (written complete, or not at all)")
    save: Literal["adapter", "merged"] = _key("merged", "merged: an ordinary HF checkpoint; adapter: a PEFT adapter "
                                                        "(lora only)")
    save_every: int = _key(10, "resumable state every N steps (0: only on Ctrl-C)")
    checkpoint_every: int = _key(0, "also a loadable checkpoint every N steps: OUT/checkpoint-N (in OUT.tsopsd-run/ "
                                    "while running); 0: none")
    eval_prompts: int | None = _key(None, "held-out prompts (before/after report, steering); null: min(16, 20% of the "
                                          "prompts); 0: none")
    eval_samples_per_prompt: int = _key(4, "samples of each held-out prompt in the before/after report")
    overwrite: bool = _key(False, "replace an existing OUT (only once the new one is complete)")
    resume: bool = _key(False, "continue an interrupted run from OUT.tsopsd-run/")
    report_to: str = _key("", "step metrics also to tensorboard and/or wandb (WANDB_MODE: online or offline), "
                              "comma-separated")
    run_name: str = _key("", "the tracker's run name (default: OUT's folder name)")
    wandb_project: str = _key("", "W&B project (default: WANDB_PROJECT, else W&B's)")
    logging_dir: str = _key("", "where the trackers write (default: OUT.logs beside OUT)")


REPORT_TO = ("tensorboard", "wandb")


def report_kinds(spec: str) -> tuple[str, ...]:
    """output.report_to 'tensorboard,wandb' -> ('tensorboard', 'wandb'); '' or 'none' -> ()."""
    return tuple(k.strip() for k in spec.split(",") if k.strip() and k.strip() != "none")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = _key(factory=ModelConfig, help="the input checkpoint")
    data: DataConfig = _key(factory=DataConfig, help="the prompts")
    rollout: RolloutConfig = _key(factory=RolloutConfig, help="the student's own completions")
    teacher: TeacherConfig = _key(factory=TeacherConfig, help="exactly one of temperature, target_entropy, "
                                                               "target_entropy_from")
    loss: LossConfig = _key(factory=LossConfig, help="the per-token divergence over the full vocabulary")
    train: TrainConfig = _key(factory=TrainConfig, help="the student's updates")
    stop: StopConfig = _key(factory=StopConfig, help="when a run has met its goal, or must stop")
    output: OutputConfig = _key(factory=OutputConfig, help="what is written, and where")
    seed: int = _key(0, "random seed (sampling, held-out split, LoRA init)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- coercion -------------------------------------------------------------------------------------

def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce `value` (from YAML or a string override) to type `tp`; raise ValueError with a reason."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(value, args[0], key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and str(value).lower() in choices:  # YAML's true/false for "true"/"false"
            value = str(value).lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if value is None:
        raise ValueError("must not be empty")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"must be an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"must be a string, got {type(value).__name__}")
        return str(value)
    raise ValueError(f"unsupported type {tp}")


def _build(cls, data: dict, prefix: str, errors: list[str]):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            errors.append(f"{prefix}{key}: unknown key (known: {', '.join(sorted(names))})")
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, value, key = hints[f.name], data[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                errors.append(f"{key}: must be a section (mapping), got {type(value).__name__}")
                continue
            kwargs[f.name] = _build(tp, value, f"{key}.", errors)
            continue
        try:
            kwargs[f.name] = _coerce(value, tp, key)
        except ValueError as e:
            errors.append(f"{key}: {e}")
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{p}' is not a section")
    node[parts[-1]] = value


def parse_set(items: list[str]) -> dict[str, str]:
    """Parse ``key=value`` strings (``--set train.lr=2e-5``)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item}: not a valid YAML value ({str(err).splitlines()[0]})") from None
    return out


MAX_SAMPLES_PER_PROMPT = 4096  # every sample is held in memory until used: past this a typo, refused up front
MAX_LORA_R = 16384  # wider than any model tsopsd targets: past it a typo that would fill memory
MAX_NEW_TOKENS = 2**20  # a million tokens a completion: past any context, a typo (planning it would not end)
SEED_LIMIT = 2**63  # seeds are 0..2^63-1: what torch's generators take


def validate(cfg: Config, *, inputs: bool = True) -> list[str]:
    """Range and consistency checks; returns every problem found (`inputs`: also the paths a run needs)."""
    e = []
    t, o = cfg.teacher, cfg.output
    if inputs and not cfg.model.path:
        e.append("model.path: required (the checkpoint to reheat)")
    if inputs and not cfg.data.prompts:
        e.append("data.prompts: required (a prompt file)")
    if inputs and not o.out:
        e.append("output.out: required (the output folder)")
    chosen = [n for n, v in (("temperature", t.temperature), ("target_entropy", t.target_entropy),
                             ("target_entropy_from", t.target_entropy_from)) if v is not None]
    if len(chosen) != 1:
        e.append(f"teacher: set exactly one of temperature, target_entropy, target_entropy_from (got {chosen or 'none'})")
    return e + _ranges(cfg) + _combinations(cfg)


def _ranges(cfg: Config) -> list[str]:
    """Each value within what it can mean (and short of what would fill memory or never end)."""
    e = []
    t, r, lo, tr, st, o = cfg.teacher, cfg.rollout, cfg.loss, cfg.train, cfg.stop, cfg.output
    if r.samples_per_prompt > MAX_SAMPLES_PER_PROMPT:
        e.append(f"rollout.samples_per_prompt: must be <= {MAX_SAMPLES_PER_PROMPT} (every sample is held until trained "
                 f"on), got {r.samples_per_prompt}")
    for name, v in (("output.eval_samples_per_prompt", o.eval_samples_per_prompt),
                    ("stop.heldout_samples_per_prompt", st.heldout_samples_per_prompt)):
        if v > MAX_SAMPLES_PER_PROMPT:
            e.append(f"{name}: must be <= {MAX_SAMPLES_PER_PROMPT} (each is sampled, up to 4x, at every measurement), "
                     f"got {v}")
    if not 0 <= cfg.seed < SEED_LIMIT:
        e.append(f"seed: must be in 0..2^63-1, got {cfg.seed}")
    floats = {"teacher.target_entropy": t.target_entropy, "train.weight_decay": tr.weight_decay,
              "train.max_grad_norm": tr.max_grad_norm, "stop.entropy_tolerance": st.entropy_tolerance,
              "stop.heldout_tolerance": st.heldout_tolerance, "stop.min_top1_agreement": st.min_top1_agreement,
              "loss.beta": lo.beta, "train.max_lr_factor": tr.max_lr_factor}
    e += [f"{name}: must be a finite number, got {v}" for name, v in floats.items() if v is not None and not math.isfinite(v)]
    if not 0 <= st.entropy_tolerance < 1:
        e.append(f"stop.entropy_tolerance: must be in [0, 1), got {st.entropy_tolerance}")
    if tr.lora_alpha <= 0:
        e.append(f"train.lora_alpha: must be > 0 (0 scales the adapter to nothing: a run that trains nothing), got "
                 f"{tr.lora_alpha}")
    if tr.lora_r > MAX_LORA_R:
        e.append(f"train.lora_r: must be <= {MAX_LORA_R} (a rank above the model's width adds nothing), got {tr.lora_r}")
    for name, v in (("data.limit", cfg.data.limit), ("data.max_prompt_tokens", cfg.data.max_prompt_tokens)):
        if v is not None and v < 1:
            e.append(f"{name}: must be >= 1, got {v}")
    if t.temperature is not None and not 1.0 < t.temperature < math.inf:
        e.append(f"teacher.temperature: must be > 1 to reheat, got {t.temperature}")
    if t.target_entropy is not None and not t.target_entropy > 0:
        e.append(f"teacher.target_entropy: must be > 0 nats, got {t.target_entropy}")
    if r.max_new_tokens > MAX_NEW_TOKENS:
        e.append(f"rollout.max_new_tokens: must be <= {MAX_NEW_TOKENS}, got {r.max_new_tokens}")
    for name, v in (("rollout.prompts_per_step", r.prompts_per_step), ("rollout.samples_per_prompt", r.samples_per_prompt),
                    ("rollout.max_new_tokens", r.max_new_tokens), ("rollout.batch_size", r.batch_size),
                    ("train.steps", tr.steps), ("train.micro_batch", tr.micro_batch), ("train.lora_r", tr.lora_r),
                    ("stop.window", st.window)):
        if v < 1:
            e.append(f"{name}: must be >= 1, got {v}")
    if not 0 < lo.beta < 1:
        e.append(f"loss.beta: must be in (0, 1), got {lo.beta}")
    if lo.chunk_size < 0:
        e.append(f"loss.chunk_size: must be >= 0, got {lo.chunk_size}")
    if not 0 < tr.lr < math.inf:
        e.append(f"train.lr: must be > 0, got {tr.lr}")
    if not 1 <= tr.max_lr_factor < math.inf:
        e.append(f"train.max_lr_factor: must be >= 1 (1: a fixed lr), got {tr.max_lr_factor}")
    for name, v in (("train.weight_decay", tr.weight_decay), ("train.warmup_steps", tr.warmup_steps),
                    ("train.max_grad_norm", tr.max_grad_norm), ("output.save_every", o.save_every),
                    ("output.eval_prompts", o.eval_prompts or 0), ("stop.entropy_tolerance", st.entropy_tolerance),
                    ("stop.heldout_every", st.heldout_every), ("output.checkpoint_every", o.checkpoint_every)):
        if v < 0:
            e.append(f"{name}: must be >= 0, got {v}")
    if st.rollback_every is not None and st.rollback_every < 1:
        e.append(f"stop.rollback_every: must be >= 1, got {st.rollback_every}")
    if st.heldout_samples_per_prompt < 1:
        e.append(f"stop.heldout_samples_per_prompt: must be >= 1, got {st.heldout_samples_per_prompt}")
    if not 0 < st.heldout_tolerance < 1:
        e.append(f"stop.heldout_tolerance: must be in (0, 1), got {st.heldout_tolerance}")
    if not (math.isfinite(t.precision) and 0 <= t.precision < 1):
        e.append(f"teacher.precision: must be in [0, 1) (0.05: a 95% interval within +-5%), got {t.precision}")
    if o.eval_samples_per_prompt < 1:
        e.append(f"output.eval_samples_per_prompt: must be >= 1, got {o.eval_samples_per_prompt}")
    if not 0 <= st.min_top1_agreement <= 1:
        e.append(f"stop.min_top1_agreement: must be in [0, 1], got {st.min_top1_agreement}")
    if not (math.isfinite(t.heat_fraction) and 0 < t.heat_fraction <= 1):
        e.append(f"teacher.heat_fraction: must be in (0, 1], got {t.heat_fraction}")
    if not (math.isfinite(t.heat_min_p) and 0 < t.heat_min_p < 1):
        e.append(f"teacher.heat_min_p: must be in (0, 1), got {t.heat_min_p}")
    return e


def _combinations(cfg: Config) -> list[str]:
    """Values that are each fine but do not go together."""
    e = []
    t, tr, o = cfg.teacher, cfg.train, cfg.output
    if t.method == "scale" and t.heat != "uniform":
        e.append(f"teacher.heat: {t.heat} is a per-position heat, which no weight edit expresses: it needs --method "
                 "distill (the closed form heats every position alike)")
    if t.method == "scale" and o.save == "adapter":
        e.append("output.save: 'adapter' cannot hold --method scale (it edits the final norm or the LM head, which a "
                 "LoRA adapter cannot express in a form vLLM loads): use --save merged")
    if t.method == "scale" and t.temperature is None and o.eval_prompts == 0 and not cfg.data.eval_prompts:
        e.append("teacher.method: scale solves tau for its target on held-out prompts: output.eval_prompts must be > 0 "
                 "(or give --eval-prompts)")
    if tr.mode == "full" and o.save == "adapter":
        e.append("output.save: 'adapter' needs train.mode lora (full fine-tuning saves a merged checkpoint)")
    unknown = [k for k in report_kinds(o.report_to) if k not in REPORT_TO]
    if unknown:
        e.append(f"output.report_to: unknown {', '.join(unknown)} (choose from {', '.join(REPORT_TO)})")
    if o.overwrite and o.resume:
        e.append("output: choose --overwrite or --resume, not both")
    return e


TEACHER_CHOICES = ("temperature", "target_entropy", "target_entropy_from")


def _one_teacher(section, given: set[str], overrides: dict | None = None) -> None:
    """Choosing one of the teacher's three ways unsets the others that this layer (a YAML file, or the flags and
    --set) does not give: a file with only `target_entropy: 2.0` means that, not that plus the default tau."""
    if not isinstance(section, dict):
        return
    values = overrides if overrides is not None else section
    chosen = [k for k in TEACHER_CHOICES if k in given and values.get(k) is not None]
    if chosen:
        for k in TEACHER_CHOICES:
            if k not in given:
                section[k] = None
    elif "temperature" not in section and any(section.get(k) is not None for k in TEACHER_CHOICES[1:]):
        section["temperature"] = None


def _shipped() -> Path:
    """The shipped configs: a wheel's package data (tsopsd/configs/), else the source tree's configs/."""
    here = Path(__file__).resolve().parent
    source = here.parent / "configs"
    return source if (here.parent / "pyproject.toml").is_file() and source.is_dir() else here / "configs"


SHIPPED = _shipped()


def shipped_config(path: Path) -> Path:
    """`--config lora` names configs/lora.yaml of the installed source tree; any path that exists is itself."""
    if path.exists() or path.suffix or len(path.parts) != 1:
        return path
    named = SHIPPED / f"{path.name}.yaml"
    if named.is_file():
        return named
    known = sorted(p.stem for p in SHIPPED.glob("*.yaml")) if SHIPPED.is_dir() else []
    raise ConfigError(f"config file not found: {path}" + (f" (shipped configs by name: {', '.join(known)})" if known else ""))


def _load_yaml(text: str, path: Path):
    """A config file's YAML, refusing aliases (`*name`): nothing a config needs, and a few nested ones expand to
    billions of values (an alias bomb) once walked."""
    if len(text) > 2**20:
        raise ConfigError(f"{path}: {len(text)} characters; a config is a few KB")
    if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader)):
        raise ConfigError(f"{path}: YAML aliases (*name) are not allowed in a config: write the values out")
    return yaml.safe_load(text) or {}


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                inputs: bool = True) -> Config:
    """Build a `Config` from defaults, an optional YAML file and dotted-key overrides.

    `inputs=False` leaves out the checks of the checkpoint, prompts and output paths (`tsopsd plan`).

    Raises:
        ConfigError: unreadable YAML, unknown keys, wrong types or values (all listed at once).
    """
    tree: dict = {}
    if path is not None:
        path = shipped_config(Path(path))
        if path.is_dir():
            raise ConfigError(f"--config {path} is a folder: give a YAML file (see configs/)")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = _load_yaml(path.read_bytes().decode("utf-8"), path)
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: must be a mapping of sections")
        tree = loaded
    _one_teacher(tree.get("teacher"), set(tree.get("teacher") or {}) if isinstance(tree.get("teacher"), dict) else set())
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    given = {k.split(".", 1)[1] for k, v in (overrides or {}).items() if k.startswith("teacher.")}
    _one_teacher(tree.get("teacher"), given, overrides={k.split(".", 1)[1]: v for k, v in (overrides or {}).items()
                                                        if k.startswith("teacher.")})
    errors: list[str] = []
    cfg = _build(Config, tree, "", errors)
    errors += validate(cfg, inputs=inputs)
    if errors:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid config{where}: " + "; ".join(errors))
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
