"""What a checkpoint folder holds, checked before anything loads it: its weights files (safetensors headers, the
shard index), its layout (and how to convert one tsopsd cannot load), its config's sizes, and its fingerprint.

    check_model_folder(Path("ckpt"))      # one line for a missing shard, a truncated file, a pickle
    fingerprint(Path("ckpt"))             # sizes and sampled hashes: what a resume checks is unchanged

Nothing here loads a model; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

from tsopsd.errors import TsopsdError
from tsopsd.paths import utf8_alias
from tsopsd.verl_fsdp import convert_command, find_actor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_safetensors(file: Path) -> set[str]:
    """Raise if a .safetensors file is truncated or its header is not valid; return its tensor names.

    safetensors validates the header as its format defines it (known dtypes, shapes of non-negative integers,
    offsets holding exactly shape x dtype bytes and tiling the data, the file's length), reading only the header;
    its reason is said in our one line, so an edited header is found here rather than deep in a loader.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(utf8_alias(file)), framework="pt") as f:  # it takes UTF-8 paths only
            return set(f.keys())
    except SafetensorError as e:
        why = str(e).removeprefix("Error while deserializing header: ")
        if "not fully covered" in why:  # its tensors' bytes and the file's length disagree
            raise TsopsdError(f"truncated weights file {file}: its length is not what its header describes "
                              f"({why}); re-copy the checkpoint") from None
        raise TsopsdError(f"corrupt weights file {file}: {why}; re-save or re-copy the checkpoint") from None


def shard_index(index: Path) -> dict[str, str]:
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

    folder = utf8_alias(folder) if Path(folder).is_dir() else Path(folder)  # safetensors takes UTF-8 paths only
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = {name: folder / shard for name, shard in shard_index(index).items()}
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
        weight_map = shard_index(index)
        held = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard or not (path / shard).is_file():
                raise TsopsdError(f"weights shard missing: {path / shard} (listed in {index.name})")
            held[shard] = check_safetensors(path / shard)
        for name, shard in weight_map.items():
            if name not in held[shard]:
                raise TsopsdError(f"corrupt shard index {index}: it puts {name} in {shard}, which does not hold it; "
                                  "re-save or re-copy the checkpoint")
        return
    single = path / "model.safetensors"
    if single.is_file():
        check_safetensors(single)
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
    check_safetensors(path / "adapter_model.safetensors")



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


def weight_files(folder: Path) -> dict[str, tuple]:
    """(size, mtime, inode) of each weights file: a file rewritten while it is read changes one of them."""
    out = {}
    for f in sorted(folder.iterdir()):
        if f.suffix in (".safetensors", ".bin") and f.is_file():
            st = f.stat()
            out[str(f)] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def check_unchanged(before: dict, after: dict) -> None:
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
