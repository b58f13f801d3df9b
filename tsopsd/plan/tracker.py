"""The plan's dispatch mode: every live fake storage's bytes by category and phase, FLOPs and bytes moved (the
roofline), and the answers to what code reads from fake tensors (`Tracker`)."""

from __future__ import annotations

import contextlib
import time
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.weak import WeakTensorKeyDictionary

from tsopsd.family import is_fake

CATEGORIES = ("weights", "optimizer state", "gradients", "activations", "kv cache", "logits chunks", "temporaries")
PHASES = ("load", "rollout", "check", "train", "update", "report", "save")
SHADOW_NUMEL = 1 << 22  # integer/bool tensors up to this size are also computed for real
SHADOW_FLOAT_NUMEL = 64  # ...and float ones this small (an optimizer's step count), from real inputs only
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


