"""Load and save checkpoints: Hugging Face model folders, PEFT adapter folders and verl FSDP actor folders.

    ckpt = load_checkpoint("runs/collapsed", device="auto", dtype="auto")
    ckpt.model, ckpt.tokenizer
    load_checkpoint("checkpoints/proj/exp/global_step_120")    # verl: its actor/, shards merged in memory

Everything is read from local folders only (``local_files_only``): a path that does not exist is an
error here, never a hub download. Weights are checked before transformers sees them, so a missing or
truncated shard gives one clear line instead of a deep traceback. Outputs go through
`atomic_output`: written to a temporary sibling folder and renamed into place, so a folder that
exists is complete.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tsopsd.errors import TsopsdError
from tsopsd.folders import (
    DTYPES,
    check_adapter_folder,
    check_finite,
    check_loading_info,
    check_model_folder,
    check_unchanged,
    check_vocab,
    read_model_config,
    saved_dtype,
    weight_files,
)
from tsopsd.paths import check_out_name, check_writes, temporary, utf8_alias
from tsopsd.verl_fsdp import Actor, base_of_peft, convert_command, find_actor, is_peft_state, merged_state_dict
from tsopsd.writing import atomic_output, check_output_dir, check_writable

log = logging.getLogger(__name__)



@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        model: the causal LM (a `peft.PeftModel` when `path` is an adapter folder).
        tokenizer: its tokenizer, with a pad token and left padding.
        path: the folder it was loaded from.
        base_path: for an adapter, the base model folder; else None.
        dtype: the dtype the weights were loaded in.
        config_dir: the folder whose config.json describes the model (the base's, verl's huggingface/).
        source: what was loaded, in words (for logs and reports).
    """

    model: torch.nn.Module
    tokenizer: object
    path: Path
    base_path: Path | None
    dtype: torch.dtype
    config_dir: Path | None = None
    source: str = "model folder"

    def __post_init__(self):
        if self.config_dir is None:
            self.config_dir = self.base_path or self.path

    @property
    def is_adapter(self) -> bool:
        return self.base_path is not None


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks cuda when present, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise TsopsdError(f"unknown device '{device}': use auto, cpu or cuda[:N]") from e
    if dev.type not in ("cpu", "cuda"):
        raise TsopsdError(f"device '{device}' is not supported: use auto, cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TsopsdError(f"device '{device}' requested but CUDA is not available: use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise TsopsdError(f"device '{device}': this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on a GPU that supports it, else fp32 (fp16/bf16 matmuls on CPU are slow)."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise TsopsdError(f"unknown dtype '{dtype}': use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


# Bytes per element of every dtype the safetensors format names.
def load_tokenizer(*candidates: Path):
    """Load the first tokenizer found among `candidates`; set pad=eos if absent, left padding."""
    from transformers import AutoTokenizer

    for folder in candidates:
        if folder is None or not any(
            (folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
        ):
            continue
        try:
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # transformers raises many types for a broken tokenizer
            raise TsopsdError(f"cannot load tokenizer from {folder}: {str(e).splitlines()[0]}") from None
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise TsopsdError(f"tokenizer in {folder} has neither a pad nor an eos token")
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"  # generation appends on the right
        return tok
    names = ", ".join(str(c) for c in candidates if c is not None)
    raise TsopsdError(f"no tokenizer in {names}: save one with tokenizer.save_pretrained(folder)")


def adapter_config(path: Path) -> dict:
    """An adapter folder's adapter_config.json, checked to be a JSON object."""
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise TsopsdError(f"corrupt adapter_config.json in {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise TsopsdError(f"corrupt adapter_config.json in {path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def adapter_base(path: Path, base: Path | None) -> Path:
    if base is not None:
        base_path = Path(base)
    else:
        cfg = adapter_config(path)
        name = cfg.get("base_model_name_or_path")
        if name is not None and not isinstance(name, str):
            raise TsopsdError(f"adapter_config.json in {path}: base_model_name_or_path must be a path, got {name!r}")
        if not name:
            raise TsopsdError(f"adapter {path} names no base model: pass --base PATH")
        base_path = Path(name)
        if not base_path.is_absolute() and not base_path.exists() and (path / name).exists():
            base_path = path / name  # a base given relative to the adapter folder
    if not base_path.exists():
        raise TsopsdError(f"adapter base '{base_path}' not found (offline, local folders only): pass --base PATH")
    return base_path


def load_checkpoint(
    path: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
) -> Checkpoint:
    """Load a model folder or a PEFT adapter folder, with its tokenizer.

    Args:
        path: a folder saved by `save_pretrained` (model or PEFT adapter).
        base: for an adapter, the base model folder (default: the adapter's `base_model_name_or_path`).
        device: `auto`, `cpu`, `cuda`, `cuda:N` or a torch.device.
        dtype: `auto` (bf16 on cuda when supported, fp32 on cpu), `float32`, `bfloat16`, `float16`.

    Raises:
        TsopsdError: missing path, not a model folder, missing or corrupt weights, no tokenizer,
            adapter base not found.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
    if not path.exists():
        raise TsopsdError(f"checkpoint not found: {path}")
    is_adapter = (path / "adapter_config.json").is_file()
    if not is_adapter and not (path / "config.json").is_file() and (actor := find_actor(path)) is not None:
        if actor.hf_weights and actor.lora is None:
            ckpt = load_checkpoint(actor.hf, device=dev, dtype=torch_dtype)
            ckpt.source = actor.describe()
            return ckpt
        return _load_actor(actor, dev, torch_dtype)
    base_path = None
    if is_adapter:
        check_adapter_folder(path)
        base_path = adapter_base(path, Path(base) if base else None)
        check_model_folder(base_path)
        model_dir = base_path
    else:
        check_model_folder(path)
        model_dir = path
    tokenizer = load_tokenizer(utf8_alias(path), utf8_alias(base_path) if base_path else None)
    config = read_model_config(model_dir)
    before = weight_files(model_dir)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(utf8_alias(model_dir)), config=config, dtype=torch_dtype,
                                                           local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise TsopsdError(f"cannot load model from {model_dir}: {str(e).splitlines()[0]}") from None
    check_loading_info(info, model_dir)
    if is_adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(utf8_alias(path)), is_trainable=False)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
            raise TsopsdError(f"cannot load adapter {path} onto {base_path}: {str(e).splitlines()[0]}") from None
    check_vocab(model, tokenizer, path)
    check_finite(model, path)
    check_unchanged(before, weight_files(model_dir))
    model.to(dev)
    model.eval()
    return Checkpoint(model=model, tokenizer=tokenizer, path=path, base_path=base_path, dtype=torch_dtype)


def _load_actor(actor: Actor, dev: torch.device, dtype: torch.dtype) -> Checkpoint:
    """A verl actor from its rank shards (merged in memory, in `dtype`), with its LoRA adapter merged in."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    tokenizer = load_tokenizer(actor.hf)
    try:
        config = AutoConfig.from_pretrained(str(actor.hf), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise TsopsdError(f"cannot read {actor.hf / 'config.json'}: {str(e).splitlines()[0]}") from None
    if actor.shards:
        log.info("merging %d verl rank shard(s) of %s", actor.world_size, actor.path)
        state = merged_state_dict(actor, dtype)
        if is_peft_state(state):
            if actor.lora is None:
                raise TsopsdError(f"the shards of {actor.path} hold a LoRA model but lora_adapter/ is missing: "
                                  "copy it from the run (verl writes it beside the shards)")
            state = base_of_peft(state)
        folder, weights = None, {"state_dict": state}
    else:  # a LoRA run whose huggingface/ holds the base weights
        folder, weights = str(actor.hf), {"local_files_only": True}
    try:  # the concrete class: the Auto class wants a folder even when handed the weights
        model, info = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(
            folder, config=config, dtype=dtype, output_loading_info=True, **weights)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise TsopsdError(f"cannot build the model of {actor.path}: {str(e).splitlines()[0]}") from None
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        detail = "; ".join(f"{k.replace('_', ' ')}: {sorted(map(str, v))[:3]}" for k, v in bad.items())
        raise TsopsdError(f"the shards of {actor.path} do not fit huggingface/config.json ({detail}); "
                          f"convert with `{convert_command(actor.path)}`")
    if actor.lora is not None:
        from peft import PeftModel

        check_adapter_folder(actor.lora)
        try:
            model = PeftModel.from_pretrained(model, str(actor.lora), is_trainable=False).merge_and_unload()
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
            raise TsopsdError(f"cannot apply {actor.lora} to the model of {actor.path}: "
                              f"{str(e).splitlines()[0]}") from None
    check_vocab(model, tokenizer, actor.path)
    check_finite(model, actor.path)
    model.to(dev)
    model.eval()
    return Checkpoint(model=model, tokenizer=tokenizer, path=actor.path, base_path=None, dtype=dtype,
                      config_dir=actor.hf, source=actor.describe())



def merge_adapter(adapter: str | os.PathLike, out: str | os.PathLike, *, base: str | os.PathLike | None = None,
                  dtype: str | None = None, overwrite: bool = False, also=None) -> Path:
    """Merge a PEFT adapter into its base and save a plain checkpoint (safetensors) with the tokenizer;
    `also(folder)` adds files to it before it lands (the CLI: the reheat's record, `output.carry_record`)."""
    check_out_name(out)
    check_output_dir(Path(out), overwrite=overwrite, resumable=False)
    check_writes({"output folder": out, "temporary folder": temporary(out)}, {"adapter": adapter, "adapter base": base})
    check_writable(out)
    _warn_other_base(Path(adapter), base)
    ckpt = load_checkpoint(adapter, base=base, device="cpu", dtype="float32")
    check_writes({"output folder": out}, {"adapter base": ckpt.base_path})
    if not ckpt.is_adapter:
        raise TsopsdError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    save_as = resolve_dtype(dtype, torch.device("cpu")) if dtype else saved_dtype(ckpt.base_path)
    merged = ckpt.model.merge_and_unload()
    with atomic_output(out, overwrite=overwrite) as tmp:
        merged.to(save_as).save_pretrained(str(tmp))
        ckpt.tokenizer.save_pretrained(str(tmp))
        if also is not None:
            also(tmp)
    return Path(out)


def _warn_other_base(adapter: Path, base: str | os.PathLike | None) -> None:
    """Say so when --base is not the folder the adapter was trained on (its adapter_config.json's base)."""
    if base is None or not (adapter / "adapter_config.json").is_file():
        return
    recorded = adapter_config(adapter).get("base_model_name_or_path")
    if isinstance(recorded, str) and recorded and Path(recorded).exists() and \
            os.path.realpath(recorded) != os.path.realpath(base):
        log.warning("--base %s is not the adapter's own base %s (adapter_config.json): merging onto another model",
                    base, recorded)
