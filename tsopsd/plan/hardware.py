"""The device a plan is for: its memory, FLOP/s and bandwidth, what it keeps back, and the calibration of a
step's estimate (`Hardware`, `this_machine`, `parse_bytes`)."""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass

import torch

from tsopsd.errors import TsopsdError

# What a device needs besides tensors: the CUDA context, NCCL buffers, allocator slack. A plan fits
# when its peak plus this is at most the device's memory.
GiB = 2**30
RESERVED_BYTES = 3 * GiB
# The caching allocator holds more than it hands out: max_memory_reserved over max_memory_allocated of the
# calibration run (CALIBRATED_ON; docs/performance.md has its figures), without expandable segments, which
# tsopsd turns on (`PYTORCH_CUDA_ALLOC_CONF`). The plan keeps that ratio as its reserve on top of RESERVED_BYTES
# until a run of bench/gpu.sh measures it with them.
RESERVED_RATIO = 47.9 / 33.3
# A step's roofline over its measured time in the same run: `tsopsd plan` estimates a step as roofline / this.
STEP_EFFICIENCY = 39.4 / 131
CALIBRATED_ON = "one H200, torch 2.11, the shipped Qwen3-4B LoRA config, 2 steps (docs/performance.md)"
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


