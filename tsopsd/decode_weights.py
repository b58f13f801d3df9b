"""The decoder's copies of a Llama-family model's layers, made for decoding and only read from the model.

    layer = DecodeLayer(model.model.layers[0], pack=False, batch_size=8, fuse=True)
    qkv = layer.qkv(x)       # q|k|v in one GEMM, LoRA merged in

On a GPU a copy is dense, q|k|v and gate|up one weight each, LoRA merged in, so a layer is four GEMMs
whether or not an adapter is on; on CPU it is packed for oneDNN (`onednn.py`). A copy is made only where
it fits in half the free memory (otherwise the modules' own weights are called, LoRA added per module as
peft does). `refresh` rewrites a kept copy in place (`copy_`, `addmm_`): the compiled step reads it at
the address it was captured with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tsopsd import onednn


class Unsupported(Exception):
    """The model cannot take the lean path (the reason is logged at debug level)."""


def agree(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    """`got` equals `want` to `dtype`'s rounding (relative to want's largest entry): packed and compiled steps."""
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    return bool(torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max())))


def signature(parts: list) -> tuple:
    """What a copy is made of: the modules, their weights' storage and their adapters (`lora_parts` of each)."""
    return tuple((id(base), base.weight.data_ptr(), tuple((id(a), id(b), s) for a, b, s in lora)) for base, lora in parts)


def lora_parts(module: torch.nn.Module) -> tuple[torch.nn.Linear, list[tuple[torch.nn.Linear, torch.nn.Linear, float]]]:
    """The plain base linear of `module` and its active, unmerged vanilla LoRA adapters (A, B, scaling)."""
    if type(module) is torch.nn.Linear:
        return module, []
    base = getattr(module, "base_layer", None)
    if base is None or type(base) is not torch.nn.Linear or not hasattr(module, "lora_A"):
        raise Unsupported(f"{type(module).__name__} is not a plain or LoRA linear layer")
    if getattr(module, "merged", False):
        raise Unsupported("merged LoRA adapter")
    if getattr(module, "disable_adapters", False):
        return base, []
    parts = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
            raise Unsupported("LoRA variant (DoRA, ...)")
        parts.append((module.lora_A[name], module.lora_B[name], float(module.scaling[name])))
    return base, parts


