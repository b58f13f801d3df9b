"""`tsopsd plan`: will a reheat run fit its GPUs, and how long can a step take, without a GPU.

    tsopsd plan qwen3-4b/config.json --config configs/qwen3-4b-1gpu.yaml --gpus 1 --gpu-memory 80GB

How: the model is built from `config.json` alone (no weights) on *fake tensors* (PyTorch's
`FakeTensorMode`: every tensor has its shape, dtype and device but no memory), and the functions
`reheat` runs are called on them for one worst-case step, each completion `max_new_tokens` long:

    load       student, teacher (LoRA: the same module, adapter off; full: a frozen copy), prepare/shard
    rollout    `sample_rollouts` on one rollout batch: prefill, then decoding (KV cache at full length)
    check      step 0's `check_teacher` on the whole step's rollout
    train      `train_step` (teacher and student passes per micro-batch, the chunked loss, backward)
    update     gradient reduction, clipping, the rollback snapshot and the optimizer step (its state)
    report     `score_rollout` of the before/after report on one report batch, against the teacher
    save       what `finish` builds to write the output (merged and cast)

A dispatch mode below them counts the bytes of every live storage, by category (weights, optimizer
state, gradients, activations saved for backward, KV cache, logits chunks, temporaries) and keeps
each phase's peak; data-parallel and FSDP plans run under a fake process group of `--gpus` ranks
(rank 0's view; every rank holds the same amount). Decoding is run for a few steps and extrapolated
linearly to `max_new_tokens` from what each step added; micro-batches and rollout batches after the
first two are alike and are counted, not run (the report's scoring too: its other micro-batches add
only their hidden states). FLOPs (matmuls and attention, from
`torch.utils.flop_counter`) and bytes read and written (every op's inputs and outputs; an in-place
indexed write, the elements it writes) give a roofline
time: per op the larger of FLOPs / peak FLOP/s and bytes / bandwidth. That is a lower bound on a
step's time, not a measurement; kernels that fuse or overlap move it, launches and Python add to it.

Values that the code reads from tensors (`bool(...)`, `float(...)`) cannot come from fake tensors:
small integer and boolean tensors (ids, masks, positions) are computed for real alongside their fake
twins, so masks and counts are exact; anything read from model outputs is treated as the worst case
(no sequence ends early, every value finite).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.weak import WeakTensorKeyDictionary

from tsopsd.batch import Rollout
from tsopsd.config import Config
from tsopsd.errors import TsopsdError
from tsopsd.family import causal_lm, config_positions, is_fake
from tsopsd.prompts import fit_context

CATEGORIES = ("weights", "optimizer state", "gradients", "activations", "kv cache", "logits chunks", "temporaries")
PHASES = ("load", "rollout", "check", "train", "update", "report", "save")
# What a device needs besides tensors: the CUDA context, NCCL buffers, allocator slack. A plan fits
# when its peak plus this is at most the device's memory.
RESERVED_BYTES = 3 * 2**30
# The caching allocator holds more than it hands out: max_memory_reserved over max_memory_allocated of the
# calibration run (CALIBRATED_ON; docs/performance.md has its figures), without expandable segments, which
# tsopsd turns on (`PYTORCH_CUDA_ALLOC_CONF`). The plan keeps that ratio as its reserve on top of RESERVED_BYTES
# until a run of bench/gpu.sh measures it with them.
RESERVED_RATIO = 47.9 / 33.3
# A step's roofline over its measured time in the same run: `tsopsd plan` estimates a step as roofline / this.
STEP_EFFICIENCY = 39.4 / 131
CALIBRATED_ON = "one H200, torch 2.11, the shipped Qwen3-4B LoRA config, 2 steps (docs/performance.md)"
SHADOW_NUMEL = 1 << 22  # integer/bool tensors up to this size are also computed for real
SHADOW_FLOAT_NUMEL = 64  # ...and float ones this small (an optimizer's step count), from real inputs only
DECODE_PROBE = 3  # decoding steps run per rollout batch; the rest are extrapolated
SOLVE_EVALUATIONS = 3  # passes of the LM head a tracked step spends solving tau (2 or 3 from the last tau)
GiB = 2**30


def parse_bytes(text: str) -> int:
    """'80GB', '80GiB', '141 GB', '8e10' -> bytes (GB and GiB both mean 2**30: what tools report)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*", str(text))
    if not m:
        raise TsopsdError(f"--gpu-memory {text!r}: give a size such as 80GB, 141GiB or 8.5e10 (bytes)")
    if m.group(2) is None and float(m.group(1)) < 2**20:  # "80": surely not 80 bytes
        raise TsopsdError(f"--gpu-memory {text!r}: give a unit, such as {text.strip()}GB (a bare number is bytes)")
    unit = (m.group(2) or "b").lower().rstrip("b").rstrip("i")
    size = float(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[unit]
    if not size < 2**60:
        raise TsopsdError(f"--gpu-memory {text!r}: must be under 1 EiB")
    return int(size)


# ---- the fake model ------------------------------------------------------------------------------

def load_model_config(path: str | Path):
    """The transformers config of a checkpoint folder, a PEFT adapter folder (its base's) or a `config.json`
    file; one-line errors for configs tsopsd cannot plan (`checkpoint.check_model_config`)."""
    from tsopsd.checkpoint import adapter_base, read_model_config

    p = Path(path)
    if p.is_dir() and not (p / "config.json").is_file() and (p / "adapter_config.json").is_file():
        p = adapter_base(p, None)  # an adapter: its base model is what runs
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file() or file.name != "config.json":
        raise TsopsdError(f"{path}: no config.json there (give a checkpoint folder, an adapter folder or a config.json)")
    return read_model_config(file.parent)


def meta_model(model_config, dtype: torch.dtype) -> torch.nn.Module:
    """The causal LM of `model_config` on the meta device (no memory, no initialisation)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    return model.eval()


def _make_fake(module: torch.nn.Module, fake_mode) -> None:
    """Give a meta module fake tensors of the same shapes (parameters keep their identity)."""
    with fake_mode:
        module.to_empty(device="cpu")


class _Tokenizer:
    """What sampling reads of a tokenizer, from the model config (the plan has no tokenizer)."""

    def __init__(self, model_config):
        eos = getattr(model_config, "eos_token_id", None)
        self.eos_token_id = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
        pad = getattr(model_config, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else self.eos_token_id


# ---- counting bytes and FLOPs ----------------------------------------------------------------------

@dataclass
class PhaseRecord:
    peak: int = 0  # device bytes at the phase's peak
    breakdown: dict[str, int] = field(default_factory=dict)  # category -> bytes at that peak
    host_peak: int = 0  # host (CPU) bytes the phase holds at most, e.g. a rollback copy
    flops: float = 0.0
    bytes: float = 0.0
    roofline_s: float = 0.0
    extra: int = 0  # bytes counted, not run: decoding past the probed steps, the report's other hidden states
    collectives: dict[str, int] = field(default_factory=dict)  # all_gather, reduce_scatter, all_reduce calls
    most: dict[str, int] = field(default_factory=dict)  # category -> the most it held at any moment
    planning_s: float = 0.0  # what planning the phase took here


# The data-dependent ops the tracker answers itself, from computed shadows or the worst case, before any fake
# kernel runs: every other op tagged `data_dependent_output` would fail on fake tensors (tests check none runs).
ANSWERED = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
            torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default)


class Tracker(TorchDispatchMode):
    """Counts live storage bytes by category and FLOPs/bytes per op; answers data-dependent reads."""

    def __init__(self, *, vocab: int, kv_heads: int, head_dim: int, flops: float, bandwidth: float,
                 on_phase: Callable[[str], None] | None = None):
        super().__init__()
        self.on_phase = on_phase  # told each phase's name as it begins (the CLI's spinner)
        self.vocab, self.kv_heads, self.head_dim = vocab, kv_heads, head_dim
        self.peak_flops, self.bandwidth = flops, bandwidth
        self.shadow = WeakTensorKeyDictionary()  # fake int/bool tensor -> its real value
        self.sampled = WeakTensorKeyDictionary()  # tensors computed from sampled tokens -> True
        self.live: dict[int, list] = {}  # storage id -> [nbytes, category, host, weakref]
        self.totals: dict[tuple[bool, str], int] = defaultdict(int)  # (host, category) -> bytes
        self.device_bytes = self.host_bytes = 0
        self.phase: PhaseRecord | None = None
        self.records: dict[str, PhaseRecord] = {}
        self.on_host = False
        self.done_reads: list[int] = []  # device bytes at each "are we done decoding?" read
        self.stop_decoding_after: int | None = None
        from torch.utils.flop_counter import flop_registry

        self.flop_registry = flop_registry

    # phases ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def in_phase(self, name: str):
        record = self.records.setdefault(name, PhaseRecord())
        if self.on_phase is not None:
            self.on_phase(name)
        outer, self.phase = self.phase, record
        self._note_peak()
        started = time.perf_counter()
        try:
            yield record
        finally:
            self.phase = outer
            record.planning_s += time.perf_counter() - started

    @contextlib.contextmanager
    def host(self):
        """Allocations inside are host (CPU) memory: what the real run copies off the device."""
        outer, self.on_host = self.on_host, True
        try:
            yield
        finally:
            self.on_host = outer

    def _note_peak(self) -> None:
        r = self.phase
        if r is None:
            return
        if self.device_bytes > r.peak:
            r.peak = self.device_bytes
            r.breakdown = {c: self.totals[(False, c)] for c in CATEGORIES}
        for c in ("kv cache", "logits chunks", "activations"):
            r.most[c] = max(r.most.get(c, 0), self.totals[(False, c)])
        r.host_peak = max(r.host_peak, self.host_bytes)

    # storages ---------------------------------------------------------------------------------------
    def _category_at_birth(self, t: torch.Tensor) -> str:
        if t.dim() >= 1 and t.shape[-1] == self.vocab:
            return "logits chunks"
        if t.dim() == 4 and t.shape[1] == self.kv_heads and t.shape[3] == self.head_dim:
            return "kv cache"
        return "temporaries"

    def _track(self, t: torch.Tensor, category: str | None = None) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self.live:
            return
        n = st.nbytes()
        cat = category or self._category_at_birth(t)
        entry = [n, cat, self.on_host, None]
        entry[3] = weakref.ref(st, lambda _ref, key=key: self._free(key))
        self.live[key] = entry
        self._add(entry, +1)
        self._note_peak()

    def _add(self, entry: list, sign: int) -> None:
        n, cat, host, _ = entry
        self.totals[(host, cat)] += sign * n
        if host:
            self.host_bytes += sign * n
        else:
            self.device_bytes += sign * n

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self._add(entry, -1)

    def label(self, tensors, category: str, *, host: bool | None = None) -> None:
        """Relabel the storages of `tensors` (tracked or not) as `category` (and host or device)."""
        for t in tensors:
            if t is None or not isinstance(t, torch.Tensor):
                continue
            local = t.to_local() if hasattr(t, "to_local") else t
            st = local.untyped_storage()
            entry = self.live.get(id(st))
            if entry is None:
                self._track(local, category)
                entry = self.live.get(id(st))
            if entry is None:
                continue
            self._add(entry, -1)
            entry[1] = category
            if host is not None:
                entry[2] = host
            self._add(entry, +1)
        self._note_peak()

    @contextlib.contextmanager
    def resizes(self):
        """Count storage resizes too: FSDP2 frees a gathered weight by resizing its storage to 0 bytes."""
        original = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage, size):
            out = original(storage, size)
            entry = tracker.live.get(id(storage))
            if entry is not None:
                tracker._add(entry, -1)
                entry[0] = storage.nbytes()
                tracker._add(entry, +1)
                tracker._note_peak()
            return out

        torch.UntypedStorage.resize_ = resize_
        try:
            yield
        finally:
            torch.UntypedStorage.resize_ = original

    # dispatch ---------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.prim.device.default:  # `.device`: asked ~100k times a step; nothing to count
            fake_device = getattr(args[0], "fake_device", None)
            return fake_device if fake_device is not None else func(*args)
        kwargs = kwargs or {}
        if func in ANSWERED[:2]:
            value = self._scalar(args[0])
            return bool(value) if func is torch.ops.aten.is_nonzero.default else value
        if func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default):
            args = self._long_indices(func, args)
        elif func is torch.ops.aten.nonzero.default:
            return self._nonzero(args[0])
        elif func is torch.ops.aten.masked_select.default:
            idx = self._nonzero(args[1].expand_as(args[0]) if args[1].shape != args[0].shape else args[1])
            return args[0][tuple(idx.unbind(1))]
        out = func(*args, **kwargs)
        ins, outs = _tensors((args, kwargs)), _tensors(out)
        self._count(func, args, kwargs, out, ins, outs)
        for t in outs:
            if is_fake(t):
                self._track(t)
        self._shadow(func, args, kwargs, ins, outs)
        if func is torch.ops.aten.searchsorted.Tensor or any(a in self.sampled for a in ins):
            for t in outs:
                self.sampled[t] = True
        return out

    def _scalar(self, t: torch.Tensor):
        real = self.shadow.get(t)
        if real is not None:
            with _unfake():
                return real.item()
        if t.dtype == torch.bool and t in self.sampled:
            # "Is every row done?" (computed from sampled tokens) -> no: the worst case is the full
            # length, until the plan has probed enough decoding steps.
            r = self.phase
            self.done_reads.append((self.device_bytes, r.flops, r.bytes, r.roofline_s) if r else (self.device_bytes,) * 4)
            return self.stop_decoding_after is not None and len(self.done_reads) > self.stop_decoding_after
        if t.dtype == torch.bool:
            return True  # any other question about model outputs ("all finite?") gets the ordinary answer
        return 0 if not t.dtype.is_floating_point else 0.0

    def _real(self, t):
        if isinstance(t, torch.Tensor):
            if not is_fake(t):
                return t
            return self.shadow.get(t)
        return t

    def _nonzero(self, mask: torch.Tensor) -> torch.Tensor:
        real = self._real(mask)
        with _unfake():
            if real is None:  # a mask read from model outputs: assume every position is selected
                real = torch.ones(mask.shape, dtype=torch.bool)
            idx_real = real.nonzero()
        fake = torch.empty(idx_real.shape, dtype=torch.long, device=mask.device)  # below this mode: fake
        self.shadow[fake] = idx_real
        return fake

    def _long_indices(self, func, args):
        indices = list(args[1])
        for i, ix in enumerate(indices):
            if isinstance(ix, torch.Tensor) and ix.dtype == torch.bool:
                pos = self._nonzero(ix)
                parts = pos.unbind(1)
                indices[i:i + 1] = list(parts)
                with _unfake():
                    reals = self.shadow[pos].unbind(1)
                for p_, r in zip(parts, reals):
                    self.shadow[p_] = r
                break  # one boolean index per call is all our code uses
        return (args[0], indices, *args[2:])

    def _shadow(self, func, args, kwargs, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        """Compute small integer/bool results for real (masks, ids, positions), from real inputs."""
        if not outs or any(t.numel() > (SHADOW_NUMEL if not (t.dtype.is_floating_point or t.dtype.is_complex)
                                        else SHADOW_FLOAT_NUMEL) for t in outs):
            return
        if any(self._real(a) is None for a in ins):
            if func._schema.is_mutable:  # written from something unknown: the old value is gone
                for a, arg in zip(args, func._schema.arguments):
                    if isinstance(a, torch.Tensor) and arg.alias_info is not None and arg.alias_info.is_write:
                        self.shadow.pop(a, None)
            return
        real_args, real_kwargs = tree_map(self._real, (args, kwargs))
        real_kwargs = {k: (torch.device("cpu") if k == "device" else v) for k, v in real_kwargs.items()}
        with _unfake():
            try:
                real_out = func(*real_args, **real_kwargs)
            except Exception:  # noqa: BLE001 - no real value; the read falls back to the worst case
                return
        for f, r in zip(outs, _tensors(real_out)):
            self.shadow[f] = r

    def _count(self, func, args, kwargs, out, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        r = self.phase
        if r is None:
            return
        name = func.name().replace("_", "") if func.namespace in ("c10d", "_c10d_functional") else ""
        for kind in ("allgather", "reducescatter", "allreduce"):
            if kind in name:
                key = {"allgather": "all_gather", "reducescatter": "reduce_scatter", "allreduce": "all_reduce"}[kind]
                r.collectives[key] = r.collectives.get(key, 0) + 1
        flops = 0.0
        fn = self.flop_registry.get(func._overloadpacket)
        if fn is not None:
            try:
                flops = float(fn(*args, **kwargs, out_val=out))
            except Exception:  # noqa: BLE001 - a shape the counter does not handle: count no FLOPs
                flops = 0.0
        if not outs:
            return  # metadata (a device, a size): no data moves
        aliases = [ret.alias_info for ret in func._schema.returns if ret.alias_info is not None]
        if aliases and not any(a.is_write for a in aliases):
            return  # a view: no data moves
        moved = ins if aliases else ins + outs  # in place: the output is an input
        if func is torch.ops.aten.index_put_.default:  # writes only the indexed elements, not all of `self`
            moved = _tensors((args[1], args[2], args[2]))  # the indices, the values read, as many elements written
        nbytes = sum(t.numel() * t.element_size() for t in moved)
        r.flops += flops
        r.bytes += nbytes
        r.roofline_s += max(flops / self.peak_flops, nbytes / self.bandwidth)


def _tensors(tree, into: list | None = None) -> list[torch.Tensor]:
    """The tensors in an op's arguments or results (nested tuples, lists, dicts), in order: what
    `tree_flatten` finds there, at a fraction of its cost (it runs several times per op traced)."""
    into = [] if into is None else into
    if isinstance(tree, torch.Tensor):
        into.append(tree)
    elif isinstance(tree, (tuple, list)):
        for x in tree:
            _tensors(x, into)
    elif isinstance(tree, dict):
        for x in tree.values():
            _tensors(x, into)
    return into


@contextlib.contextmanager
def _unfake():
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        yield


# ---- the plan ----------------------------------------------------------------------------------------

@dataclass
class Hardware:
    gpus: int = 1
    memory: int = 80 * GiB  # bytes per device
    flops: float = 989e12  # peak dense bf16 FLOP/s per device (H100 SXM)
    bandwidth: float = 3.35e12  # memory bytes/s per device (H100 SXM)
    device: str = "cuda"  # "cpu": plan a run on the host (its dtype: float32 unless model.dtype says)
    figures: str = "H100 SXM"  # where flops and bandwidth come from (the table says)


def this_machine(device: torch.device, gpus: int = 1) -> Hardware:
    """The hardware a `reheat --dry-run` would run on: this GPU's memory (peak figures: an H100's, as no table
    of every GPU is kept), or on a CPU the host's memory and its matmul and copy rates measured just now."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return Hardware(gpus=gpus, memory=props.total_memory, figures=f"H100 SXM (this GPU: {props.name})")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    flops, bandwidth = _measure_cpu()
    return Hardware(gpus=gpus, memory=memory, flops=flops, bandwidth=bandwidth, device="cpu",
                    figures="this CPU, measured (float32 matmul, tensor copy)")


