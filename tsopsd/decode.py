"""A lean decode step for Llama-family models (Llama, Mistral, Qwen2, Qwen3), used by the sampling loop.

    lean = LeanDecoder.build(model, batch_size=8, max_length=512)   # None: not supported, use model()
    session = lean.session(hf_cache_after_prefill, attention_mask, capacity)
    ended = session.step(rows, made, draw, lockstep=True)            # one whole step, on the device
    logits = session(tokens, positions, alive)                       # the forward alone (tests, benchmarks)

Why it exists: at small batch a decode step is a few dozen tiny matmuls, and transformers' generic
forward pays for its generality on each one (a growing `torch.cat` KV cache, masks rebuilt per step,
`F.linear` kernels that repack the weight on every call on CPU). This module runs the same maths with a
preallocated KV cache, one additive mask row, and weight copies made for decoding (`decode_weights.py`:
fused, LoRA merged in; packed for oneDNN on CPU).

A step (`_decode_step`) is the whole of what a rollout does per token, on the device: each row's token
drawn and recorded with its log-prob (`sampling.advance`), the rows' state moved on, the forward of the
new tokens. Nothing is read back inside it; the caller decides when to look (`rollout`: lock-step every
`DONE_CHECK_EVERY` steps, continuous batching one small tensor a step).

What stays the same: the prompt is still prefilled by the model's own forward (its KV cache is
adopted); weights are only read (copies are made, LoRA merged into them), so the model and the frozen
teacher are untouched; results equal the model's own logits to float rounding (tests compare them on
every supported architecture, with and without a LoRA adapter), and tokens equal the eager step's.

Compiled (`compile="true"`; "auto": on a GPU only): the same step under `torch.compile`, with CUDA
graphs on a GPU (`mode="reduce-overhead"`; attention over a multiple of `COMPILED_WIDTHS` columns,
masked, so that that many steps in a row have the same shapes). A graph reads its inputs at the
addresses it was recorded with, so where compiling is on one decoder is kept per model for the run
(`build` rewrites its copies in place each rollout, `forget` drops it) and its buffers (`buffer`: KV
cache, rows' state, what they made) only ever grow; batches shrink by moving live slots to the front
in place, to power-of-two sizes (`bucket`). The cost: what is kept stays allocated between rollouts
(`tsopsd plan` counts it through the train phase). The first compiled step of each session is checked
against the eager step on a copy of its state; a failure to compile or a disagreement turns
compilation off for the rest of the process, with a warning, and decoding goes on eagerly. On CPU it
hardly pays (`bench/decode.py`), so "auto" leaves it off there.

`build` returns None, and the caller falls back to calling the model, for anything it does not
recognise: other architectures, quantized, sharded (DTensor, FSDP1) or offloaded weights, LoRA variants
(DoRA...) or merged adapters, sliding windows shorter than the sequence, other activations. FSDP2
decodes here on the weights `parallel.FSDP.generating` gathers (eagerly: they move between rollouts).
"""

from __future__ import annotations

import logging
import os
import time
import weakref

import torch
import torch.nn.functional as F

from tsopsd import onednn
from tsopsd.decode_weights import DecodeLayer, DecodeLinear, DecodeNorm, Unsupported, agree, lora_parts, signature
from tsopsd.family import causal_lm, is_fake, plain_tensor, transform_logits
from tsopsd.sampling import Draw, Made, Rows, advance

log = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def _room_for(nbytes: int, device: torch.device) -> bool:
    """Whether a decode copy of `nbytes` fits in half the memory free now on `device` (unknown: only under 1 GiB)."""
    if device.type == "cuda":
        return nbytes < torch.cuda.mem_get_info(device)[0] // 2
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return nbytes < 2**30
    return nbytes < free // 2


COMPILED_WIDTHS = 256  # the compiled step attends over a multiple of this many columns
COMPILE: dict = {"setting": None, "on": False, "why": "no lean decode yet", "compile_s": 0.0}  # the run report's view
_compiled: dict = {}  # mode -> the compiled step, kept for the whole process (recompiled only on new shapes)
_broken: list[str] = []  # why compiling was turned off in this process, once it was


def _frames_compiled() -> int:
    """How many frames torch.compile has compiled in this process (a call that raised it compiled)."""
    from torch._dynamo.utils import counters

    return sum(counters["frames"].values())


