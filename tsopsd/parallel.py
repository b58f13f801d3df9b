"""The parallel backend: one process, DDP replicas or FSDP2 shards, behind one interface.

    torchrun --nproc_per_node 8 -m tsopsd reheat CKPT --prompts p.jsonl --out OUT --config configs/full.yaml

    launch = join(cfg.model.device, group=cfg.train.parallel == "fsdp")   # torchrun/accelerate variables
    backend = make_backend(cfg.train.parallel, launch, device).for_model(model, cfg.train.parallel, ...)
    start, mine = backend.my_share(global_rows)       # which rows this rank samples
    backend.reduce_gradients(policy.trainable)         # the update of one process with the whole batch

The loop never asks which mode it runs in; it asks the backend (torchtune's recipes keep rank logic
out of the training loop the same way). What each mode answers:

- `Single`: one process; everything is local.
- `DDP`: every rank holds the whole student (in LoRA mode the base doubles as teacher), samples its
  share of each step's prompts and back-propagates its share of the loss normalized by the *global*
  number of valid tokens; gradients are then summed across ranks in one flat all-reduce. Statistics are
  summed before anyone decides anything, so every rank takes the same path; rank 0 writes files.
- `FSDP`: FSDP2 (`fully_shard`) on each decoder layer and on the trunk; the LM head stays replicated
  (the chunked loss calls it a rank-dependent number of times, which only a module outside FSDP allows)
  and its gradients are averaged by hand. Every rank runs the same forwards and backwards (lock-step
  decoding and training), measurements run on all ranks, resumable state goes through
  its own safetensors shards (no pickle), and the output is gathered onto rank 0.

Launchers set RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous variables; NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as tdist

from tsopsd.errors import TsopsdError
from tsopsd.family import decoder_layers, tied_embeddings
from tsopsd.saved import load_tree, map_tensors, save_tree

T = TypeVar("T")


def launched_rank() -> int:
    """This process's rank as a launcher (torchrun, accelerate launch) set it; 0 when not launched."""
    return int(os.environ.get("RANK", "0"))


@dataclass(frozen=True)
class Launch:
    """Where this process sits: its rank among `world_size` and the device it uses."""

    rank: int = 0
    world_size: int = 1
    device: str = "auto"


def _wants_cuda(device: str) -> bool:
    return (torch.cuda.is_available() and device in ("auto", "cuda")) or device.startswith("cuda")