def _measure_cpu() -> tuple[float, float]:
    """FLOP/s of a float32 1024^3 matmul and bytes/s of a 64 MiB copy on this CPU (best of 3 each, ~0.1 s)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    src, dst = torch.empty(16 * 2**20), torch.empty(16 * 2**20)
    best_mm = best_copy = math.inf
    for _ in range(3):
        t = time.perf_counter()
        torch.mm(a, b)
        best_mm = min(best_mm, time.perf_counter() - t)
        t = time.perf_counter()
        dst.copy_(src)
        best_copy = min(best_copy, time.perf_counter() - t)
    return 2 * 1024**3 / best_mm, 2 * src.numel() * 4 / best_copy  # a copy reads and writes every byte


def _shape_facts(model_config) -> tuple[int, int, int]:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 1)
    kv = getattr(text, "num_key_value_heads", None) or heads
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", 0)
    head_dim = getattr(text, "head_dim", None) or hidden // max(heads, 1)
    return text.vocab_size, kv, head_dim


def _hidden_size(model_config) -> int:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return getattr(text, "hidden_size", None) or getattr(text, "n_embd", 0)


def worst_case_rollout(rows: int, prompt_tokens: int, new_tokens: int) -> Rollout:
    """`rows` sequences of a `prompt_tokens` prompt and a `new_tokens` completion: no row ends early."""
    T = prompt_tokens + new_tokens
    completion = torch.zeros((rows, T), dtype=torch.bool)
    completion[:, prompt_tokens:] = True
    return Rollout(input_ids=torch.zeros((rows, T), dtype=torch.long), attention_mask=torch.ones((rows, T), dtype=torch.long),
                   completion_mask=completion, prompt_lengths=torch.full((rows,), prompt_tokens, dtype=torch.long),
                   prompt_index=torch.arange(rows), sample_logprobs=torch.zeros((rows, T)), prompt_width=prompt_tokens)


@contextlib.contextmanager
def _fake_group(world_size: int, wanted: bool):
    """A fake process group of `world_size` ranks (this process is rank 0): collectives cost nothing."""
    import torch.distributed as tdist

    if not wanted or tdist.is_initialized():
        yield
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    tdist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        tdist.destroy_process_group()


def plan(cfg: Config, source: str | Path, hardware: Hardware = Hardware(), *, prompt_tokens: int | None = None,
         on_phase: Callable[[str], None] | None = None) -> dict:
    """Plan one worst-case reheat step of `cfg` for the model whose config is at `source`.

    Args:
        source: a checkpoint folder or a `config.json` (only the config is read).
        prompt_tokens: prompt length to plan for (default: `data.max_prompt_tokens`, else 512).
        on_phase: called with each phase's name as planning it begins (a 4B model takes ~a minute).

    Returns:
        A JSON-ready dict: per phase the device peak and its breakdown, host bytes, FLOPs, bytes and
        roofline seconds; the step's peak, whether it fits and what would make it fit.
    """
    model_config = load_model_config(source)
    choice = cfg.train.activation_checkpointing
    checkpointing = choice == "true"
    result = _plan_once(cfg, model_config, hardware, prompt_tokens, checkpointing=checkpointing, on_phase=on_phase)
    why = f"train.activation_checkpointing: {choice}"
    if choice == "auto" and not result["fits"] and result["peak_phase"] == "train":
        without = result["phases"]["train"]["peak_bytes"]
        # Only the train phase changes: plan it again with checkpointing and take the verdict anew.
        # (after a rollout: a compiled decode step keeps its cache and copies through the train phase)
        again = _plan_once(cfg, model_config, hardware, prompt_tokens, checkpointing=True,
                           phases=("rollout", "train"), on_phase=on_phase)
        result["phases"]["train"] = again["phases"]["train"]
        result.update(_verdict(result["phases"], hardware, heldout_s=result["heldout_roofline_s"]))
        checkpointing = True
        why = f"auto: on, since without it the train phase needs {without / GiB:.1f} GiB"
    elif choice == "auto":
        why = "auto: off, activations fit"
    result.update(source=str(source), activation_checkpointing=checkpointing, activation_checkpointing_why=why)
    result["advice"] = advice(cfg, result)
    return result


def activations_need_checkpointing(cfg: Config, model_config, *, free_bytes: int, later_bytes: int) -> bool:
    """`train.activation_checkpointing: auto` at the start of a run: would one micro-batch's activations
    (and its logits chunks), as the plan counts them, not fit in the device memory left once the
    gradients and optimizer state (`later_bytes`) are there? Planned on one device: activations do not
    depend on how weights are sharded."""
    single = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, parallel="ddp"))
    # after a rollout, as a step runs: a compiled decode step keeps its cache and weight copies between rollouts
    result = _plan_once(single, model_config, Hardware(gpus=1), None, checkpointing=False,
                        phases=("rollout", "train"))
    breakdown = result["phases"]["train"]["breakdown"]
    need = sum(breakdown.get(c, 0) for c in ("activations", "logits chunks", "temporaries", "kv cache"))
    return need > free_bytes - later_bytes - RESERVED_BYTES


def _plan_once(cfg: Config, model_config, hardware: Hardware, prompt_tokens: int | None, *, checkpointing: bool,
               phases: tuple[str, ...] = PHASES, on_phase: Callable[[str], None] | None = None) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tsopsd.checkpoint import resolve_dtype
    from tsopsd.decode import forget
    from tsopsd.metrics import score_rollout
    from tsopsd.output import written_model
    from tsopsd.parallel import Launch, make_backend
    from tsopsd.policy import enable_checkpointing, make_optimizer, prepare_policy
    from tsopsd.prompts import Prompt
    from tsopsd.rollout import sample_rollouts
    from tsopsd.step import teacher_states, train_step
    from tsopsd.teacher import check_teacher, solve_temperature

    dtype = resolve_dtype(cfg.model.dtype, torch.device(hardware.device)) if cfg.model.dtype != "auto" \
        else torch.bfloat16 if hardware.device == "cuda" else torch.float32
    save_dtype = getattr(model_config, "dtype", None) or dtype  # transformers 5: `torch_dtype` is its deprecated alias
    save_dtype = getattr(torch, save_dtype) if isinstance(save_dtype, str) else save_dtype
    vocab, kv_heads, head_dim = _shape_facts(model_config)
    P = prompt_tokens or cfg.data.max_prompt_tokens or 512
    # as the run fits them to the model's context (`prompts.fit_context`), taking P as the longest prompt
    L, room, _ = fit_context(config_positions(model_config), cfg.rollout.max_new_tokens, P)
    P, k = min(P, room) if room is not None else P, cfg.rollout.samples_per_prompt
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_new_tokens=L))
    rows = cfg.rollout.prompts_per_step * k  # per rank
    mb = cfg.train.micro_batch
    tau = cfg.teacher.temperature or 1.5
    # A target entropy (from a number or a checkpoint; any positive value plans the same) is tracked.
    tracking = None if cfg.teacher.temperature is not None else (cfg.teacher.target_entropy or 1.0)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = Tracker(vocab=vocab, kv_heads=kv_heads, head_dim=head_dim, flops=hardware.flops,
                      bandwidth=hardware.bandwidth, on_phase=on_phase)
    scale: dict[str, float] = {}
    group = hardware.gpus > 1 or cfg.train.parallel == "fsdp"
    # The policy is built on meta tensors (PEFT and a deep copy cannot convert fake ones), then made fake.
    model = meta_model(model_config, dtype)
    policy = prepare_policy(model, cfg.train)
    _make_fake(policy.student, fake_mode)
    if policy.teacher.model is not policy.student:
        _make_fake(policy.teacher.model, fake_mode)
    policy.trainable = [p for p in policy.student.parameters() if p.requires_grad]
    if checkpointing:
        enable_checkpointing(policy)
    with _fake_group(hardware.gpus, group), fake_mode, tracker, tracker.resizes():
        backend = make_backend(cfg.train.parallel, Launch(0, hardware.gpus, "cpu"), torch.device("cpu"))
        with tracker.in_phase("load"):
            _label_weights(tracker, policy)
            backend = backend.for_model(causal_lm(policy.teacher.model), cfg.train.parallel, mode=cfg.train.mode,
                                        adapter_input=False, device_memory=hardware.memory)
            backend.prepare(policy)
            _label_weights(tracker, policy)
            optimizer = make_optimizer(policy.trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        for p in policy.trainable:
            if hasattr(p, "register_post_accumulate_grad_hook"):
                p.register_post_accumulate_grad_hook(lambda q: tracker.label([q.grad], "gradients"))

        tok = _Tokenizer(model_config)
        batch = min(cfg.rollout.batch_size, rows)
        if "rollout" in phases:
            with tracker.in_phase("rollout") as record, backend.generating(policy), policy.compute():
                tracker.done_reads.clear()
                tracker.stop_decoding_after = DECODE_PROBE
                prompts = [Prompt(ids=[0] * P, text="") for _ in range(batch)]
                sample_rollouts(policy.student, tok, prompts, samples_per_prompt=1, max_new_tokens=L,
                                temperature=1.0, batch_size=batch, seed=0, done_everywhere=backend.done_everywhere,
                                engine=cfg.rollout.engine, continuous=False,  # worst case: all rows to L,
                                share_prompts=False,  # each row's own prefill (the rows' prompts are alike here)
                                check_every=1,  # the plan answers each "done?" and probes DECODE_PROBE steps
                                # a GPU run compiles unless told not to ("auto" is on there): its cache is
                                # sized for that (nothing is compiled on fake tensors)
                                compile="false" if cfg.rollout.compile == "false" else "true")
                tracker.stop_decoding_after = None
            # Steps after the probed ones are alike: each adds what the probed ones added on average (to
            # the memory that grows, e.g. a KV cache extended by concatenation, and to the cost).
            reads = tracker.done_reads
            probed, rest = len(reads), max(L - len(reads), 0)
            per_step = [(b - a) / (probed - 1) if probed > 1 else 0.0 for a, b in zip(reads[0], reads[-1])]
            record.extra = int(max(per_step[0], 0.0) * rest)
            record.flops += per_step[1] * rest
            record.bytes += per_step[2] * rest
            record.roofline_s += per_step[3] * rest
            scale["rollout"] = math.ceil(rows / batch)  # rollout batches are alike

        rollout = worst_case_rollout(rows, P, L)
        if "check" in phases:  # row by row: one row shows the memory; the cost is counted for all
            with tracker.in_phase("check"):
                check_teacher(policy.teacher, rollout.rows(0, 1), tau, dtype=dtype, chunk_size=cfg.loss.chunk_size)
            scale["check"] = rows
        n_mb = math.ceil(rows / mb)
        run_mb = min(2, n_mb)  # the second micro-batch is accumulating: the steady state
        with tracker.in_phase("train") as record, torch.autograd.graph.saved_tensors_hooks(
                lambda t: _saved(tracker, t), lambda t: t):
            n_tokens = rows * L * hardware.gpus
            part, hidden = rollout.rows(0, run_mb * mb), None
            if tracking:  # the teacher's hidden states of the whole step are kept while tau is solved on them
                hidden = teacher_states(policy, part, micro_batch=mb, skip_empty=not backend.lockstep,
                                        share_prompts=False)
                solve_temperature(policy.teacher, hidden, tracking, start=tau, chunk_size=cfg.loss.chunk_size,
                                  max_iter=SOLVE_EVALUATIONS)
                record.extra = (n_mb - run_mb) * mb * L * _hidden_size(model_config) * dtype.itemsize
            unshared = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, share_prompts=False))
            train_step(policy, part, tau=tau, cfg=unshared, skip_empty=not backend.lockstep,
                       normalizer=backend.loss_normalizer(n_tokens), teacher_hidden=hidden)
            del hidden
            tracker.label([p.grad for p in policy.trainable], "gradients")
        scale["train"] = n_mb / run_mb
        if "update" in phases:
            with tracker.in_phase("update"):
                backend.reduce_gradients(policy.trainable)
                if cfg.train.max_grad_norm > 0:
                    backend.clip_grad_norm(policy.trainable, cfg.train.max_grad_norm)
                if cfg.stop.rollback:
                    host = policy.mode == "full" and not backend.lockstep
                    with tracker.host() if host else contextlib.nullcontext():
                        snapshot = backend.snapshot(policy)
                    tracker.label(list(snapshot.values()), "weights", host=host)
                optimizer.step()
                tracker.label([v for st in optimizer.state.values() for v in st.values()
                               if isinstance(v, torch.Tensor)], "optimizer state")
                optimizer.zero_grad(set_to_none=True)
        forget(policy.student)  # as the loop does after its last step: the rollouts' kept decoder goes
        if "report" in phases and _held_out(cfg):
            # Scored in training micro-batches; two of them are run, the others add only their hidden
            # states (N x D for the model and the reference), which are counted.
            eval_rows = min(cfg.rollout.batch_size, _held_out(cfg) * cfg.output.eval_samples_per_prompt)
            run_rows = min(eval_rows, 2 * cfg.train.micro_batch)
            with tracker.in_phase("report") as record, backend.generating(policy), policy.compute():
                score_rollout(policy.student, worst_case_rollout(run_rows, P, L), reference=policy.teacher,
                              micro_batch=cfg.train.micro_batch, chunk_size=1024, intervals=False)
                record.extra = (eval_rows - run_rows) * L * 2 * _hidden_size(model_config) * dtype.itemsize
            scale["report"] = eval_rows / run_rows
        if "save" in phases:
            with tracker.in_phase("save"):
                if backend.lockstep:  # rounded in place, gathered onto rank 0's host memory and rebuilt there
                    backend.round_to(policy, save_dtype)
                elif policy.mode == "lora" and cfg.output.save == "merged":
                    # `written_model` merges into a copy of the model; PEFT's merge cannot run on fake
                    # tensors (it swaps tensors), so the copy it makes is allocated here as it would be.
                    copies = [torch.empty_like(p, dtype=save_dtype) for p in policy.student.parameters()
                              if not p.requires_grad]
                    del copies
                else:
                    written = written_model(policy.student, mode=policy.mode, save=cfg.output.save,
                                            save_dtype=save_dtype)
                    del written
    out = _summary(cfg, hardware, tracker, scale, model_config=model_config, dtype=dtype, P=P,
                   backend=type(backend).__name__, params=_count(policy))
    if backend.lockstep and "save" in phases:  # the gathered float32 state and the rebuilt model on rank 0
        out["phases"]["save"]["host_bytes"] = out["parameters"] * (4 + 4)
    return out


def _label_weights(tracker: Tracker, policy) -> None:
    params = list(policy.student.parameters()) + list(policy.student.buffers())
    teacher = policy.teacher.model
    if teacher is not policy.student:
        params += list(teacher.parameters()) + list(teacher.buffers())
    tracker.label(params, "weights")


def _saved(tracker: Tracker, t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, torch.Tensor) and is_fake(t):
        entry = tracker.live.get(id(t.untyped_storage()))
        if entry is None or entry[1] not in ("weights", "gradients"):
            tracker.label([t], "activations")
    return t


def _count(policy) -> dict[str, int]:
    def n(ps):
        return sum(p.numel() if not hasattr(p, "full_tensor") else math.prod(p.shape) for p in ps)
    return {"model": n(causal_lm(policy.teacher.model).parameters()) if policy.mode == "full" else
            n(p for p in policy.student.parameters() if not p.requires_grad),
            "trainable": n(policy.trainable)}


def _summary(cfg: Config, hw: Hardware, tracker: Tracker, scale: dict, *, model_config, dtype, P: int,
             backend: str, params: dict) -> dict:
    phases = {}
    for name in PHASES:
        r = tracker.records.get(name)
        if r is None:
            continue
        s = scale.get(name, 1.0)
        grown = "kv cache" if name == "rollout" else "temporaries"  # what the extrapolated steps add to
        phases[name] = {
            "peak_bytes": r.peak + r.extra, "breakdown": {**r.breakdown, grown: r.breakdown.get(grown, 0) + r.extra},
            "most": {**r.most, grown: r.most.get(grown, 0) + r.extra},
            "host_bytes": r.host_peak, "planning_s": r.planning_s, "collectives": dict(r.collectives),
            "flops": r.flops * s, "bytes": r.bytes * s,
            "roofline_s": r.roofline_s * s,
        }
    return {
        "architecture": getattr(model_config, "model_type", "?"),
        "parameters": params["model"], "trainable_parameters": params["trainable"], "dtype": str(dtype).removeprefix("torch."),
        "mode": cfg.train.mode, "backend": backend, "gpus": hw.gpus, "gpu_memory_bytes": hw.memory,
        "gpu_flops": hw.flops, "gpu_bandwidth": hw.bandwidth, "device": hw.device, "figures": hw.figures,
        "prompt_tokens": P, "max_new_tokens": cfg.rollout.max_new_tokens,
        "sequences_per_rank": cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt,
        "phases": phases, **_verdict(phases, hw, heldout_s=_heldout_s(cfg, phases, scale)),
    }


def _held_out(cfg: Config) -> int:
    """Held-out prompts, at most: `output.eval_prompts`, or the default's cap of 16 (min(16, 20%))."""
    return 16 if cfg.output.eval_prompts is None else cfg.output.eval_prompts


