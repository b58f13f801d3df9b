"""Model-family helpers: what differs between architectures, in one leaf module.

    lm = causal_lm(peft_or_hf_model)           # the transformers causal LM under a PEFT wrapper
    logits = transform_logits(lm.config, lm.get_output_embeddings()(hidden).float())
    eos = eos_token_ids(model, tokenizer)      # every id that ends a completion
    with grouped_kv_attention(model, ids): model(...)  # on CPU: key/value heads not repeated per query head

transformers' causal LMs share a shape (a trunk, `base_model`, and an LM head) but differ in what the
forward does to the head's output (logit scaling, soft-capping) and in where the decoder layers live.
Nothing here imports the rest of tsopsd.
"""

from __future__ import annotations

import contextlib
import os

import torch


def causal_lm(model):
    """The transformers causal-LM module under an optional PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def transform_logits(cfg, logits: torch.Tensor) -> torch.Tensor:
    """What the model's forward does to the LM head's output: logit scaling and soft-capping.

    They come before any teacher temperature: the teacher is softmax(z0 / tau) of the model's own z0.
    """
    scale = getattr(cfg, "logit_scale", None)  # Cohere multiplies
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale != 1:
        logits = logits * scale
    scaling = getattr(cfg, "logits_scaling", None)  # Granite divides
    if isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and scaling != 1:
        logits = logits / scaling
    cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a completion: the generation config's and the tokenizer's."""
    ids = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return sorted(ids)


def decoder_layers(model) -> torch.nn.ModuleList | None:
    """The decoder layers of a causal LM (Llama-style `model.layers`, GPT-2-style `transformer.h`)."""
    trunk = causal_lm(model).base_model
    return getattr(trunk, "layers", None) or getattr(trunk, "h", None)


def final_norm(model) -> torch.nn.Module | None:
    """The norm applied to the last hidden state before the LM head (Llama-style `norm`, GPT-2's `ln_f`, Phi's
    `final_layernorm`), or None where the trunk names none of these."""
    trunk = causal_lm(model).base_model
    for name in ("norm", "ln_f", "final_layernorm", "norm_f", "final_layer_norm"):
        module = getattr(trunk, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def tied_embeddings(model) -> bool:
    """Whether the LM head shares its weight with the input embedding."""
    lm = causal_lm(model)
    head, emb = lm.get_output_embeddings(), lm.get_input_embeddings()
    return head is not None and emb is not None and head.weight is emb.weight


def max_positions(model) -> int | None:
    """How many positions the model was built for (prompt plus completion), or None when its config does not say."""
    return config_positions(causal_lm(model).config)


def config_positions(cfg) -> int | None:
    """`max_positions` from a transformers config."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def plain_tensor(t: torch.Tensor) -> bool:
    """An ordinary dense tensor: not a DTensor shard or a quantized subclass (a `tsopsd plan` fake counts)."""
    if type(t) is torch.Tensor:
        return True
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def is_fake(t: torch.Tensor) -> bool:
    """A fake tensor of `tsopsd plan`: shape and dtype, no memory."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def recomputes_in_backward(model) -> bool:
    """Whether a backward from here would run `model`'s layers again (activation checkpointing with
    gradients on): what such a forward does must not depend on anything that is gone by then."""
    if not torch.is_grad_enabled():
        return False
    return any(getattr(m, "gradient_checkpointing", False) and m.training for m in causal_lm(model).modules())


# transformers' switch for passing grouped key/value heads to SDPA (`enable_gqa`) whatever the mask.
_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextlib.contextmanager
def grouped_kv_attention(model, ids: torch.Tensor):
    """While active, transformers' SDPA attention takes a grouped-query model's key/value heads as they
    are (`enable_gqa`) instead of repeating them per query head, on CPU.

    transformers repeats them whenever an attention mask is given (ours always is: left padding), for
    CUDA's sake, whose fused kernels take no mask with grouped heads. The CPU kernel does, with the same
    results, and the repeat is pure waste there: a copy of K and V per layer, each copy's gradient summed
    back in backward. It does nothing on a GPU, on `tsopsd plan`'s fake tensors (which model a GPU run),
    where the user set the switch, and where backward would recompute the layers (activation
    checkpointing: the recomputation runs after this has ended, and must repeat what the forward did).
    """
    if ids.device.type != "cpu" or is_fake(ids) or _FORCE_GQA in os.environ or recomputes_in_backward(model):
        yield
        return
    os.environ[_FORCE_GQA] = "1"
    try:
        yield
    finally:
        os.environ.pop(_FORCE_GQA, None)