def join(device: str = "auto", *, group: bool = False) -> Launch:
    """Join the process group a launcher prepared (or, with `group`, make one of a single process).

    Returns the rank, world size and the device this rank uses (cuda:LOCAL_RANK on GPUs).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not group:
        return Launch(device=device)
    use_cuda = _wants_cuda(device)
    if world > 1:
        rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    else:  # FSDP needs a process group, even of one
        rank, local = 0, 0
        if not tdist.is_initialized():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(port))
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    if use_cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    elif device == "auto":
        device = "cpu"
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=max(world, 1))
    return Launch(rank=rank, world_size=max(world, 1), device=device)


def _needs_sharding(model: torch.nn.Module, mode: str, device_memory: int | None = None) -> bool:
    """auto: shard when one device cannot hold the run (a rough count of weights, grads and AdamW state).

    `device_memory`: the device's bytes (default: the CUDA device's; a CPU run never shards by itself).
    """
    p = next(model.parameters())
    if device_memory is None:
        if p.device.type != "cuda":
            return False
        device_memory = torch.cuda.get_device_properties(p.device).total_memory
    n = sum(x.numel() for x in model.parameters())
    per = p.element_size()
    need = n * per * (2 + 1) + n * 8 if mode == "full" else n * per * 1.2
    return need > 0.8 * device_memory


def make_backend(parallel: str, launch: Launch, device: torch.device) -> Backend:
    """The backend for `parallel` (auto | ddp | fsdp) at this launch; see `Backend.for_model` for auto."""
    if parallel == "fsdp":
        return FSDP(launch, device)
    return DDP(launch, device) if launch.world_size > 1 else Single(launch, device)


class Backend:
    """One process (the base class is the single-process backend); subclasses add the collectives."""

    lockstep = False  # every rank must run the same forwards and backwards (sharded weights)

    def __init__(self, launch: Launch, device: torch.device):
        self.rank, self.world_size, self.device = launch.rank, launch.world_size, device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- data -----------------------------------------------------------------------------------
    def my_share(self, items: list[T]) -> tuple[int, list[T]]:
        """This rank's contiguous share of a list that is the same on every rank: (its start, the share)."""
        n = len(items) // self.world_size
        return self.rank * n, items[self.rank * n:(self.rank + 1) * n]

    # ---- statistics and gradients -------------------------------------------------------------
    def sum(self, values: list[float] | torch.Tensor) -> list[float]:
        """Sum floats (a list, or a float64 device tensor: read back once) across ranks (float64)."""
        return values.tolist() if isinstance(values, torch.Tensor) else values

    def loss_normalizer(self, global_tokens: int) -> float:
        """What to divide this rank's summed divergence by so that the reduced gradient is the global mean."""
        return float(global_tokens)

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Make every rank's gradients those of one process with the whole batch."""

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """Clip by the global L2 norm of all gradients; returns the norm before clipping."""
        grads = [p.grad for p in params if p.grad is not None]
        norm = float(self._squared_norm(grads).sqrt())
        if max_norm > 0 and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for g in grads:
                g.mul_(scale)
        return norm

    def _squared_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Sum of squares of `grads` (float64), as one process sees them."""
        return sum((g.double().pow(2).sum() for g in grads), torch.zeros((), dtype=torch.float64, device=self.device))

    @property
    def done_everywhere(self) -> Callable[[bool], bool] | None:
        """For lock-step decoding: ``done_everywhere(this rank is done) -> every rank is done``; or None."""
        return None

    # ---- control --------------------------------------------------------------------------------
    def everywhere(self, fn: Callable[[], T], *, prefix: str = "") -> T:
        """Run `fn` on every rank; a `TsopsdError` on any rank is raised on every rank, naming the ranks."""
        return fn()

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` on rank 0 only; its `TsopsdError` is raised on every rank. Others get None."""
        return self.everywhere(fn if self.is_main else lambda: None)

    def measure(self, fn: Callable[[], T]) -> T | None:
        """Run a measurement of the model: on rank 0, or on every rank when the model is sharded."""
        return fn() if self.is_main or self.lockstep else None

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        return obj

    def barrier(self) -> None:
        pass

    def finish(self) -> None:
        """Leave the process group (after the last collective)."""

    def close(self) -> None:
        """Leave the process group at once, on any way out (no barrier: another rank may be gone).

        A group still alive at interpreter exit tears its threads down in an undefined order (gloo's
        "terminate called without an active exception").
        """
        if tdist.is_initialized():
            tdist.destroy_process_group()

    # ---- model and state --------------------------------------------------------------------------
    def for_model(self, model: torch.nn.Module, parallel: str, *, mode: str, adapter_input: bool,
                  device_memory: int | None = None) -> Backend:
        """The backend the loaded model needs: auto turns to FSDP when one device cannot hold the run."""
        backend = self
        if parallel == "auto" and self.world_size > 1 and _needs_sharding(model, mode, device_memory):
            backend = FSDP(Launch(self.rank, self.world_size), self.device)
        if backend.lockstep and adapter_input:  # the gathered output is rebuilt from the input folder
            raise TsopsdError("--parallel fsdp with an adapter input is not supported: merge it first (tsopsd merge)")
        return backend

    def prepare(self, policy) -> None:
        """Give every rank the same trainable values (and shard the model where the backend shards)."""

    def generating(self, policy):
        """The context rollouts and reports sample in (FSDP: the student's weights gathered once for it)."""
        return contextlib.nullcontext()

    def snapshot(self, policy) -> dict[str, torch.Tensor]:
        """A copy of the trainable parameters: on the device for LoRA (small), in host memory for full."""
        if policy.mode == "lora":
            return {n: v.detach().clone() for n, v in policy.trainable_state().items()}
        return {n: v.to("cpu", copy=True) for n, v in policy.trainable_state().items()}

    def save_trainable(self, run_dir: Path, policy, optimizer, last_good: dict | None) -> dict | None:
        """Trainable weights, optimizer state and the rollback copy, for the resumable state.

        Returns what `RunState` stores in its file (None where the backend wrote its own files).
        """
        return {"trainable": {n: v.detach().cpu() for n, v in policy.trainable_state().items()},
                "optimizer": optimizer.state_dict(), "last_good": last_good}

    def load_trainable(self, run_dir: Path, saved: dict | None, policy, optimizer) -> dict | None:
        """Restore what `save_trainable` wrote; returns the rollback copy (or None)."""
        policy.load_trainable_state(saved["trainable"])
        optimizer.load_state_dict(saved["optimizer"])
        return saved["last_good"]

    def gather_for_saving(self, policy, path: str):
        """The trained student as an ordinary module on rank 0 (None on the others). Collective."""
        return policy.student

    def full_state(self, policy) -> dict[str, torch.Tensor] | None:
        """The student's whole state dict on rank 0 (None on the others), training untouched: a checkpoint along
        the way (`output.checkpoint_every`). Collective."""
        return policy.student.state_dict() if self.is_main else None