def _heldout_s(cfg: Config, phases: dict, scale: dict) -> float:
    """A steered target run's held-out sampling, per step on average: its rollout batches every
    `stop.heldout_every` steps, each costing a step's rollout batch (decoding reads the weights per token,
    whatever the rows)."""
    steered = cfg.teacher.temperature is None and cfg.stop.heldout_every > 0 and _held_out(cfg) > 0
    if not steered or "rollout" not in phases:
        return 0.0
    rows = _held_out(cfg) * cfg.stop.heldout_samples_per_prompt
    batches = math.ceil(rows / cfg.rollout.batch_size)
    return phases["rollout"]["roofline_s"] / scale.get("rollout", 1) * batches / cfg.stop.heldout_every


def _verdict(phases: dict, hw: Hardware, *, heldout_s: float = 0.0) -> dict:
    """The step's peak (which phase), whether it fits with the reserve, and its totals over a step (with a
    steered run's held-out sampling, `heldout_s` a step on average)."""
    peak_phase = max(phases, key=lambda p: phases[p]["peak_bytes"])
    peak = phases[peak_phase]["peak_bytes"]
    reserved = RESERVED_BYTES + int((RESERVED_RATIO - 1) * peak)  # CUDA context and buffers, allocator slack
    usable = hw.memory - reserved
    step_phases = ("rollout", "train", "update")  # what every step runs (check: step 0; report, save: once)
    roofline = sum(phases[p]["roofline_s"] for p in step_phases if p in phases) + heldout_s
    return {
        "peak_bytes": peak, "peak_phase": peak_phase, "reserved_bytes": reserved, "fits": peak <= usable,
        "margin_bytes": usable - peak,
        "step_flops": sum(phases[p]["flops"] for p in step_phases if p in phases),
        "step_bytes": sum(phases[p]["bytes"] for p in step_phases if p in phases),
        "step_roofline_s": roofline, "step_estimate_s": roofline / STEP_EFFICIENCY, "heldout_roofline_s": heldout_s,
        "estimate_calibrated_on": CALIBRATED_ON,
    }


