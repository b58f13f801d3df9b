"""verl's FSDP actor checkpoints: find one, check its shard set, merge the rank shards into one state dict.

    actor = find_actor(Path("checkpoints/proj/exp/global_step_120"))    # or .../global_step_120/actor
    actor.hf_weights        # True when huggingface/ holds weights: load that folder as it is
    state = merged_state_dict(actor, torch.bfloat16)                    # else: {name: full tensor}

verl's `FSDPCheckpointManager` writes, per step, `actor/` with one `model_world_size_W_rank_R.pt` per
rank (that rank's `model.state_dict()`: DTensors under FSDP2, and under FSDP1 with a device mesh, which
verl always gives), `fsdp_config.json` (`FSDP_version`, `world_size`), `huggingface/` (config and
tokenizer; weights only when `save_contents` asks for `hf_model`) and, for a LoRA run, `lora_adapter/`
(PEFT's adapter files; the shards then hold the PEFT-wrapped model).

The shards are read with `torch.load(weights_only=True, mmap=True)`: never arbitrary pickle. The only
types let through are the tensors and the DTensor types (DTensor, its spec, DeviceMesh, Shard,
Replicate) that `torch.distributed.tensor` adds to torch's weights-only allow-list when imported, which
`_load_shard` does first. Anything else in a shard (an FSDP1 `ShardedTensor`, a pickled object) is
refused in one line naming the verl command that converts the checkpoint. Each tensor is rebuilt from
the placements its shards record (Shard(d), uneven splits, Replicate, on a 1-D or 2-D mesh), one tensor
at a time straight into the target dtype: memory holds the merged model once, the shards stay mapped.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tsopsd.errors import TsopsdError

SHARD = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")  # names FSDP1 or compile add


def convert_command(folder: Path, backend: str = "fsdp") -> str:
    """verl's own converter of a checkpoint folder to a Hugging Face one (named in error lines)."""
    return f"python -m verl.model_merger merge --backend {backend} --local_dir {folder} --target_dir MERGED"


def _has_weights(folder: Path) -> bool:
    return any((folder / f).is_file() for f in WEIGHT_FILES)


@dataclass(frozen=True)
class Actor:
    """A verl actor checkpoint folder.

    Attributes:
        path: the `actor/` folder.
        world_size: ranks that saved it (`fsdp_config.json`, else the shard names).
        shards: the model shard files, by rank.
        lora: the `lora_adapter/` folder of a LoRA run, else None.
    """

    path: Path
    world_size: int
    shards: tuple[Path, ...]
    lora: Path | None

    @property
    def hf(self) -> Path:
        return self.path / "huggingface"

    @property
    def hf_weights(self) -> bool:
        return _has_weights(self.hf)

    def describe(self) -> str:
        lora = " + lora_adapter/" if self.lora else ""
        where = "huggingface/ weights" if self.hf_weights and not self.lora else \
            f"{self.world_size} FSDP rank shard(s){lora}"
        return f"verl actor checkpoint ({where})"


def is_actor(path: Path) -> bool:
    """`path` looks like a verl actor folder: fsdp_config.json, or huggingface/ beside rank shards or named actor/."""
    if not path.is_dir():
        return False
    if (path / "fsdp_config.json").is_file():
        return True
    return (path / "huggingface" / "config.json").is_file() and \
        (path.name == "actor" or any(SHARD.match(f.name) for f in path.iterdir()))


