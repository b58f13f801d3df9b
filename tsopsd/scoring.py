"""Score sequences: final hidden states at completion positions, and the model's own logits from them.

    hidden = completion_hidden(model, rollout)          # (N, D), N = valid completion tokens
    logits = head_logits(model, hidden[:1024])         # (n, V) float32, one chunk at a time

Everything downstream (metrics, the teacher, the loss) works from hidden states at the N positions
that predict a completion token, and applies the LM head chunk by chunk. So no B x T x V tensor is
ever built: memory grows with chunk x V. `head_logits` reproduces the model's own output logits,
including final-logit soft-capping (Gemma 2/3) and logit scaling (Cohere, Granite), which must be
applied *before* a teacher temperature divides them.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from tsopsd.batch import Rollout, position_ids_from_mask, prediction_mask
from tsopsd.family import causal_lm, decoder_layers, grouped_kv_attention, recomputes_in_backward, transform_logits


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D) last-layer hidden states (after the final norm), positions from the mask."""
    trunk = causal_lm(model).base_model  # e.g. LlamaModel, GPT2Model; LoRA layers act in place
    out = trunk(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.last_hidden_state


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """(n, V) float32 output logits of `model` for (n, D) hidden states, as `model.forward` makes them."""
    lm = causal_lm(model)
    return transform_logits(lm.config, lm.get_output_embeddings()(hidden).float())


def shared_prompt_hidden(model, ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                         prompt_index: torch.Tensor) -> torch.Tensor:
    """`final_hidden` from the prompt's last column on (B, T - P + 1, D), with each prompt run once: rows
    that share a prompt (consecutive rows with the same `prompt_index`, the k samples of one prompt)
    take its keys and values from one pass over it.

    The prompts' pass fills a KV cache (with gradient, when the student's pass needs one); the cache is
    indexed out to every row and the completions run against it. So a micro-batch of n prompts x k
    samples costs n prompts plus n*k completions, not n*k prompts. Only the prompt's last column is
    returned of its part: the first position that predicts a completion token.
    """
    from transformers import DynamicCache

    lm = causal_lm(model)
    trunk, config = lm.base_model, lm.config
    P = prompt_width
    _, row_prompt, counts = torch.unique_consecutive(prompt_index, return_inverse=True, return_counts=True)
    firsts = (counts.cumsum(0) - counts).to(ids.device)
    row_prompt = row_prompt.to(ids.device)
    prompt_mask = attention_mask[firsts, :P]
    cache = DynamicCache(config=config)
    prompt_out = trunk(input_ids=ids[firsts, :P], attention_mask=prompt_mask,
                       position_ids=position_ids_from_mask(prompt_mask), cache=cache, use_cache=True)
    rows = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):  # every row's copy of its prompt's keys and values
        rows.update(layer.keys[row_prompt], layer.values[row_prompt], i)
    del cache
    out = trunk(input_ids=ids[:, P:], attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask)[:, P:], cache=rows, use_cache=True)
    return torch.cat([prompt_out.last_hidden_state[:, -1:][row_prompt], out.last_hidden_state], 1)


def can_share_prompts(model) -> bool:
    """Whether `shared_prompt_hidden` applies now. Not for a sharded (FSDP) model, whose ranks must run
    the same forwards while whether a micro-batch shares depends on its rows; not where the model
    recomputes its layers in backward (activation checkpointing drops the cache when gradients are on)."""
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in causal_lm(model).modules()):
        return False
    return not recomputes_in_backward(model)


def completion_hidden(model, rollout: Rollout, *, micro_batch: int | None = None,
                      layer_states: list[torch.Tensor] | None = None, share_prompts: bool = True) -> torch.Tensor:
    """(N, D) hidden states at the positions that predict each completion token.

    Args:
        micro_batch: rows per forward pass (None: all at once).
        layer_states: when a list is given, one (rows, L, D) float32 tensor per micro-batch is appended
            to it: every decoder layer's output at each row's final real position (see `final_positions`),
            taken during the same forward pass. Only those positions are kept, so this costs rows x L x D.
        share_prompts: run a prompt once for all its samples in a micro-batch (`shared_prompt_hidden`),
            where that applies (not with `layer_states`, nor under activation checkpointing with grad).
    """
    B = rollout.input_ids.shape[0]
    step = micro_batch or B
    share = share_prompts and layer_states is None and can_share_prompts(model)
    parts = []
    with grouped_kv_attention(model, rollout.input_ids):  # decided once for all micro-batches
        for s in range(0, B, step):
            part = rollout.rows(s, s + step).trimmed()  # only the columns these rows use
            ids, attention, index = part.input_ids, part.attention_mask, part.prompt_index
            mask = prediction_mask(part)
            if share and part.prompt_width > 0 and bool((index[1:] == index[:-1]).any()):  # a prompt with 2+ rows
                h = shared_prompt_hidden(model, ids, attention, part.prompt_width, index)
                mask = mask[:, part.prompt_width - 1:]  # nothing before the prompt's last column predicts a completion
            else:
                with _captured(model, final_positions(attention), layer_states):
                    h = final_hidden(model, ids, attention)
            parts.append(h[mask])
    return torch.cat(parts, 0)


def final_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) column of each row's last real token (its last completion token, EOS included when sampled)."""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.flip(-1).long().argmax(-1)


@contextlib.contextmanager
def _captured(model, columns: torch.Tensor, into: list[torch.Tensor] | None):
    """While active, record each decoder layer's output at `columns` (one per row) and append (B, L, D) to `into`."""
    if into is None:
        yield
        return
    layers = decoder_layers(model)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(causal_lm(model)).__name__}")
    rows = torch.arange(columns.shape[0])
    seen: list[torch.Tensor] = []

    def keep(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        seen.append(h[rows.to(h.device), columns.to(h.device)].detach().float().cpu())

    handles = [layer.register_forward_hook(keep) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    into.append(torch.stack(seen, 1))


class Scorer:
    """A model seen for scoring: hidden states at completion positions and its own logits.

    With `adapter_disabled`, a PEFT model is scored with its adapter switched off: the base model,
    with no second copy in memory (how the LoRA teacher and the "original" reference are seen).
    """

    def __init__(self, model, *, adapter_disabled: bool = False):
        self.model = model
        self.adapter_disabled = adapter_disabled

    def _context(self):
        if self.adapter_disabled:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def hidden(self, rollout: Rollout, *, micro_batch: int | None = None,
               layer_states: list[torch.Tensor] | None = None, share_prompts: bool = True) -> torch.Tensor:
        with self._context():
            return completion_hidden(self.model, rollout.to(self.device), micro_batch=micro_batch,
                                     layer_states=layer_states, share_prompts=share_prompts)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # Switching a PEFT adapter off walks every module (slow at a real model's depth), and the loss
        # asks for logits once per chunk: only when the head itself carries an adapter is it needed.
        with self._context() if self._head_adapted else contextlib.nullcontext():
            return head_logits(self.model, hidden)

    @functools.cached_property
    def _head_adapted(self) -> bool:
        head = causal_lm(self.model).get_output_embeddings()
        return self.adapter_disabled and hasattr(head, "lora_A")


def as_scorer(model_or_scorer) -> Scorer:
    return model_or_scorer if isinstance(model_or_scorer, Scorer) else Scorer(model_or_scorer)