def advice(cfg: Config, r: dict) -> list[str]:
    """What would make a plan that does not fit fit: the knobs of its peak phase, with values."""
    if r["fits"]:
        return []
    phase, over = r["peak_phase"], -r["margin_bytes"]
    b = r["phases"][phase]["breakdown"]
    tips = []
    state = b.get("weights", 0) + b.get("optimizer state", 0) + b.get("gradients", 0)
    if phase == "update":  # the optimizer's state as it is made, and its per-parameter working copies: sharded too
        state += b.get("temporaries", 0)
    if phase in ("rollout", "report"):
        batch = min(cfg.rollout.batch_size, r["sequences_per_rank"])
        per_row = (b.get("kv cache", 0) + b.get("temporaries", 0) + b.get("logits chunks", 0)) / max(batch, 1)
        fitting = int(batch - math.ceil(over / per_row)) if per_row else 0
        if fitting >= 1:
            tips.append(f"rollout.batch_size: {fitting} (each sequence sampled at once holds {per_row / GiB:.2f} GiB "
                        f"of KV cache and temporaries)")
    kept = b.get("kv cache", 0) if phase in ("check", "train", "update") else 0
    if kept and cfg.rollout.compile != "false":
        tips.append(f"rollout.compile: false (the compiled decode step keeps {kept / GiB:.1f} GiB of KV cache, and "
                    "its weight copies, between rollouts, where its CUDA graphs read them; eager decoding frees them)")
    if phase == "train":
        if not r["activation_checkpointing"]:
            tips.append("train.activation_checkpointing: true (recompute layers in backward instead of keeping "
                        f"{b.get('activations', 0) / GiB:.1f} GiB of activations)")
        act = b.get("activations", 0)
        if act:
            per_seq = act / min(cfg.train.micro_batch, r["sequences_per_rank"])
            fitting = int(cfg.train.micro_batch - math.ceil(over / per_seq))
            if fitting >= 1:
                tips.append(f"train.micro_batch: {fitting}")
    if phase in ("train", "check", "report") and b.get("logits chunks", 0) > over:
        tips.append(f"loss.chunk_size: {max(cfg.loss.chunk_size // 2, 64)} (logits chunks hold "
                    f"{b['logits chunks'] / GiB:.1f} GiB)")
    if state > over:
        usable = r["peak_bytes"] + r["margin_bytes"]  # what a device has for the step
        room = usable - (r["peak_bytes"] - state)  # ... for the part FSDP shards
        gpus = r["gpus"] * math.ceil(state / room) if room > 0 else None
        many = f"at least {gpus} GPUs (plan that many: FSDP's gathers add to it)" if gpus else "more GPUs"
        if cfg.train.mode == "full":
            tips.append(f"{many} with train.parallel: fsdp (weights, gradients and optimizer state, "
                        f"{state / GiB:.1f} GiB here, are sharded over them), or train.mode: lora")
        else:
            tips.append(f"{many} with train.parallel: fsdp (the frozen weights are sharded over them)")
    return tips or [f"the {phase} phase needs {over / GiB:.1f} GiB more than there is: a smaller model or a "
                    "larger device"]