def find_actor(path: Path) -> Actor | None:
    """The verl actor checkpoint at `path` (an `actor/` folder or the `global_step_N/` above it), checked; or None.

    Raises:
        TsopsdError: a partial set of shards, shards of two world sizes, a world size that disagrees with
            fsdp_config.json, no shards and no huggingface/ weights, or no huggingface/ config to build from.
    """
    path = Path(path)
    if not is_actor(path):
        if not is_actor(path / "actor"):
            return None
        path = path / "actor"
    found: dict[int, dict[int, Path]] = {}
    for f in path.iterdir():
        if m := SHARD.match(f.name):
            found.setdefault(int(m[1]), {})[int(m[2])] = f
    declared = _declared_world_size(path)
    if not found:
        if _has_weights(path / "huggingface"):
            return Actor(path, declared or 0, (), _lora(path))
        raise TsopsdError(f"no model shards in verl checkpoint {path} (no model_world_size_W_rank_R.pt) and no weights "
                          "in its huggingface/: the step was saved without 'model' in checkpoint.save_contents")
    if len(found) > 1:
        raise TsopsdError(f"verl checkpoint {path} mixes shards of world sizes {sorted(found)}: keep one save per folder")
    ((world, ranks),) = found.items()
    if declared is not None and declared != world:
        raise TsopsdError(f"world-size mismatch in verl checkpoint {path}: fsdp_config.json says {declared} ranks, "
                          f"the shard files say {world}")
    missing = sorted(set(range(world)) - set(ranks))
    if missing or len(ranks) != world:
        extra = sorted(r for r in ranks if r >= world)
        what = f"rank(s) {_ranks(missing)} missing" if missing else f"rank(s) {_ranks(extra)} beyond the world size"
        raise TsopsdError(f"partial verl checkpoint {path}: {what} of {world} (model_world_size_{world}_rank_R.pt); "
                          "copy the whole actor/ folder")
    if not (path / "huggingface" / "config.json").is_file():
        raise TsopsdError(f"verl checkpoint {path} has no huggingface/config.json to build the model from; "
                          f"convert it with `{convert_command(path)}`")
    return Actor(path, world, tuple(ranks[r] for r in range(world)), _lora(path))


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks[:8])) + (", …" if len(ranks) > 8 else "")


def _declared_world_size(path: Path) -> int | None:
    cfg = path / "fsdp_config.json"
    if not cfg.is_file():
        return None  # verl before 0.4 did not write it: the shard names say the world size
    try:
        world = json.loads(cfg.read_text())["world_size"]
    except (ValueError, KeyError, TypeError) as e:
        raise TsopsdError(f"corrupt {cfg}: {e!r}; it should hold {{\"FSDP_version\": 2, \"world_size\": W}}") from None
    if not isinstance(world, int) or world < 1:
        raise TsopsdError(f"corrupt {cfg}: world_size {world!r} is not a positive integer")
    return world


def _lora(path: Path) -> Path | None:
    lora = path / "lora_adapter"
    return lora if lora.is_dir() else None


def _load_shard(file: Path) -> dict:
    import pickle

    import torch.distributed.tensor  # noqa: F401  registers DTensor and its spec types as weights-only safe

    logging.getLogger("torch.distributed.device_mesh").setLevel(logging.ERROR)  # "unpickled before PGs were created"
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"a {found[1]}" if found else "objects other than tensors and DTensors"
        hint = " (FSDP1 without a device mesh)" if found and "ShardedTensor" in found[1] else ""
        raise TsopsdError(f"verl shard {file} holds {what}{hint}, which tsopsd does not unpickle; convert the "
                          f"checkpoint with `{convert_command(file.parent)}` and pass MERGED") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise TsopsdError(f"cannot read verl shard {file}: {str(e).splitlines()[0]}; re-copy the checkpoint") from None
    if not isinstance(state, dict):
        raise TsopsdError(f"verl shard {file} holds a {type(state).__name__}, not a model state dict")
    return state


def _clean(name: str) -> str:
    for w in WRAPPERS:
        name = name.replace(w, "")
    return name