Single = Backend


class DDP(Backend):
    """Data parallel replicas: each rank holds the whole student; gradients are summed across ranks."""

    def sum(self, values: list[float] | torch.Tensor) -> list[float]:
        t = values.to(self.device, torch.float64) if isinstance(values, torch.Tensor) else \
            torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return t.tolist()

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        _all_sum_grads(params)

    def everywhere(self, fn: Callable[[], T], *, prefix: str = "") -> T:
        result, error = None, None
        try:
            result = fn()
        except TsopsdError as e:
            error = str(e)
        found: list[str | None] = [None] * self.world_size
        tdist.all_gather_object(found, error)
        errors = [f"rank {r}: {e}" for r, e in enumerate(found) if e]
        if errors:
            raise TsopsdError(prefix + "; ".join(errors))
        return result

    def broadcast(self, obj: T) -> T:
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        tdist.barrier()

    def finish(self) -> None:
        if tdist.is_initialized():
            tdist.barrier()
            tdist.destroy_process_group()

    def prepare(self, policy) -> None:
        with torch.no_grad():  # replicas start identical whatever their RNG did
            for p in policy.trainable:
                tdist.broadcast(p.data, src=0)


def _all_sum_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` across ranks, in one flat buffer (a missing grad counts as zero)."""
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    tdist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n


def _is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class FSDP(DDP):
    """FSDP2 shards of the decoder layers and trunk; the LM head replicated; every rank in lock-step."""

    lockstep = True
    _saves = 0  # sharded state folders written (sharded-1, sharded-2, ...)

    def loss_normalizer(self, global_tokens: int) -> float:
        return global_tokens / self.world_size  # FSDP averages the sharded gradients over ranks

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        replicated = [p for p in params if not _is_sharded(p)]  # the LM head: averaged by hand
        _all_sum_grads(replicated)
        for p in replicated:
            p.grad.div_(self.world_size)

    def _squared_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Shards add up across ranks; the replicated LM head's gradients count once."""
        sharded = super()._squared_norm([g.to_local() for g in grads if _is_sharded(g)])
        tdist.all_reduce(sharded)
        return sharded + super()._squared_norm([g for g in grads if not _is_sharded(g)])

    @property
    def done_everywhere(self) -> Callable[[bool], bool]:
        def done_everywhere(done: bool) -> bool:
            t = torch.tensor([0.0 if done else 1.0], device=self.device)
            tdist.all_reduce(t)
            return float(t) == 0.0
        return done_everywhere

    def prepare(self, policy) -> None:
        super().prepare(policy)
        _shard(policy.student, self.device, compute_dtype=policy.compute_dtype)
        if policy.mode == "full":
            _shard(policy.teacher.model, self.device)
        policy.trainable = [p for p in policy.student.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def generating(self, policy):
        """Gather the student's shards once for the whole rollout and free them after.

        Decoding runs a forward per token; with the shards resharded after each forward, every token
        would all-gather every layer's weights again. Unsharded for the rollout, each rank holds the
        whole student (in the compute dtype) while it samples, and no collective runs per token but
        the lock-step "all done?" check.
        """
        from torch.distributed.fsdp import FSDPModule

        modules = [m for m in policy.student.modules() if isinstance(m, FSDPModule)]
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield
        finally:
            for m in modules:
                m.reshard()
                m.set_reshard_after_forward(True, recurse=False)

    @torch.no_grad()
    def round_to(self, policy, dtype: torch.dtype) -> str:
        """Round the sharded student's weights to what a `dtype` checkpoint holds; says what the report sees."""
        if policy.mode == "lora":
            return "the sharded student before its adapter is merged (merging rounds the delta to the saved dtype)"
        for p in policy.student.parameters():
            p.copy_(p.to(dtype))
        return f"the sharded student with its weights rounded to {str(dtype).removeprefix('torch.')}, as written"

    def snapshot(self, policy) -> dict[str, torch.Tensor]:
        return {n: (v.detach().clone() if _is_sharded(v) else v.to("cpu", copy=True))
                for n, v in policy.trainable_state().items()}

    def save_trainable(self, run_dir: Path, policy, optimizer, last_good: dict | None) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(policy.student, optimizer)
        state = {"model": msd, "optim": osd, "last_good": last_good}
        # A new folder each time: the state file names it once every rank's part is complete, so a save cut
        # short leaves the previous one whole (`RunState.save` removes the others). Each rank writes its own
        # shards (safetensors + JSON, `saved.save_tree`): a resume needs the same ranks, and reads no pickle.
        self._saves += 1
        folder = run_dir / f"sharded-{self._saves}"
        folder.mkdir(parents=True, exist_ok=True)
        seal = save_tree(map_tensors(_local, state), folder, f"rank-{self.rank}")
        seals: list = [None] * self.world_size  # every rank's seal, in the state file: shards of this save only
        tdist.all_gather_object(seals, seal)
        return {"folder": folder.name, "has_last_good": last_good is not None, "seals": seals}

    def load_trainable(self, run_dir: Path, saved: dict | None, policy, optimizer) -> dict | None:
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if not isinstance(saved, dict) or not isinstance(saved.get("folder"), str) \
                or not saved["folder"].startswith("sharded-") or not saved["folder"][8:].isdigit() \
                or not isinstance(saved.get("seals"), list) or len(saved["seals"]) != self.world_size:
            raise TsopsdError(f"cannot resume: the state in {run_dir} names no sharded folder; rerun with --overwrite")
        msd, _ = get_state_dict(policy.student, optimizer)
        state = load_tree(run_dir / saved["folder"], f"rank-{self.rank}", expected=saved["seals"][self.rank])
        try:
            model = {k: _place(state["model"][k], like) for k, like in msd.items()}
            optim = state["optim"]
            for fqn, entry in optim["state"].items():  # moments are sharded as their parameter is
                like = msd.get(fqn)
                optim["state"][fqn] = {k: _place(v, like) if like is not None and isinstance(v, torch.Tensor)
                                       and v.dim() > 0 else v for k, v in entry.items()}
            last_good = None
            if saved.get("has_last_good"):
                template = self.snapshot(policy)
                last_good = {k: _place(state["last_good"][k], like) for k, like in template.items()}
            set_state_dict(policy.student, optimizer, model_state_dict=model, optim_state_dict=optim)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise TsopsdError(f"cannot resume: the shards in {run_dir / saved['folder']} do not fit this model "
                              f"({type(e).__name__}: {e}); rerun with --overwrite") from None
        self._saves = int(saved["folder"].rsplit("-", 1)[1])  # the next save goes to a new folder
        return last_good

    def gather_for_saving(self, policy, path: str):
        full = self.full_state(policy)
        return _rebuild(path, full, policy) if self.is_main else None

    def full_state(self, policy) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # gathered a tensor at a time into rank 0's host memory (the others get nothing)
        full = get_model_state_dict(policy.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if self.is_main else None


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (a DTensor's local shard; a plain tensor as it is)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _place(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A saved local part put back where `like` lives: a DTensor sharded as `like`, or a plain tensor on its device."""
    if not isinstance(local, torch.Tensor):
        raise TypeError(f"expected a tensor, found {type(local).__name__}")
    if hasattr(like, "to_local"):
        from torch.distributed.tensor import DTensor

        if local.shape != like.to_local().shape:
            raise ValueError(f"a saved shard of shape {tuple(local.shape)} where {tuple(like.to_local().shape)} belongs")
        return DTensor.from_local(local.to(like.device, like.dtype), like.device_mesh, like.placements,
                                  shape=like.shape, stride=like.stride())
    if local.shape != like.shape:
        raise ValueError(f"a saved tensor of shape {tuple(local.shape)} where {tuple(like.shape)} belongs")
    return local.to(like.device)


def _shard(model: torch.nn.Module, device: torch.device, *, compute_dtype: torch.dtype | None = None) -> None:
    """FSDP2 (`fully_shard`) on each decoder layer and on the trunk (embeddings, final norm).

    `compute_dtype`: float32 master shards gathered in this dtype for compute, gradients reduced in float32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from tsopsd.family import causal_lm

    if tied_embeddings(model):
        raise TsopsdError("--parallel fsdp does not support tied input/output embeddings yet: use --parallel ddp")
    layers = decoder_layers(model)
    trunk = causal_lm(model).base_model
    if layers is None:
        raise TsopsdError(f"--parallel fsdp: cannot find the decoder layers of {type(trunk).__name__}")
    mesh = init_device_mesh(device.type, (tdist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else \
        MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(trunk, mesh=mesh, mp_policy=mp)


def _rebuild(path: str, full: dict[str, torch.Tensor], policy):
    """An ordinary (unsharded, CPU) student with the gathered weights: what gets saved."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    if policy.mode == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, policy.student.peft_config["default"])
    missing, unexpected = model.load_state_dict(full, strict=False)
    if unexpected or [k for k in missing if "lora_" in k or policy.mode == "full"]:
        raise RuntimeError(f"gathered state does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()
