"""On-policy rollouts: sample k completions per prompt from the policy.

    rollout = sample_rollouts(model, tokenizer, prompts, samples_per_prompt=4, max_new_tokens=256, seed=0)

A plain sampling loop over a KV cache rather than `model.generate`: it keeps only the last
position's logits, (B, V), at each step (never B x T x V), records the log-prob of every sampled
token so scoring can be checked against sampling, and masks everything after EOS. The model's
forward prefills the prompts; each decode step after that is `decode.LeanDecoder` for Llama-family
models (the same logits, much less overhead) and the model's forward for anything else.

The batch it returns is a `batch.Rollout` (its docstring gives the row layout).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tsopsd.batch import Rollout, position_ids_from_mask
from tsopsd.decode import LeanDecoder
from tsopsd.family import eos_token_ids
from tsopsd.prompts import Prompt


def _sample_next(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                 generator: torch.Generator) -> torch.Tensor:
    """Sample (B,) tokens from (B, V) float32 logits. temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop = (cumulative - sorted_logits.softmax(-1)) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    # Inverse CDF: the first token whose cumulative probability exceeds u ~ U[0, total). One random number
    # per row and a float64 prefix sum: exact to float64 rounding and ~30x faster on CPU than drawing V
    # exponentials (Gumbel-max) or torch.multinomial at V = 152k.
    cdf = logits.softmax(-1).double().cumsum_(-1)
    total = cdf[:, -1:].contiguous()
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=logits.device) * total
    token = torch.searchsorted(cdf, u, right=True)
    # u * total can round up to total; the last token with nonzero probability is where cdf first reaches it.
    return torch.minimum(token, torch.searchsorted(cdf, total)).squeeze(-1)


