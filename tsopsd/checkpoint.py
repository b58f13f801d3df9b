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

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from tsopsd.errors import TsopsdError
from tsopsd.paths import check_out_name, check_writes, temporary, utf8_alias
from tsopsd.verl_fsdp import Actor, base_of_peft, convert_command, find_actor, is_peft_state, merged_state_dict
from tsopsd.writing import atomic_output, check_output_dir, check_writable

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                      "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def _check_safetensors(file: Path) -> set[str]:
    """Raise if a .safetensors file is truncated or its header is not valid; return its tensor names.

    Every entry is checked as the format defines it (a known dtype, a shape of non-negative integers,
    offsets that hold exactly shape x dtype bytes, the entries tiling the data with no gap or overlap),
    so an edited header gives one line here rather than an error deep in a loader.
    """
    size = file.stat().st_size

    def corrupt(why: str) -> TsopsdError:
        return TsopsdError(f"corrupt weights file {file}: {why}; re-save or re-copy the checkpoint")

    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length past end of file")
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise corrupt(str(e)) from None
    if not isinstance(header, dict):
        raise corrupt(f"its header is a JSON {type(header).__name__}, not an object")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise corrupt("__metadata__ must map names to strings")
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise corrupt(f"tensor {name!r} lacks dtype, shape or data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise corrupt(f"tensor {name!r} has an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise corrupt(f"tensor {name!r} has a bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise corrupt(f"tensor {name!r} has bad data_offsets {offsets!r}")
        numel = 1
        for n in shape:
            numel *= n
        if offsets[1] - offsets[0] != numel * SAFETENSORS_DTYPES[dtype]:
            raise corrupt(f"tensor {name!r}: {dtype} {shape} needs {numel * SAFETENSORS_DTYPES[dtype]} bytes, its "
                          f"offsets hold {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise corrupt(f"tensor {name!r} starts at byte {begin}, expected {end} (a gap or an overlap)")
        end = stop
    if 8 + header_len + end != size:
        raise TsopsdError(
            f"truncated weights file {file}: expected {8 + header_len + end} bytes, found {size}; "
            "re-copy the checkpoint"
        )
    return {name for _, _, name in spans}


def _shard_index(index: Path) -> dict[str, str]:
    """The weight map of a sharded checkpoint's index (tensor name -> shard file name), checked for form."""
    try:
        data = json.loads(index.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise TsopsdError(f"corrupt shard index {index}: {e}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                   for k, v in weight_map.items()):
        raise TsopsdError(f"corrupt shard index {index}: expected an object whose weight_map maps tensor names to "
                          "shard file names")
    return weight_map


def holds_weights_of(folder: Path, model: torch.nn.Module) -> bool:
    """Whether `folder`'s safetensors hold the weights `model` holds now: its own folder, or a copy of it, whatever
    path it was loaded by (a model in memory knows only the path string it was given, relative to a working
    directory that may have changed). The first row of every matrix the two share by name is compared (cast to
    the model's dtype): a few MB read at any size, and a fine-tune, full or LoRA-merged, changes rows of every
    matrix it trains. True when at least one is shared and all are equal; a folder with no such tensors, or
    unreadable ones, holds other weights."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = {name: folder / shard for name, shard in _shard_index(index).items()}
        elif (folder / "model.safetensors").is_file():
            with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
                files = dict.fromkeys(f.keys(), folder / "model.safetensors")
        else:
            return False
        mine = model.state_dict()
        shared = {name: name if name in mine else next((k for k in mine if k.endswith("." + name)), None)
                  for name in files}
        shared = {name: ours for name, ours in shared.items() if ours is not None and mine[ours].dim() >= 2}
        for file in sorted(set(files[name] for name in shared)):
            with safe_open(str(file), framework="pt") as f:
                for name in sorted(n for n in shared if files[n] == file):
                    ours = mine[shared[name]].detach()
                    row = f.get_slice(name)[0:1]
                    if tuple(f.get_slice(name).get_shape()) != tuple(ours.shape) or \
                            not torch.equal(row.to(ours.dtype), ours[0:1].cpu()):
                        return False
        return bool(shared)
    except (OSError, ValueError, RuntimeError, SafetensorError, TsopsdError):
        return False


def check_model_folder(path: Path) -> None:
    """Check that `path` holds a config and complete weights (safetensors, sharded or not)."""
    if not path.exists():
        raise TsopsdError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise TsopsdError(f"checkpoint must be a folder saved by save_pretrained, got a file: {path}")
    if not (path / "config.json").is_file():
        raise TsopsdError(f"not a model folder (no config.json): {path}; {unknown_layout(path)}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _shard_index(index)
        held = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard or not (path / shard).is_file():
                raise TsopsdError(f"weights shard missing: {path / shard} (listed in {index.name})")
            held[shard] = _check_safetensors(path / shard)
        for name, shard in weight_map.items():
            if name not in held[shard]:
                raise TsopsdError(f"corrupt shard index {index}: it puts {name} in {shard}, which does not hold it; "
                                  "re-save or re-copy the checkpoint")
        return
    single = path / "model.safetensors"
    if single.is_file():
        _check_safetensors(single)
        return
    if (path / "pytorch_model.bin").is_file():  # a pickle: never unpickled from a user's disk
        raise TsopsdError(f"{path} holds pytorch_model.bin, a pickle, which tsopsd does not load: save it as "
                          "safetensors first (transformers: model.save_pretrained(folder, safe_serialization=True))")
    raise TsopsdError(f"no weights in {path}: expected model.safetensors or a sharded index")


def unknown_layout(path: Path) -> str:
    """What a folder that tsopsd cannot load holds, and how to convert it (the end of an error line)."""
    if (path / "actor").is_dir():  # a verl step folder: what matters is its actor/
        path = path / "actor"
    names = sorted(f.name for f in path.iterdir())
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "") if names else "nothing"
    if any(n.endswith(".distcp") for n in names):
        kind, fix = "a torch.distributed.checkpoint (DCP) save", f"`{convert_command(path)}`"
    elif "dist_ckpt" in names or "latest_checkpointed_iteration.txt" in names or any(n.startswith("iter_") for n in names):
        kind, fix = "a Megatron checkpoint", f"`{convert_command(path, 'megatron')}`"
    elif "latest" in names or any(n.startswith(("zero_pp_rank_", "mp_rank_")) for n in names) or \
            any((path / n).is_dir() and n.startswith("global_step") for n in names):
        kind, fix = "a DeepSpeed checkpoint (OpenRLHF _actor/)", "its Hugging Face copy (OpenRLHF's <tag>_hf folder) " \
            "or DeepSpeed's zero_to_fp32.py"
    else:
        kind, fix = "no known layout", f"a save_pretrained folder, a PEFT adapter, or a verl actor/ folder " \
            f"(`{convert_command(path)}` converts a verl one)"
    return f"found {shown}: {kind}; use {fix}"


def loadable_folder(path: str | os.PathLike) -> Path | None:
    """The folder plain transformers/peft load for `path` (itself, or a verl actor's huggingface/ with weights);
    None for a verl checkpoint held only in rank shards (an adapter output cannot name it as its base)."""
    path = Path(path)
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return path
    actor = find_actor(path)
    if actor is None:
        return path
    return actor.hf if actor.hf_weights and actor.lora is None else None


def check_adapter_folder(path: Path) -> None:
    if not (path / "adapter_model.safetensors").is_file():
        raise TsopsdError(f"adapter folder has no adapter_model.safetensors: {path}")
    _check_safetensors(path / "adapter_model.safetensors")


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
    before = _weight_files(model_dir)
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
    _check_unchanged(before, _weight_files(model_dir))
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


def read_model_config(folder: Path):
    """A model folder's transformers config, checked to describe a model tsopsd can reheat (one-line errors)."""
    from transformers import AutoConfig

    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise TsopsdError(f"{folder / 'config.json'}: not a readable JSON config ({e})") from None
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise TsopsdError(f"{folder / 'config.json'}: model_type {model_type!r} is not an architecture transformers knows")
    layers = raw.get("num_hidden_layers", raw.get("n_layer"))
    if type(layers) is int and layers > MAX_LAYERS:  # before transformers builds per-layer lists of that length
        raise TsopsdError(f"{folder / 'config.json'}: num_hidden_layers {layers} is more than {MAX_LAYERS}; "
                          "is the config right?")
    try:
        config = AutoConfig.from_pretrained(str(utf8_alias(folder)), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a config transformers refuses, whatever it raises
        raise TsopsdError(f"{folder / 'config.json'}: transformers cannot read it ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    check_model_config(config, folder / "config.json")
    return config


MAX_LAYERS = 1024  # the largest public decoders have ~130 layers; far more is a typo (and planning it never ends)
MAX_SIZES = {"vocab_size": 2**24, "hidden_size": 2**17}  # 16M tokens, 131k wide: far past any decoder, short of a typo
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def check_model_config(config, where: str | os.PathLike) -> None:
    """Refuse, in one line, a config that is not a decoder-only attention transformer of sane sizes."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = config.model_type
    supported = "tsopsd reheats decoder-only transformers (Llama, Qwen, Mistral, Gemma, GPT-2, ...)"
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise TsopsdError(f"{where}: model_type {kind!r} is not a causal language model; {supported}")
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise TsopsdError(f"{where}: model_type {kind!r} is an encoder (masked LM); {supported}")
    text = config.get_text_config()
    if getattr(text, "num_attention_heads", None) is None:
        raise TsopsdError(f"{where}: model_type {kind!r} has no attention heads (a state-space model?); {supported}")
    sizes = {name: getattr(text, name, None) for name in
             ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")}
    for name, value in sizes.items():
        if type(value) is not int or value < (2 if name in ("vocab_size", "hidden_size") else 1):
            raise TsopsdError(f"{where}: {name} must be an integer >= {2 if name in ('vocab_size', 'hidden_size') else 1}, "
                              f"got {value!r}")
    for name, most in MAX_SIZES.items():
        if sizes[name] > most:
            raise TsopsdError(f"{where}: {name} {sizes[name]} is more than {most}; is the config right?")
    for name in POSITION_KEYS:  # the context: where a config gives one, at least one position
        value = getattr(text, name, None)
        if value is not None and (type(value) is not int or value < 1):
            raise TsopsdError(f"{where}: {name} must be an integer >= 1 (the context length), got {value!r}")
    if sizes["num_hidden_layers"] > MAX_LAYERS:
        raise TsopsdError(f"{where}: num_hidden_layers {sizes['num_hidden_layers']} is more than {MAX_LAYERS}; "
                          "is the config right?")
    heads = sizes["num_attention_heads"]
    kv = getattr(text, "num_key_value_heads", None) or heads
    if type(kv) is not int or kv < 1 or heads % kv:
        raise TsopsdError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    head_dim = getattr(text, "head_dim", None)
    if head_dim is None and sizes["hidden_size"] % heads:
        raise TsopsdError(f"{where}: hidden_size {sizes['hidden_size']} is not a multiple of num_attention_heads {heads}")
    head_dim = head_dim or sizes["hidden_size"] // heads
    if type(head_dim) is not int or head_dim < 2 or head_dim % 2:
        raise TsopsdError(f"{where}: the attention head size must be an even integer >= 2, got {head_dim!r}")
    vocab = sizes["vocab_size"]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(text, name, None)
        if value is None:
            value = getattr(config, name, None)
        for token in value if isinstance(value, list) else [value]:
            if token is not None and (type(token) is not int or not 0 <= token < vocab):
                raise TsopsdError(f"{where}: {name} {value!r} is outside the vocabulary (vocab_size {vocab})")


def check_loading_info(info: dict, folder: Path) -> None:
    """Refuse weights that do not match the model: missing tensors would be randomly initialised, silently."""
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if info.get("error_msgs"):
        bad["errors"] = info["error_msgs"]
    if bad:
        detail = "; ".join(f"{k.replace('_', ' ')}: {', '.join(sorted(map(str, v))[:3])}"
                           + (f" and {len(v) - 3} more" if len(v) > 3 else "") for k, v in bad.items())
        raise TsopsdError(f"the weights in {folder} do not match its config.json ({detail}); re-save the checkpoint")


def _weight_files(folder: Path) -> dict[str, tuple]:
    """(size, mtime, inode) of each weights file: a file rewritten while it is read changes one of them."""
    out = {}
    for f in sorted(folder.iterdir()):
        if f.suffix in (".safetensors", ".bin") and f.is_file():
            st = f.stat()
            out[str(f)] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def _check_unchanged(before: dict, after: dict) -> None:
    for name in sorted(before.keys() | after.keys()):
        if before.get(name) != after.get(name):
            raise TsopsdError(f"{name} changed while it was read (another process is writing the checkpoint): rerun "
                              "once it is complete")


@torch.no_grad()
def check_finite(model: torch.nn.Module, path: Path) -> None:
    """Every weight is finite: a NaN or inf would only surface later, deep in sampling, as a wrong index."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            n = int((~torch.isfinite(p)).sum())
            raise TsopsdError(f"non-finite weights in {path}: {name} has {n} NaN/inf value(s); the checkpoint is "
                              "broken (re-save it from a run that did not diverge)")


def check_vocab(model, tokenizer, path: Path) -> None:
    """The model's output rows must cover every token id the tokenizer can produce."""
    out = model.get_output_embeddings()
    if out is not None and len(tokenizer) > out.weight.shape[0]:
        raise TsopsdError(
            f"tokenizer in {path} has {len(tokenizer)} tokens but the model head has {out.weight.shape[0]} rows: "
            "they do not belong together"
        )


def fingerprint(*folders: Path | None) -> dict[str, list]:
    """Sizes and header hashes of every file of `folders` (weights, configs, tokenizer, chat template): what a
    resume checks is unchanged.

    Per file: its size, and a hash of its header (a safetensors header lists names, dtypes, shapes and
    offsets; other formats: the first MiB) and of three 64 KiB samples of its data (start, middle,
    end). Cheap at any size, and robust to copying; a re-saved checkpoint with new values changes the
    samples even where names and shapes stay.
    """
    out = {}
    for folder in folders:
        if folder is None:
            continue
        for f in sorted(Path(folder).iterdir()):
            if not f.is_file() or f.name in ("README.md", ".gitattributes"):
                continue
            size = f.stat().st_size
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                head = fh.read(8)
                if f.suffix == ".safetensors" and len(head) == 8:
                    head += fh.read(min(struct.unpack("<Q", head)[0], 100_000_000))
                else:
                    head += fh.read(2**20)
                h.update(head)
                for at in (len(head), (len(head) + size) // 2, max(len(head), size - 2**16)):
                    fh.seek(at)
                    h.update(fh.read(2**16))
            key = f"{Path(folder).name}/{f.name}"  # by name, not place: a run folder moved whole still resumes
            out[key if key not in out else f"{len(out)}:{key}"] = [size, h.hexdigest()]
    return out


def saved_dtype(path: Path) -> torch.dtype:
    """The dtype a checkpoint folder was saved in (from config.json; float32 when it does not say)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    return DTYPES.get(str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"), torch.float32)


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
