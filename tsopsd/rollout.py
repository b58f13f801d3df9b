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
from tsopsd.family import eos_token_ids, grouped_kv_attention
from tsopsd.prompts import Prompt

MASK64 = (1 << 64) - 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors (wrapping arithmetic; logical shifts by masking)."""
    def shr(v, k):
        return (v >> k) & ((1 << (64 - k)) - 1)

    x = (x ^ shr(x, 30)) * -4658895280553007687  # 0xBF58476D1CE4E5B9 as a signed int64
    x = (x ^ shr(x, 27)) * -7723592293110705685  # 0x94D049BB133111EB
    return x ^ shr(x, 31)


def uniforms(seed: int, rows: torch.Tensor, steps: torch.Tensor | int) -> torch.Tensor:
    """(B, 1) float64 uniforms in [0, 1), one per (seed, row, step): a counter-based draw.

    What a row samples depends only on the seed, its global row index and how many tokens it has,
    never on the batch, slot or rank it is decoded in: continuous batching, any batch size and any
    number of data-parallel ranks draw the same completions.
    """
    key = seed & MASK64  # splitmix64 of the seed, in Python ints: no device work, no read-back
    key = ((key ^ (key >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    key = ((key ^ (key >> 27)) * 0x94D049BB133111EB) & MASK64
    key ^= key >> 31
    key = key - (1 << 64) if key >= 1 << 63 else key
    x = _mix(rows.long() * -7046029254386353131 + key)  # 0x9E3779B97F4A7C15: the golden-ratio step
    x = _mix(x + torch.as_tensor(steps, device=rows.device).long() * -7046029254386353131)
    return (((x >> 11) & ((1 << 53) - 1)).double() / float(1 << 53))[:, None]


def _sample_next(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, u: torch.Tensor) -> torch.Tensor:
    """Sample (B,) tokens from (B, V) float32 logits with one uniform per row, `u` (B, 1). temperature 0 is greedy."""
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
    # Inverse CDF: the first token whose cumulative probability exceeds u * total. One uniform per row
    # and a float64 prefix sum: exact to float64 rounding and ~30x faster on CPU than drawing V
    # exponentials (Gumbel-max) or torch.multinomial at V = 152k.
    cdf = logits.softmax(-1).double().cumsum_(-1)
    total = cdf[:, -1:].contiguous()
    token = torch.searchsorted(cdf, u.to(cdf.device) * total, right=True)
    # u * total can round up to total; the last token with nonzero probability is where cdf first reaches it.
    return torch.minimum(token, torch.searchsorted(cdf, total)).squeeze(-1)


def _prefill(model, prompt_ids: list[Sequence[int]], pad_id: int, device, share: bool = True):
    """Left-pad `prompt_ids` and run them through the model: (ids, mask, next positions, last logits, cache).

    A prompt that appears in several rows (the k samples of one prompt) runs once; its keys, values
    and logits are copied to each of its rows.
    """
    unique = list(dict.fromkeys(tuple(p) for p in prompt_ids)) if share else prompt_ids
    if len(unique) < len(prompt_ids):
        where = {p: i for i, p in enumerate(unique)}
        index = torch.tensor([where[tuple(p)] for p in prompt_ids], device=device)
        ids, mask, next_pos, logits, cache = _prefill(model, unique, pad_id, device)
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        return ids[index], mask[index], next_pos[index], logits[index], cache
    from transformers import DynamicCache

    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long, device=device)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        mask[i, width - len(p):] = 1
    positions = position_ids_from_mask(mask)
    cache = DynamicCache()
    with grouped_kv_attention(model, ids):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                    use_cache=True, logits_to_keep=1)
    return ids, mask, positions[:, -1] + 1, out.logits[:, -1].float(), cache


def _sample_batch(model, prompt_ids: list[Sequence[int]], rows: torch.Tensor, *, seed: int, pad_id: int,
                  eos_ids: list[int], max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                  suppress_eos: bool, share_prompts: bool, lean: LeanDecoder | None = None,
                  done_everywhere: Callable[[bool], bool] | None = None) -> tuple[torch.Tensor, ...]:
    """Sample one batch in lock-step, every row until the last one ends (the model's forward, or a sharded
    model). `rows` (B,) are the rows' global indices (their random draws). Run under no_grad. Returns
    the completions (B, L), their mask and log-probs; nothing is read back but "is every row done?"."""
    device = next(model.parameters()).device
    ids, mask, next_pos, logits, cache = _prefill(model, prompt_ids, pad_id, device, share_prompts)
    B, width = ids.shape
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    # The KV cache is sized for the whole completion at once: no regrowth (which briefly holds the old
    # and the new cache, 1.5x at the doubling), and the prefill's own cache is dropped once adopted.
    step = lean.session(cache, mask, capacity=width + max_new_tokens) if lean is not None else None
    if step is not None:
        del cache
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, logprobs, live = [], [], []
    for j in range(max_new_tokens):
        if suppress_eos and len(eos_ids):
            logits[:, eos] = float("-inf")
        token = _sample_next(logits, temperature, top_p, top_k, uniforms(seed, rows, j))
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
    return torch.stack(tokens, 1), torch.stack(live, 1), torch.stack(logprobs, 1)


def _sample_continuous(model, lean: LeanDecoder, prompt_ids: list[Sequence[int]], rows: list[int], *, slots: int,
                       seed: int, pad_id: int, eos_ids: list[int], max_new_tokens: int, temperature: float,
                       top_p: float, top_k: int, suppress_eos: bool, share_prompts: bool,
                       on_done: Callable[[int], None] | None = None) -> tuple[torch.Tensor, ...]:
    """Continuous batching: `slots` sequences decode together; a finished row's slot is refilled with the
    next pending row (prefilled into that slot), so no step is spent on a row that has ended. Once no
    rows are pending, finished slots are dropped when they are half the batch. Returns the completions
    (rows, L), their mask (EOS included) and the log-probs of their tokens, padded to the longest."""
    device = lean.device
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    eos_set = set(eos_ids)
    capacity = max(len(p) for p in prompt_ids) + max_new_tokens + 1
    pending = list(range(len(prompt_ids)))[::-1]  # popped from the end: row order
    first = [pending.pop() for _ in range(min(slots, len(pending)))]
    _, mask, next_pos, logits, cache = _prefill(model, [prompt_ids[r] for r in first], pad_id, device, share_prompts)
    cache_rows = lean.slots(len(first), capacity)
    cache_rows.admit(list(range(len(first))), cache, mask)
    del cache
    slot_row = list(first)  # the row each slot decodes; None once it ended
    done: list[list | None] = [None] * len(prompt_ids)
    made: list[list] = [[] for _ in prompt_ids]  # per row: (token, logprob) tensors of its steps
    global_rows = torch.tensor(rows, device=device)
    while True:
        active = torch.tensor([r is not None for r in slot_row], device=device)
        row_index = torch.tensor([0 if r is None else r for r in slot_row], device=device)
        counts = torch.tensor([0 if r is None else len(made[r]) for r in slot_row], device=device)
        if suppress_eos and len(eos_ids):
            logits[:, eos] = float("-inf")
        token = _sample_next(logits, temperature, top_p, top_k, uniforms(seed, global_rows[row_index], counts))
        logprob = logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
        token = torch.where(active, token, torch.full_like(token, pad_id))
        freed = []
        for s, (t, r) in enumerate(zip(token.tolist(), slot_row)):
            if r is None:
                continue
            made[r].append((token[s], logprob[s]))
            if t in eos_set or len(made[r]) == max_new_tokens:
                done[r] = made[r]
                slot_row[s] = None
                freed.append(s)
                if on_done:
                    on_done(1)
        live = [r is not None for r in slot_row]
        if not any(live) and not pending:
            break
        if any(live):
            moving = torch.tensor(live, device=device)
            logits = cache_rows(token, next_pos, moving, live)
            next_pos = next_pos + moving
        refill = [(s, pending.pop()) for s in freed[:len(pending)]]
        if refill:
            _, mask, pos, fresh, cache = _prefill(model, [prompt_ids[r] for _, r in refill], pad_id, device,
                                                  share_prompts)
            cache_rows.admit([s for s, _ in refill], cache, mask)
            del cache
            at = torch.tensor([s for s, _ in refill], device=device)
            logits[at], next_pos[at] = fresh, pos
            for s, r in refill:
                slot_row[s] = r
        ended = [s for s, r in enumerate(slot_row) if r is None]
        if not pending and len(ended) * 2 >= len(slot_row) and len(ended) < len(slot_row):
            keep = [s for s, r in enumerate(slot_row) if r is not None]
            cache_rows.keep(keep)
            at = torch.tensor(keep, device=device)
            logits, next_pos = logits[at], next_pos[at]
            slot_row = [slot_row[s] for s in keep]
    # padded like a lock-step batch: (rows, longest) tokens, mask and log-probs
    L = max(len(m) for m in done)
    tokens = torch.full((len(done), L), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(done), L), dtype=torch.bool, device=device)
    logprobs = torch.zeros((len(done), L), dtype=torch.float32, device=device)
    for r, m in enumerate(done):
        tokens[r, :len(m)] = torch.stack([t for t, _ in m])
        logprobs[r, :len(m)] = torch.stack([lp for _, lp in m])
        mask[r, :len(m)] = True
    return tokens, mask, logprobs


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
    continuous: bool = True,
    share_prompts: bool = True,
    compile: str = "false",
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
        batch_size: sequences decoded together (the slots of continuous batching).
        seed: seeds the sampling; same seed and inputs give the same rollout. Row r's t-th token uses
            the uniform `uniforms(seed, row_offset + r, t)`, so what a row draws does not depend on the
            batch size, on continuous batching or on the rank: a data-parallel rank that samples rows
            [row_offset, ...) of a global batch draws what one process would.
        suppress_eos: never sample EOS (fixed-length completions, for benchmarks).
        done_everywhere: ``done_everywhere(this batch is done) -> every process is done``, for processes
            that must run the same number of forwards (a sharded model): each keeps decoding until the
            last one finishes. None: a batch stops when its own rows are done.
        on_batch: called with a number of sequences as they finish (progress).
        engine: "auto" decodes Llama-family models with `decode.LeanDecoder` (same logits, less
            overhead, packed weights on CPU) and anything else with the model's forward; "model"
            always calls the model's forward.
        continuous: with the lean decoder and no lock-step (`done_everywhere` None), refill a finished
            row's slot with the next pending row (continuous batching); False: static batches, every row
            decoded until its batch's longest ends (the plan's worst case, same samples).
        share_prompts: prefill a prompt once for all its rows in a batch and copy its keys and values
            (False: every row runs its prompt, the plan's worst case; same samples).
        compile: the lean decode step under torch.compile: "true", "false", or "auto" (on a GPU only);
            see `decode`. Same samples to float rounding: the first compiled step is checked. Off by
            default: compiling pays only over a long run's many rollouts (`reheat` passes
            `rollout.compile`), not for one measurement.

    Returns:
        A `Rollout` with rows ordered prompt by prompt, k rows each.
    """
    device = next(model.parameters()).device
    eos_ids = eos_token_ids(model, tokenizer)
    rows = [(i, p.ids) for i, p in enumerate(prompts) for _ in range(samples_per_prompt)]
    if engine not in ("auto", "model"):
        raise ValueError(f"engine must be 'auto' or 'model', got {engine!r}")
    lean = None
    if engine == "auto" and rows:
        lean = LeanDecoder.build(model, batch_size=min(batch_size, len(rows)),
                                 max_length=max(len(ids) for _, ids in rows) + max_new_tokens, compile=compile)
    common = dict(seed=seed, pad_id=tokenizer.pad_token_id, eos_ids=eos_ids, max_new_tokens=max_new_tokens,
                  temperature=temperature, top_p=top_p, top_k=top_k, suppress_eos=suppress_eos,
                  share_prompts=share_prompts)
    prompt_ids = [ids for _, ids in rows]
    # inference mode trims per-op overhead, which is much of a small decode step; the lean path only, as
    # the model's own forward may be sharded (FSDP) and its hooks expect ordinary no-grad tensors. The
    # results are copied into ordinary tensors below, so the rollout can feed autograd.
    with torch.inference_mode() if lean is not None else torch.no_grad():
        if lean is not None and continuous and done_everywhere is None and rows:
            parts = [(0, _sample_continuous(model, lean, prompt_ids, [row_offset + r for r in range(len(rows))],
                                            slots=batch_size, on_done=on_batch, **common))]
        else:  # lock-step batches: the model's forward, a sharded model, or asked for (the plan)
            parts = []
            for start in range(0, len(rows), batch_size):
                chunk = prompt_ids[start:start + batch_size]
                parts.append((start, _sample_batch(model, chunk, torch.arange(len(chunk), device=device) + row_offset
                                                   + start, lean=lean, done_everywhere=done_everywhere, **common)))
                if on_batch:
                    on_batch(len(chunk))
    # Left-pad prompts to the widest, right-pad completions to the longest.
    P = max((len(ids) for ids in prompt_ids), default=0)
    L = max((p[1][0].shape[1] for p in parts), default=0)
    B = len(rows)
    input_ids = torch.full((B, P + L), tokenizer.pad_token_id, dtype=torch.long, device=device)
    attention = torch.zeros((B, P + L), dtype=torch.long, device=device)
    completion_mask = torch.zeros((B, P + L), dtype=torch.bool, device=device)
    logprobs = torch.zeros((B, P + L), dtype=torch.float32, device=device)
    for r, ids in enumerate(prompt_ids):
        input_ids[r, P - len(ids):P] = torch.tensor(ids, dtype=torch.long, device=device)
        attention[r, P - len(ids):P] = 1
    for r, (comp, cmask, lp) in parts:
        n, length = comp.shape
        input_ids[r:r + n, P:P + length] = comp
        completion_mask[r:r + n, P:P + length] = cmask
        attention[r:r + n, P:P + length] = cmask.long()
        logprobs[r:r + n, P:P + length] = lp
    return Rollout(
        input_ids=input_ids,
        attention_mask=attention,
        completion_mask=completion_mask,
        prompt_lengths=torch.tensor([len(ids) for _, ids in rows], device=device),
        prompt_index=torch.tensor([i for i, _ in rows], device=device),
        sample_logprobs=logprobs,
        prompt_width=P,
    )
