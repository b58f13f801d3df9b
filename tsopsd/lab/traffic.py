"""What crosses between the host and the device while code runs, counted at the dispatcher (tests, benchmarks).

    with HostTraffic() as traffic:
        ...; traffic.mark("step"); ...
    for events in traffic.between("step"): ...      # the events after each "step" mark, up to the next

Counted: reads of device values into Python (`item()`, `bool()`, `tolist()`) and ops whose output is
sized by the data (`nonzero`, boolean indexing), each a host synchronisation on a GPU; tensors made
from host data (`torch.tensor([...])`: on a GPU, a copy from pageable memory); copies between devices,
with their bytes. On the CPU the first two still show where a GPU run would wait or copy, which is
what makes this testable without one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops whose result the host must wait for: a value read into Python, or an output sized by the data
_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
          torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default)
_FROM_HOST = (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default)


@dataclass
class Event:
    kind: str  # "mark", "read", "from host", "h2d", "d2h"
    what: str
    nbytes: int = 0


class HostTraffic(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.events: list[Event] = []
        self._tolist = None
        self._inside_tolist = False

    def mark(self, label: str) -> None:
        self.events.append(Event("mark", label))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        mode, real = self, torch.Tensor.tolist

        def tolist(t: torch.Tensor):
            mode.events.append(Event("read", "tolist", t.numel() * t.element_size()))
            mode._inside_tolist = True
            try:
                return real(t)
            finally:
                mode._inside_tolist = False

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._inside_tolist:
            return out
        if func in _READS:
            self.events.append(Event("read", str(func), args[0].element_size()))
        elif func in _FROM_HOST:
            self.events.append(Event("from host", str(func), out.numel() * out.element_size()))
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0] if func is torch.ops.aten.copy_.default else out
            if src.device.type != dst.device.type:
                kind = "d2h" if dst.device.type == "cpu" else "h2d"
                self.events.append(Event(kind, str(func), dst.numel() * dst.element_size()))
        return out

    def between(self, label: str) -> list[list[Event]]:
        """The events after each `label` mark up to the next one (other marks kept among them)."""
        out: list[list[Event]] = []
        for e in self.events:
            if e.kind == "mark" and e.what == label:
                out.append([])
            elif out:
                out[-1].append(e)
        return out