def _compile_choice(setting: str, device: torch.device) -> tuple[bool, str]:
    if setting not in ("auto", "true", "false"):
        raise ValueError(f"compile must be 'auto', 'true' or 'false', got {setting!r}")
    COMPILE["setting"] = setting
    if setting == "false":
        return False, "rollout.compile: false"
    if _broken:  # it failed once in this process: not again
        return False, _broken[0]
    if setting == "true":
        return True, "rollout.compile: true"
    if device.type == "cuda":
        return True, "auto: CUDA graphs on a GPU"
    return False, f"auto: off on {device.type} (measured not to pay there: bench/decode.py)"


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its decoder, where kept for a run


class LeanDecoder:
    """A Llama-family model seen for decoding: dense (or, on CPU, packed) weight copies, norms, rotary, and
    the buffers a decode step reads and writes (KV cache, per-row state, the rows being made).

    Where the compiled step is on, one decoder is kept per model for the process (`build` refreshes its
    weight copies in place) and its buffers are only ever grown: a CUDA graph reads them at the addresses
    it was captured with, rollout after rollout. Otherwise a decoder and its buffers last one rollout.
    """

    def __init__(self, model: torch.nn.Module, *, batch_size: int, max_length: int, compile: str = "false"):
        lm = causal_lm(model)
        cfg = lm.config
        if getattr(cfg, "model_type", None) not in ARCHITECTURES:
            raise Unsupported(f"architecture {getattr(cfg, 'model_type', None)!r}")
        if getattr(cfg, "hidden_act", None) != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
            raise Unsupported("activation other than silu, or pretraining_tp")
        self.sharded = False  # FSDP2: decodes the weights the backend gathered for the rollout
        for m in model.modules():
            if hasattr(m, "_hf_hook") or type(m).__name__ == "FullyShardedDataParallel":
                raise Unsupported("offloaded model, or FSDP1's flat parameters")
            self.sharded = self.sharded or hasattr(m, "_get_fsdp_state")
        for p in model.parameters():  # FSDP2's are plain tensors only while gathered (`parallel.FSDP.generating`)
            if p.is_meta or not plain_tensor(p.data):  # DTensor shards, quantized tensor subclasses
                raise Unsupported("parameters that are not plain tensors")
        trunk = lm.model
        self.embed = trunk.embed_tokens
        if type(self.embed) is not torch.nn.Embedding:
            raise Unsupported("embedding layer is wrapped")
        self.rotary = trunk.rotary_emb
        head = lm.get_output_embeddings()
        head_base = lora_parts(head)[0]
        self.dtype = head_base.weight.dtype
        self.device = self.embed.weight.device
        self.fake = is_fake(head_base.weight)
        # the packed copy doubles the decoder's weights for the rollout: only where memory allows
        linears = [m for m in trunk.layers.modules() if type(m) is torch.nn.Linear] + [head_base]
        nbytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
        pack = self.device.type == "cpu" and not self.fake and not torch.is_autocast_enabled("cpu") \
            and onednn.available(self.dtype) and _room_for(nbytes, self.device)
        # Elsewhere (a GPU): q|k|v and gate|up as one dense weight each, LoRA merged into that copy, so a layer
        # runs four GEMMs and no LoRA pass; the plan (fake tensors) counts the copy. Without room: the
        # modules' own weights, LoRA added per module as peft does.
        fuse = not pack and (self.fake or _room_for(nbytes, self.device))
        self.config = cfg
        self.norm = DecodeNorm(trunk.norm)
        self.layers = [DecodeLayer(layer, pack=pack, batch_size=batch_size, fuse=fuse) for layer in trunk.layers]
        self.head = DecodeLinear([head], pack=pack, batch_size=batch_size, fuse=fuse)
        self.packed, self.fused = pack, fuse
        self.linears = [lin for layer in self.layers for lin in layer.linears()]
        self.linears.append(self.head)
        for i, lin in enumerate(self.linears):
            lin.index = i
        self.buffers: dict[str, torch.Tensor] = {}  # name -> the buffer behind each view a step uses (`buffer`)
        self.marked: set[int] = set()  # ids of the buffers marked static for CUDA graphs
        self.persistent = False
        self.inference = torch.is_inference_mode_enabled()  # its copies are inference tensors
        self._ready(batch_size=batch_size, max_length=max_length, compile=compile)

    def signature(self) -> tuple:
        return tuple(lin.signature() for lin in self.linears) + (self.embed.weight.data_ptr(),)

    def _ready(self, *, batch_size: int, max_length: int, compile: str) -> None:
        """What each rollout decides: the window check, the copies checked, compiling on or off."""
        for layer in self.layers:
            if layer.window is not None and layer.window < max_length:
                raise Unsupported(f"sliding window {layer.window} shorter than the sequence ({max_length})")
        if self.packed or (self.fused and not self.fake):
            self._check_packing()
        self.compiled = None  # the compiled step, or None: eager
        on, why = _compile_choice(compile, self.device)
        if on and self.sharded:  # gathered anew each rollout, at new addresses: graphs would be recorded anew
            on, why = False, "off for a sharded model (its gathered weights move between rollouts)"
        # A compiled step's KV cache holds a multiple of COMPILED_WIDTHS columns, so that its shapes repeat
        # from rollout to rollout whatever the prompts' lengths (few recompiles, few CUDA graphs). The plan
        # (fake tensors, nothing to compile) sizes its cache the same, and keeps the decoder as a run would.
        self.widths = COMPILED_WIDTHS if on else 1
        self.persistent = self.persistent or on  # once kept for the run, kept (a measurement between steps too)
        if on and self.fake:
            on, why = False, "not on fake tensors (the plan)"
        COMPILE["on"], COMPILE["why"] = on, why
        if on:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            if mode not in _compiled:
                _compiled[mode] = torch.compile(_decode_step, mode=mode)
            self.compiled = _compiled[mode]
            onednn.PACKED[:] = [(lin.packed, lin.bias) for lin in self.linears]  # this rollout's (one at a time)

    @classmethod
    def build(cls, model: torch.nn.Module, *, batch_size: int, max_length: int,
              compile: str = "false") -> LeanDecoder | None:
        """The lean decoder of `model`, or None (use the model's forward). `compile`: "auto", "true", "false".

        A decoder kept for `model` (the compiled step was on) is reused with its copies rewritten from
        the model's weights as they are now, unless the model's modules or adapters changed."""
        try:
            with torch.no_grad():
                kept = _DECODERS.get(model)
                if kept is not None and kept.signature() == cls._signature_of(model, kept):
                    # copies made under inference mode (a rollout's) are rewritten in it
                    with torch.inference_mode(kept.inference):
                        for layer in kept.layers:
                            layer.refresh(batch_size)
                        kept.head.refresh(batch_size)
                    kept._ready(batch_size=batch_size, max_length=max_length, compile=compile)
                    return kept
                _DECODERS.pop(model, None)
                dec = cls(model, batch_size=batch_size, max_length=max_length, compile=compile)
                if dec.persistent:
                    _DECODERS[model] = dec
                return dec
        except (Unsupported, AttributeError) as e:
            log.debug("lean decoding off, using the model's forward: %s", e)
            return None

    @staticmethod
    def _signature_of(model: torch.nn.Module, kept: LeanDecoder) -> tuple:
        """The signature a decoder built from `model` now would have (the same modules, weights and adapters)."""
        try:
            fresh = [signature([lora_parts(m) for m in mods]) for mods in _modules_of(model)]
        except Unsupported:
            return ()
        return tuple(fresh) + (causal_lm(model).model.embed_tokens.weight.data_ptr(),)

    def _check_packing(self) -> None:
        """Packed (or fused) and plain linears agree on a random input (else the copy is off the table here)."""
        lin = self.layers[0].qkv
        x = torch.randn(2, lin.parts[0][0].weight.shape[1], dtype=self.dtype, device=self.device)
        if not agree(lin(x), lin.plain(x), self.dtype):
            raise Unsupported("the packed or fused linear disagrees with F.linear")

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, fill=None) -> torch.Tensor:
        """A view of shape `shape` at the start of the buffer `name` (made, or made larger, when it does not
        hold `shape`): the same address for as long as the buffer holds what is asked of it. `fill`: the
        value the view is set to (None: as it was left)."""
        old = self.buffers.get(name)
        if old is not None and old.is_inference() and not torch.is_inference_mode_enabled():
            old = None  # made in a rollout (inference mode), asked for outside one: a tensor that can be written
        if old is None or old.dtype != dtype or old.dim() != len(shape) or any(a > b for a, b in zip(shape, old.shape)):
            size = shape if old is None or old.dtype != dtype or old.dim() != len(shape) else \
                tuple(max(a, b) for a, b in zip(shape, old.shape))
            # zeros, not empty: an unwritten cache column is masked, and 0 x garbage is NaN
            self.buffers[name] = old = torch.zeros(size, dtype=dtype, device=self.device)
            self.marked.discard(id(old))
        view = old[tuple(slice(0, n) for n in shape)]
        if fill is not None:
            view.fill_(fill)
        return view

    def release(self) -> None:
        """Drop the buffers unless the decoder is kept for the run (the compiled step reads them in place)."""
        if not self.persistent:
            self.buffers.clear()

    def mark_static(self, tensors) -> None:
        """CUDA graphs may read and write these buffers in place (once per buffer)."""
        if self.device.type != "cuda":
            return
        for t in tensors:
            base = t._base if t._base is not None else t
            if id(base) not in self.marked:
                torch._dynamo.mark_static_address(base)
                self.marked.add(id(base))
            torch._dynamo.mark_static_address(t)

    def session(self, cache, attention_mask: torch.Tensor, capacity: int) -> _Session:
        """Adopt the prefilled transformers cache (one entry per layer) of a whole batch for decoding."""
        session = _Session(self, attention_mask.shape[0], capacity)
        session.admit(list(range(attention_mask.shape[0])), cache, attention_mask)
        return session

    def slots(self, n: int, capacity: int) -> _Session:
        """An empty cache of `n` slots, `capacity` positions each, to be filled with `admit` (continuous batching)."""
        return _Session(self, n, capacity)


