"""Data-parallel reheating on PyTorch's own distributed engine (torchrun, accelerate launch).

    torchrun --nproc_per_node 8 -m tsopsd reheat CKPT --prompts p.jsonl --out OUT --config configs/full.yaml

Launchers set RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous variables; `init` joins the process
group (NCCL on GPUs, gloo on CPU). Every rank holds the full student (and, in LoRA mode, shares the
base as teacher), samples its own share of each step's prompts, and back-propagates its share of the
loss normalized by the *global* valid-token count; gradients are then summed across ranks, so the
update equals that of one process with the whole batch. Step statistics are summed across ranks
before anyone decides anything (guards, convergence) or logs, so every rank takes the same path.
Only rank 0 writes files and prints progress.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "auto") -> tuple[DistEnv, str]:
    """Join the process group if a launcher started us; returns the env and the device to use."""
    if not launched():
        return DistEnv(), device
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    elif device == "auto":
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistEnv(rank=rank, world_size=world, local_rank=local), device


def finish(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def all_sum(env: DistEnv, values: list[float], device: torch.device) -> list[float]:
    """Sum a list of floats across ranks (float64)."""
    if not env.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_sum_grads(env: DistEnv, params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` across ranks, in one flat buffer (a missing grad counts as zero)."""
    if not env.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n


def gather_errors(env: DistEnv, error: str | None) -> str | None:
    """Every rank's error message (or None), joined; the same on all ranks."""
    if not env.enabled:
        return error
    found: list[str | None] = [None] * env.world_size
    dist.all_gather_object(found, error)
    errors = [f"rank {r}: {e}" for r, e in enumerate(found) if e]
    return "; ".join(errors) if errors else None


def broadcast(env: DistEnv, obj):
    """Rank 0's `obj` on every rank."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_params(env: DistEnv, params: list[torch.nn.Parameter]) -> None:
    """Copy rank 0's values of `params` to every rank."""
    if not env.enabled:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


# ---- FSDP2 -------------------------------------------------------------------------------------------

def init_single(device: str) -> tuple[DistEnv, str]:
    """A one-rank process group (for `--parallel fsdp` without a launcher)."""
    import socket

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=0, world_size=1)
        if use_cuda:
            device = "cuda:0"
    return DistEnv(rank=0, world_size=1, local_rank=0), ("cpu" if device == "auto" else device)


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def fsdp_shard(model: torch.nn.Module, device: torch.device) -> None:
    """FSDP2 (`fully_shard`) on each decoder layer and on the trunk (embeddings, final norm).

    The LM head stays replicated: the loss calls it on a different number of chunks on each rank, and
    only a module outside FSDP can be called a rank-dependent number of times. Its gradients are
    averaged by hand (`all_mean_grads`).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tsopsd.errors import TsopsdError
    from tsopsd.scoring import causal_lm

    lm = causal_lm(model)
    head, emb = lm.get_output_embeddings(), lm.get_input_embeddings()
    if head is not None and emb is not None and head.weight is emb.weight:
        raise TsopsdError("--parallel fsdp does not support tied input/output embeddings yet: use --parallel ddp")
    trunk = lm.base_model
    layers = getattr(trunk, "layers", None) or getattr(trunk, "h", None)
    if layers is None:
        raise TsopsdError(f"--parallel fsdp: cannot find the decoder layers of {type(trunk).__name__}")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(trunk, mesh=mesh)


def all_done_fn(env: DistEnv, device: torch.device):
    """For synced decoding: True once every rank is done."""
    def all_done(done: bool) -> bool:
        t = torch.tensor([0.0 if done else 1.0], device=device)
        dist.all_reduce(t)
        return float(t) == 0.0
    return all_done


def all_mean_grads(env: DistEnv, params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of replicated (non-FSDP) parameters across ranks."""
    if not env.enabled or not params:
        return
    all_sum_grads(env, params)
    for p in params:
        p.grad.div_(env.world_size)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip by the global L2 norm over sharded (DTensor) and replicated gradients; returns the norm."""
    sharded, local = [], []
    for p in params:
        if p.grad is not None:
            (sharded if is_sharded(p.grad) else local).append(p.grad)
    total = torch.zeros((), dtype=torch.float64, device=(sharded or local or [torch.zeros(())])[0].device)
    if sharded:
        part = sum(g.to_local().double().pow(2).sum() for g in sharded)
        dist.all_reduce(part)
        total = total + part
    if local:
        total = total + sum(g.double().pow(2).sum() for g in local)
    norm = float(total.sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in sharded + local:
            g.mul_(scale)
    return norm


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on rank 0, on CPU; empty on other ranks. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
