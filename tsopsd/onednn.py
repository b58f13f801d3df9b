"""CPU only: decode weights packed once for oneDNN's linear (`torch.ops.mkldnn`), eager and inside a compiled graph.

    if available(dtype): packed = pack(weight, batch_size)     # once per rollout
    y = linear(x, packed, bias)                                # eager
    PACKED[:] = [(packed, bias), ...]; compiled_linear(x, i, n)  # under torch.compile (the packed weight is opaque)

At small batch oneDNN's packed linear is faster than `F.linear` on the same fp32 weights (`bench/decode.py`);
a GPU never comes here (`decode_weights.DecodeLinear` chooses its call when it makes its copy).
"""

from __future__ import annotations

import torch


def available(dtype: torch.dtype) -> bool:
    """Whether this torch has oneDNN's packed linear for `dtype` (float32; bfloat16 where the CPU supports it)."""
    ops = getattr(torch.ops, "mkldnn", None)
    if ops is None or not torch.backends.mkldnn.is_available():
        return False
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(getattr(ops, "_is_mkldnn_bf16_supported", lambda: False)())


def pack(weight: torch.Tensor, batch_size: int) -> torch.Tensor:
    """`weight` reordered for oneDNN's linear at about `batch_size` rows (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, batch_size)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


PACKED: list = []  # the running compiled step's packed (weight, bias) pairs, indexed by `DecodeLinear.index`


@torch.library.custom_op("tsopsd::packed_linear", mutates_args=())
def compiled_linear(x: torch.Tensor, index: int, out_features: int) -> torch.Tensor:
    """A packed oneDNN linear inside a compiled graph: the packed weight (an opaque oneDNN tensor, which
    torch.compile cannot trace) is looked up by index instead of being an input of the graph."""
    weight, bias = PACKED[index]
    return linear(x, weight, bias)


@compiled_linear.register_fake
def _(x: torch.Tensor, index: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)