def _sample_batch(model, prompt_ids: list[Sequence[int]], *, pad_id: int, eos_ids: list[int],
                  max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                  generator: torch.Generator, suppress_eos: bool, lean: LeanDecoder | None = None,
                  done_everywhere: Callable[[bool], bool] | None = None) -> tuple[torch.Tensor, ...]:
    """Sample one batch (the caller runs it under no_grad or inference mode)."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompt_ids)
    B = len(prompt_ids)
    ids = torch.full((B, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, width), dtype=torch.long, device=device)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        mask[i, width - len(p):] = 1
    positions = position_ids_from_mask(mask)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                use_cache=True, logits_to_keep=1)
    next_pos = positions[:, -1] + 1
    logits = out.logits[:, -1].float()  # (B, V)
    del out
    # The KV cache is sized for the whole completion at once: no regrowth (which briefly holds the old
    # and the new cache, 1.5x at the doubling), and the prefill's own cache is dropped once adopted.
    step = lean.session(cache, mask, capacity=width + max_new_tokens) if lean is not None else None
    if step is not None:
        del cache
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, logprobs, live = [], [], []
    for _ in range(max_new_tokens):
        if suppress_eos and len(eos_ids):
            logits[:, eos] = float("-inf")
        token = _sample_next(logits, temperature, top_p, top_k, generator)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        logprob = logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
        alive = ~finished
        tokens.append(token)
        logprobs.append(torch.where(alive, logprob, torch.zeros_like(logprob)))
        live.append(alive)
        finished = finished | torch.isin(token, eos)
        done = bool(finished.all())
        if done_everywhere is not None:  # decoding in lock-step with other processes (a sharded model)
            done = done_everywhere(done)
        if done:
            break
        if step is not None:
            logits = step(token, next_pos, alive)
        else:
            mask = torch.cat([mask, alive.long()[:, None]], dim=1)
            logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                           cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        next_pos = next_pos + 1
    del step
    completion = torch.stack(tokens, 1)
    completion_mask = torch.stack(live, 1)
    return ids, completion, completion_mask, torch.stack(logprobs, 1), width


def sample_rollouts(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    samples_per_prompt: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 16,
    seed: int = 0,
    suppress_eos: bool = False,
    row_offset: int = 0,
    done_everywhere: Callable[[bool], bool] | None = None,
    on_batch: Callable[[int], None] | None = None,
    engine: str = "auto",
) -> Rollout:
    """Sample `samples_per_prompt` completions for each prompt.

    Args:
        model: a causal LM (or PEFT model) in eval mode.
        tokenizer: its tokenizer (pad and eos ids are read from it).
        prompts: tokenized prompts.
        samples_per_prompt: completions per prompt (k).
        max_new_tokens: completion length cap.
        temperature: sampling temperature; 1.0 samples the policy itself, 0 is greedy.
        top_p: nucleus threshold (1.0: off).
        top_k: keep the k most likely tokens (0: off).
        batch_size: sequences sampled together.
        seed: seeds the sampling; same seed and inputs give the same rollout. Each batch draws from its
            own generator, seeded with (seed, index of its first row + `row_offset`), so a data-parallel
            rank that samples rows [row_offset, ...) of a global batch draws what one process would.
        suppress_eos: never sample EOS (fixed-length completions, for benchmarks).
        done_everywhere: ``done_everywhere(this batch is done) -> every process is done``, for processes
            that must run the same number of forwards (a sharded model): each keeps decoding until the
            last one finishes. None: a batch stops when its own rows are done.
        on_batch: called with the number of sequences after each batch (progress).
        engine: "auto" decodes Llama-family models with `decode.LeanDecoder` (same logits, less
            overhead, packed weights on CPU) and anything else with the model's forward; "model"
            always calls the model's forward.

    Returns:
        A `Rollout` with rows ordered prompt by prompt, k rows each.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    eos_ids = eos_token_ids(model, tokenizer)
    rows = [(i, p.ids) for i, p in enumerate(prompts) for _ in range(samples_per_prompt)]
    if engine not in ("auto", "model"):
        raise ValueError(f"engine must be 'auto' or 'model', got {engine!r}")
    lean = None
    if engine == "auto" and rows:
        lean = LeanDecoder.build(model, batch_size=min(batch_size, len(rows)),
                                 max_length=max(len(ids) for _, ids in rows) + max_new_tokens)
    parts = []
    # inference mode trims per-op overhead, which is much of a small decode step; the lean path only, as
    # the model's own forward may be sharded (FSDP) and its hooks expect ordinary no-grad tensors. The
    # batches are copied into ordinary tensors below, so the rollout can feed autograd.
    with torch.inference_mode() if lean is not None else torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            generator.manual_seed((seed * 1_000_003 + row_offset + start) % (2**63 - 1))
            parts.append((chunk, _sample_batch(
                model, [ids for _, ids in chunk], pad_id=tokenizer.pad_token_id, eos_ids=eos_ids,
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                generator=generator, suppress_eos=suppress_eos, lean=lean, done_everywhere=done_everywhere)))
            if on_batch:
                on_batch(len(chunk))
    # Merge batches: left-pad prompts to the widest, right-pad completions to the longest.
    P = max(p[1][4] for p in parts)
    L = max(p[1][1].shape[1] for p in parts)
    pad = tokenizer.pad_token_id
    B = len(rows)
    input_ids = torch.full((B, P + L), pad, dtype=torch.long, device=device)
    attention = torch.zeros((B, P + L), dtype=torch.long, device=device)
    completion_mask = torch.zeros((B, P + L), dtype=torch.bool, device=device)
    logprobs = torch.zeros((B, P + L), dtype=torch.float32, device=device)
    r = 0
    for chunk, (ids, comp, cmask, lp, width) in parts:
        n, length = comp.shape
        input_ids[r:r + n, P - width:P] = ids
        lengths = torch.tensor([len(p) for _, p in chunk], device=device)
        attention[r:r + n, P - width:P] = (torch.arange(width, device=device) >= width - lengths[:, None]).long()
        input_ids[r:r + n, P:P + length] = comp
        completion_mask[r:r + n, P:P + length] = cmask
        attention[r:r + n, P:P + length] = cmask.long()
        logprobs[r:r + n, P:P + length] = lp
        r += n
    return Rollout(
        input_ids=input_ids,
        attention_mask=attention,
        completion_mask=completion_mask,
        prompt_lengths=torch.tensor([len(ids) for _, ids in rows], device=device),
        prompt_index=torch.tensor([i for i, _ in rows], device=device),
        sample_logprobs=logprobs,
        prompt_width=P,
    )