def _region(shape: torch.Size, mesh: torch.Tensor, placements, rank: int, file: Path) -> tuple[slice, ...]:
    """The part of a tensor of `shape` that `rank` holds: DTensor's chunking, mesh dim by mesh dim."""
    from torch.distributed.tensor import Replicate, Shard

    where = (mesh == rank).nonzero()
    if len(where) != 1:
        raise TsopsdError(f"verl shard {file} is rank {rank}, which its device mesh {mesh.tolist()} does not hold")
    coord = where[0].tolist()
    lo, hi = [0] * len(shape), list(shape)
    for m, p in enumerate(placements):
        if isinstance(p, Replicate):
            continue
        if type(p) is not Shard:  # Partial sums, strided shards (FSDP2 + TP): not a verl FSDP save
            raise TsopsdError(f"verl shard {file} records placement {p}, which tsopsd cannot merge; convert the "
                              f"checkpoint with `{convert_command(file.parent)}`")
        d, n = p.dim, mesh.shape[m]
        chunk = -(-(hi[d] - lo[d]) // n)  # torch.chunk's split: ceil, the last chunks short or empty
        start = min(lo[d] + coord[m] * chunk, hi[d])
        lo[d], hi[d] = start, min(start + chunk, hi[d])
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def merged_state_dict(actor: Actor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The full model state dict of `actor`'s rank shards, in `dtype` (floating tensors), names cleaned.

    Raises:
        TsopsdError: a shard that is not a state dict of tensors and DTensors, shards that disagree on the
            names, shapes or placements, a device mesh other than the world size, or a tensor left incomplete.
    """
    from torch.distributed.tensor import DTensor

    states = [_load_shard(f) for f in actor.shards]
    names = list(states[0])
    for rank, state in enumerate(states[1:], start=1):
        if set(state) != set(names):
            odd = sorted(set(state) ^ set(names))[:3]
            raise TsopsdError(f"verl shards of {actor.path} disagree: rank {rank} and rank 0 hold different tensors "
                              f"(e.g. {odd}); the folder mixes two saves")
    merged = {}
    for name in names:
        parts = [state[name] for state in states]
        first = parts[0]
        if not isinstance(first, torch.Tensor):
            raise TsopsdError(f"verl shard {actor.shards[0]} holds a {type(first).__name__} under '{name}', not a tensor")
        cast = dtype if first.is_floating_point() else first.dtype
        if not isinstance(first, DTensor):  # kept whole on every rank (a buffer)
            merged[_clean(name)] = first.to(cast)
            continue
        mesh = first.device_mesh.mesh
        if mesh.numel() != actor.world_size:
            raise TsopsdError(f"world-size mismatch in verl checkpoint {actor.path}: '{name}' is sharded over "
                              f"{mesh.numel()} ranks, the checkpoint has {actor.world_size}")
        full = torch.empty(first.shape, dtype=cast)
        covered = set()
        for rank, (part, file) in enumerate(zip(parts, actor.shards)):
            if not isinstance(part, DTensor) or part.shape != first.shape or part.placements != first.placements:
                raise TsopsdError(f"verl shards of {actor.path} disagree on '{name}' (rank {rank} vs rank 0): "
                                  "the folder mixes two saves")
            region = _region(first.shape, mesh, first.placements, rank, file)
            local = part.to_local()
            if tuple(local.shape) != tuple(s.stop - s.start for s in region):
                raise TsopsdError(f"verl shard {file}: '{name}' holds {tuple(local.shape)} where its placement "
                                  f"{first.placements} over {mesh.tolist()} gives {region}; the shard is damaged")
            full[region] = local
            covered.add(tuple((s.start, s.stop) for s in region))
        if sum(math.prod(b - a for a, b in r) for r in covered) != full.numel():
            raise TsopsdError(f"verl shards of {actor.path} do not cover all of '{name}'; the shard set is damaged")
        merged[_clean(name)] = full
    return merged


def base_of_peft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's state dict from a PEFT-wrapped model's: LoRA tensors dropped, wrapper names undone.

    `base_model.model.X.q_proj.base_layer.weight` -> `X.q_proj.weight`; `…lora_A.default.weight` dropped.
    """
    prefix = "base_model.model."
    out = {}
    for name, tensor in state.items():
        if ".lora_" in name:
            continue
        name = name.removeprefix(prefix).replace(".base_layer.", ".")
        out[name] = tensor
    return out


def is_peft_state(state: dict[str, torch.Tensor]) -> bool:
    return any(n.startswith("base_model.model.") for n in state)
