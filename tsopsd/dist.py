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