def forget(model: torch.nn.Module) -> None:
    """Drop the decoder kept for `model`, its weight copies and buffers (a run's rollouts are over)."""
    dec = _DECODERS.pop(model, None)
    if dec is not None:
        dec.buffers.clear()
        onednn.PACKED.clear()  # the compiled CPU step's packed weights, if they were this decoder's


def _modules_of(model: torch.nn.Module) -> list[list[torch.nn.Module]]:
    """The modules behind each of a decoder's linears, in `LeanDecoder.linears` order."""
    lm = causal_lm(model)
    out = []
    for layer in lm.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        out += [[attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj], [mlp.gate_proj, mlp.up_proj], [mlp.down_proj]]
    return out + [[lm.get_output_embeddings()]]


def bucket(n: int, most: int) -> int:
    """The batch size a step runs `n` live slots at: the next power of two, at most `most` (few shapes)."""
    return min(most, 1 << max(n - 1, 0).bit_length())


class _Session:
    """The KV cache of the sequences being decoded, one slot each, every slot at its own length.

    A slot's sequence starts at column 0 (a prefill's left padding included, masked) and grows by one
    column per step while it is alive. A slot can be (re)filled at any step from a prefill (`admit`),
    which is what continuous batching needs; `keep` moves the live slots to the front so the tail of a
    rollout does not pay for finished ones. The cache is a view of the decoder's buffers: it never moves.
    Each slot's length is kept twice: on the device (where the step writes) and on the host (the
    step's width is their max, known without reading the device).
    """

    def __init__(self, dec: LeanDecoder, slots: int, capacity: int):
        self.dec = dec
        self.capacity = max(-(-capacity // dec.widths) * dec.widths, 2)
        self.slots = slots
        self.keys, self.values = [], []  # made by the first `admit`, in the dtype of the model's cache
        self.bias = dec.buffer("bias", (slots, self.capacity), dec.dtype, fill=float("-inf"))
        self.length = dec.buffer("length", (slots,), torch.long, fill=0)
        self.lengths = [0] * slots  # the host's copy
        self.verified = False  # the compiled step agreed with the eager one in this session
        self.marked: tuple | None = None  # (keys, rows, made) whose tensors the compiled step has marked

    def admit(self, slots: list[int], cache, attention_mask: torch.Tensor) -> None:
        """Fill `slots` with the rows of a prefilled transformers cache ((len(slots), W) left-padded mask)."""
        W = attention_mask.shape[1]
        while W + 1 > self.capacity:
            self._grow()
        index = torch.tensor(slots, device=self.bias.device)
        for i in range(len(self.dec.layers)):
            k, v = cache.layers[i].keys, cache.layers[i].values  # (n, n_kv, W, head_dim), after RoPE
            if len(self.keys) == i:
                shape = (self.slots, k.shape[1], self.capacity, k.shape[3])
                self.keys.append(self.dec.buffer(f"keys.{i}", shape, k.dtype))
                self.values.append(self.dec.buffer(f"values.{i}", shape, v.dtype))
            self.keys[i][index, :, :W] = k
            self.values[i][index, :, :W] = v
            # Adopted: the prefill's copy goes now, layer by layer, so the peak is the cache plus one
            # layer's prefill, not plus all of it (the cache object is the caller's to drop).
            del k, v
            cache.layers[i].keys = cache.layers[i].values = None
        bias = torch.full((len(slots), self.capacity), float("-inf"), dtype=self.bias.dtype, device=self.bias.device)
        bias[:, :W].masked_fill_(attention_mask.bool(), 0.0)
        self.bias[index] = bias
        self.length[index] = W
        for s in slots:
            self.lengths[s] = W

    def keep(self, slots: list[int]) -> None:
        """Keep only `slots`, in that order, moved to the front of the cache in place (the others are done):
        later steps run on fewer rows, and the cache stays where it is."""
        index = torch.tensor(slots, device=self.bias.device)
        n = len(slots)
        for t in (*self.keys, *self.values, self.bias, self.length):
            t[:n] = t[index]
        self.keys = [k[:n] for k in self.keys]
        self.values = [v[:n] for v in self.values]
        self.bias, self.length = self.bias[:n], self.length[:n]
        self.lengths = [self.lengths[s] for s in slots]
        self.slots = n

    def _grow(self) -> None:
        """Twice the columns: new, larger buffers (the old contents copied); sessions are sized to avoid it."""
        new, dec = self.capacity * 2, self.dec
        grown = []
        for i, t in enumerate((*self.keys, *self.values)):
            name = f"keys.{i}" if i < len(self.keys) else f"values.{i - len(self.keys)}"
            old = t.clone()
            dec.buffers.pop(name, None)
            t = dec.buffer(name, (*t.shape[:2], new, t.shape[3]), t.dtype, fill=0)
            t[:, :, :self.capacity] = old
            grown.append(t)
        self.keys, self.values = grown[:len(self.keys)], grown[len(self.keys):]
        old = self.bias.clone()
        dec.buffers.pop("bias", None)
        self.bias = dec.buffer("bias", (self.slots, new), dec.dtype, fill=float("-inf"))
        self.bias[:, :self.capacity] = old
        self.capacity = new

    def columns(self) -> int:
        """Up to the longest slot's new column (the cache grown if it does not hold it)."""
        n = max(self.lengths) + 1
        while n > self.capacity:
            self._grow()
        return n

    def width(self) -> int:
        """The columns the next step attends over: `columns`, rounded up where the step is compiled."""
        n = self.columns()
        return n if self.dec.compiled is None else min(self.capacity, -(-n // self.dec.widths) * self.dec.widths)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, alive: torch.Tensor,
                 live: list[bool] | None = None) -> torch.Tensor:
        """The forward alone, eager: append `tokens` (B,) at `positions` (B,), one per slot; `alive` False
        masks the new column. `live`, `alive` on the host, is what moves the slots' lengths (None: every
        slot moves, as in lock-step). Returns (B, V) float32 logits."""
        n = self.columns()  # first: it may grow the cache the forward reads
        logits = _forward(self.dec, self.keys, self.values, self.bias, self.length, tokens, positions, alive, n)
        self.length.add_(1 if live is None else alive)
        self.moved(live)
        return logits

    @torch.no_grad()
    def step(self, rows: Rows, made: Made, draw: Draw, *, lockstep: bool) -> torch.Tensor:
        """One decode step in place on the device: each live row chooses its token from `rows.logits`, it is
        recorded in `made`, the rows' state moves on, and the model's forward of the chosen tokens leaves the
        next logits in `rows.logits`. Returns `ended` (B,): the rows that ended at this step (a device tensor;
        what to read back, and when, is the caller's). Lock-step: every slot's length moves (the host needs
        nothing back); otherwise a slot moves while it is alive, which the host learns from `ended`."""
        n = self.width()
        args = (self.dec, self.keys, self.values, self.bias, self.length, rows, made, draw, lockstep, n)
        if self.dec.compiled is None:
            ended = _decode_step(*args)
        else:
            ended = self._compiled(args)
        if lockstep:
            self.moved(None)
        return ended

    def moved(self, live: list[bool] | None) -> None:
        """The host's lengths after a step: +1 for the slots in `live` that are True (those alive that did not
        end, which the caller learnt from `ended`), for every slot where it is None (lock-step)."""
        self.lengths = [length + 1 for length in self.lengths] if live is None else \
            [length + a for length, a in zip(self.lengths, live)]

    def _compiled(self, args: tuple) -> torch.Tensor:
        """The compiled step; the first of a session checked against the eager step on the same inputs (the
        state copied, the same cache column written twice)."""
        dec = self.dec
        _, keys, values, bias, length, rows, made, draw, lockstep, n = args
        now = (keys, rows, made)  # new objects after a new session, `keep` or `_grow`: marked once each, not a step
        if self.marked is None or any(x is not y for x, y in zip(self.marked, now)):
            for t in (*keys, *values, bias, length, *rows.tensors(), *made.tensors()):
                # rows (the batch shrinks at a rollout's tail) and columns (the longest prompt of each rollout
                # sets the cache's) vary: dynamic from the first compile, so neither recompiles the step (a
                # recompile is tens of seconds on a GPU)
                torch._dynamo.maybe_mark_dynamic(t, 0)
                if t.dim() > 1 and t is not rows.logits:
                    torch._dynamo.maybe_mark_dynamic(t, 2 if t.dim() == 4 else 1)
            dec.mark_static([*keys, *values, bias, length, *rows.tensors(), *made.tensors()])
            self.marked = now
        if dec.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        state, eager = None, None
        if not self.verified:  # the state before the step, and the eager step on a copy of it
            state = [t.clone() for t in (length, *rows.tensors(), *made.tensors())]
            copy = [t.clone() for t in state]
            e_length, e_rows, e_made = copy[0], Rows(*copy[1:7]), Made(*copy[7:])
            e_ended = _decode_step(dec, keys, values, bias, e_length, e_rows, e_made, draw, lockstep, n)
            eager = (e_ended, e_rows, e_made, e_length)
        compiled_before = _frames_compiled()
        if compiled_before == 0:  # the process's first: a pause that says what it is
            log.info("compiling the decode step (torch.compile; once per run, new batch shapes aside)")
        t0 = time.perf_counter()
        try:
            ended = dec.compiled(*args).clone()  # CUDA graphs reuse their output buffer
        except Exception as e:  # noqa: BLE001 - any compiler failure: decode eagerly, as without compiling
            return self._off(f"compiling it failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                             eager, state, args)
        if _frames_compiled() != compiled_before:  # this call compiled (new shapes, a new model...)
            seconds = time.perf_counter() - t0
            COMPILE["compile_s"] += seconds
            log.info("decode step compiled in %.1f s (batch %d, %d columns)", seconds, self.slots, n)
        if eager is not None:
            e_ended, e_rows, e_made, e_length = eager
            same = torch.equal(ended, e_ended) and torch.equal(length, e_length) and \
                all(torch.equal(a, b) for a, b in zip((*rows.tensors(), *made.tensors()), (*e_rows.tensors(),
                                                                                          *e_made.tensors()))
                    if not a.is_floating_point()) and \
                agree(rows.logits, e_rows.logits, dec.dtype) and agree(made.logprobs, e_made.logprobs, torch.float32)
            if not same:
                return self._off("its tokens or logits disagreed with the eager step's", eager, state, args)
            self.verified = True
        return ended

    def _off(self, why: str, eager, state: list[torch.Tensor] | None, args: tuple) -> torch.Tensor:
        """Compiling off for the process; this step's result is the eager one (the state restored where it was
        copied; otherwise the failure was compiling, before the compiled step ran)."""
        log.warning("tsopsd: the compiled decode step is off for this run: %s; decoding eagerly", why)
        COMPILE.update(on=False, why=f"turned off: {why}")
        _broken[:] = [COMPILE["why"]]
        self.dec.compiled = None
        dec, keys, values, bias, length, rows, made, draw, lockstep, n = args
        if eager is not None:  # the eager step's state is this step's
            e_ended, e_rows, e_made, e_length = eager
            for dst, src in zip((length, *rows.tensors(), *made.tensors()),
                                (e_length, *e_rows.tensors(), *e_made.tensors())):
                dst.copy_(src)
            return e_ended
        for dst, src in zip((length, *rows.tensors(), *made.tensors()), state or ()):  # back to before the step
            dst.copy_(src)
        return _decode_step(dec, keys, values, bias, length, rows, made, draw, lockstep, n)


def _decode_step(dec: LeanDecoder, keys: list[torch.Tensor], values: list[torch.Tensor], bias: torch.Tensor,
                 length: torch.Tensor, rows: Rows, made: Made, draw: Draw, lockstep: bool, n: int) -> torch.Tensor:
    """One whole decode step, all on the device (one function: what `torch.compile` captures): choose and
    record each row's token (`sampling.advance`), then the forward of those tokens into `rows.logits`."""
    token, moving, ended = advance(rows, made, draw, lockstep=lockstep)
    rows.logits.copy_(_forward(dec, keys, values, bias, length, token, rows.position, moving, n))
    rows.position.add_(moving)
    length.add_(1 if lockstep else moving)
    return ended


def _forward(dec: LeanDecoder, keys: list[torch.Tensor], values: list[torch.Tensor], bias_all: torch.Tensor,
             lengths: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, alive: torch.Tensor,
             n: int) -> torch.Tensor:
    """One decode step's forward: write each slot's new column at `lengths` (B,), attend over the first `n`
    columns (eager: up to the longest slot's; compiled: rounded up, masked), return (B, V) float32 logits."""
    slots = torch.arange(tokens.shape[0], device=tokens.device)
    bias_all[slots, lengths] = torch.where(alive, 0.0, float("-inf")).to(bias_all.dtype)
    h = F.embedding(tokens, dec.embed.weight)  # (B, D)
    B = h.shape[0]
    cos, sin = dec.rotary(h[:, None], positions[:, None])  # (B, 1, head_dim)
    half = cos.shape[-1] // 2
    # rotate_half(x) * sin == roll(x, half) * [-sin_1, sin_2]: one op instead of four
    sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    g = dec.layers[0].n_q // dec.layers[0].n_kv
    bias = bias_all[:, None, None, :n].expand(B, dec.layers[0].n_kv, g, n).reshape(-1, g, n)
    for i, layer in enumerate(dec.layers):
        hd, n_q, n_kv = layer.head_dim, layer.n_q, layer.n_kv
        qkv = layer.qkv(layer.norm_in(h)).view(B, n_q + 2 * n_kv, hd)
        qk = qkv[:, :n_q + n_kv]
        if layer.qk_norm is not None:
            qk = layer.qk_norm(qk, layer.qk_weight)
        qk = torch.addcmul(qk * cos, qk.roll(half, -1), sin)  # RoPE on q and k together
        K, V = keys[i], values[i]
        K[slots, :, lengths], V[slots, :, lengths] = qk[:, n_q:], qkv[:, n_q + n_kv:]  # each slot at its own length
        K, V = K[:, :, :n].reshape(-1, n, hd), V[:, :, :n].reshape(-1, n, hd)  # (B * n_kv, n, hd)
        q = qk[:, :n_q].reshape(-1, g, hd)  # query heads grouped by the KV head they share
        probs = torch.baddbmm(bias, q, K.transpose(1, 2), alpha=layer.scaling).softmax(-1, dtype=torch.float32)
        h = h + layer.o(torch.bmm(probs.to(q.dtype), V).view(B, n_q * hd))
        gate, up = layer.gate_up(layer.norm_post(h)).split(layer.intermediate, dim=-1)
        h = h + layer.down(F.silu(gate) * up)
    return transform_logits(dec.config, dec.head(dec.norm(h)).float())