class DecodeLinear:
    """x -> x W^T + b (+ LoRA) for one or more modules whose outputs are concatenated (q|k|v, gate|up).

    Packed (CPU): one oneDNN weight for all of them, LoRA merged into that copy. Plain: `F.linear` on
    the modules' own weights, LoRA added as peft does (B(A(x)) * scaling), outputs concatenated.
    """

    def __init__(self, modules: list[torch.nn.Module], *, pack: bool, batch_size: int, fuse: bool = False):
        self.parts = [lora_parts(m) for m in modules]  # [(base, [(A, B, scaling)])]
        self.out_features = sum(base.weight.shape[0] for base, _ in self.parts)
        self.index = 0  # in LeanDecoder.linears (the compiled step's `onednn.PACKED`)
        self.packed = self.bias = self.weight = None
        self.pack, self.fuse = pack, fuse
        self.refresh(batch_size)

    def signature(self) -> tuple:
        return signature(self.parts)

    def refresh(self, batch_size: int) -> None:
        """(Re)make the copy from the modules' weights as they are now. A dense copy is written in place
        (its address never changes, as CUDA graphs need); a packed oneDNN copy is packed again."""
        self.is_packed, self.run = False, DecodeLinear.plain  # what a compiled step reads: never the packed tensor itself
        if not (self.pack or self.fuse):
            return
        if self.pack or self.weight is None:
            weights, biases = [], []
            for base, lora in self.parts:
                w = base.weight.detach()
                b = None if base.bias is None else base.bias.detach()
                if lora:  # merged into the copy only; the module's weights are not touched
                    w = w.clone()
                    for a, bm, scale in lora:
                        w.addmm_(bm.weight.detach().to(w.dtype), a.weight.detach().to(w.dtype), alpha=scale)
                        if bm.bias is not None:
                            b = (torch.zeros_like(w[:, 0]) if b is None else b) + scale * bm.bias.detach()
                weights.append(w)
                biases.append(b)
            w = torch.cat(weights) if len(weights) > 1 else weights[0].contiguous()
            if any(b is not None for b in biases):
                self.bias = torch.cat([torch.zeros_like(w_[:, 0]) if b is None else b for w_, b in zip(weights, biases)])
            if self.pack:
                self.packed = onednn.pack(w, batch_size)
            else:  # one dense weight (a copy where fused or LoRA-merged; else the module's own): one GEMM
                self.weight = w
        else:  # in place: the same addresses, rollout after rollout
            start = 0
            for base, lora in self.parts:
                rows = base.weight.shape[0]
                if self.owns_copy:
                    self.weight[start:start + rows].copy_(base.weight)
                if self.bias is not None:
                    self.bias[start:start + rows].zero_() if base.bias is None else \
                        self.bias[start:start + rows].copy_(base.bias)
                for a, bm, scale in lora:
                    self.weight[start:start + rows].addmm_(bm.weight.to(self.weight.dtype),
                                                           a.weight.to(self.weight.dtype), alpha=scale)
                    if bm.bias is not None:
                        self.bias[start:start + rows].add_(bm.bias, alpha=scale)
                start += rows
        self.is_packed = self.packed is not None
        self.run = DecodeLinear.packed_call if self.is_packed else DecodeLinear.dense

    @property
    def owns_copy(self) -> bool:
        """The dense weight is a copy (fused or LoRA-merged), not the module's own."""
        return self.weight is not None and (len(self.parts) > 1 or bool(self.parts[0][1]))

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for base, lora in self.parts:
            y = F.linear(x, base.weight, base.bias)
            for a, b, scale in lora:  # adapters may be float32 over a bf16 base: back to the base's dtype, as peft does
                y = y + (b(a(x.to(a.weight.dtype))) * scale).to(y.dtype)
            outs.append(y)
        return torch.cat(outs, -1) if len(outs) > 1 else outs[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # chosen once a copy is made (`refresh`): the GPU's call is `dense`, nothing else. A function, not a bound
        # method: an object that held its own bound method would be a cycle, its copies freed only by the GC
        return self.run(self, x)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def packed_call(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the packed weight is opaque to the compiler: looked up by index
            return torch.ops.tsopsd.packed_linear(x, self.index, self.out_features)
        return onednn.linear(x, self.packed, self.bias)


class DecodeNorm:
    """transformers' Llama/Qwen RMSNorm: weight * (x * rsqrt(mean(x^2) + eps)), computed in float32.

    In float32 one fused `F.rms_norm` does the same operations; other dtypes follow transformers' steps.
    """

    def __init__(self, module: torch.nn.Module):
        if not type(module).__name__.endswith("RMSNorm") or not hasattr(module, "variance_epsilon"):
            raise Unsupported(f"{type(module).__name__} is not an RMSNorm")
        self.weight, self.eps = module.weight.detach(), module.variance_epsilon
        self.fused = self.weight.dtype == torch.float32 and hasattr(F, "rms_norm")

    def __call__(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Normalize over the last dim; `weight` (broadcastable to x) replaces the module's own."""
        if self.fused:
            if weight is None:
                return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
            return F.rms_norm(x, (x.shape[-1],), None, self.eps) * weight
        w = self.weight if weight is None else weight
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * h.to(x.dtype)


class DecodeLayer:
    def __init__(self, layer: torch.nn.Module, *, pack: bool, batch_size: int, fuse: bool = False):
        attn, mlp = layer.self_attn, layer.mlp
        kw = dict(pack=pack, batch_size=batch_size, fuse=fuse)
        self.qkv = DecodeLinear([attn.q_proj, attn.k_proj, attn.v_proj], **kw)
        self.o = DecodeLinear([attn.o_proj], **kw)
        self.gate_up = DecodeLinear([mlp.gate_proj, mlp.up_proj], **kw)
        self.down = DecodeLinear([mlp.down_proj], **kw)
        self.norm_in, self.norm_post = DecodeNorm(layer.input_layernorm), DecodeNorm(layer.post_attention_layernorm)
        self.scaling = float(attn.scaling)
        self.head_dim = attn.head_dim
        (q_base, _), (k_base, _), _ = self.qkv.parts
        self.n_q, self.n_kv = q_base.weight.shape[0] // self.head_dim, k_base.weight.shape[0] // self.head_dim
        self.qk_norm = None  # Qwen3: per-head RMSNorm of q and k, applied to both at once
        if hasattr(attn, "q_norm"):
            q_norm, k_norm = DecodeNorm(attn.q_norm), DecodeNorm(attn.k_norm)
            if q_norm.eps != k_norm.eps:
                raise Unsupported("q and k norms with different eps")
            self.qk_norm, self.k_norm = q_norm, k_norm
            self.qk_weight = torch.cat([q_norm.weight.expand(self.n_q, -1), k_norm.weight.expand(self.n_kv, -1)])
        self.intermediate = self.gate_up.parts[0][0].weight.shape[0]
        # Qwen2/3 set it per layer (None on full-attention layers); Mistral reads it from the config
        self.window = attn.sliding_window if hasattr(attn, "sliding_window") else \
            getattr(attn.config, "sliding_window", None)

    def linears(self) -> tuple[DecodeLinear, ...]:
        return self.qkv, self.o, self.gate_up, self.down

    def refresh(self, batch_size: int) -> None:
        for lin in self.linears():
            lin.refresh(batch_size)
        if self.qk_norm is not None:  # a copy of the two norms' weights: rewritten in place
            self.qk_weight[:self.n_q].copy_(self.qk_norm.weight.expand(self.n_q, -1))
            self.qk_weight[self.n_q:].copy_(self.k_norm.weight.expand(self.n_kv, -1))
