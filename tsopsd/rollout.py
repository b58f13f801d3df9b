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
from tsopsd.decode import LeanDecoder, bucket
from tsopsd.family import eos_token_ids, grouped_kv_attention
from tsopsd.prompts import Prompt
from tsopsd.sampling import Draw, Made, Rows, advance

DONE_CHECK_EVERY = 16  # lock-step: steps between reads of "is every row done?" (the rest of a step stays on device)


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


def _state(lean: LeanDecoder | None, logits: torch.Tensor, rows: torch.Tensor, global_rows: torch.Tensor,
           positions: torch.Tensor, n_rows: int, draw: Draw) -> tuple[Rows, Made]:
    """The decode state of B = len(rows) slots starting from `logits`, and the buffers of `n_rows` rows: the
    decoder's buffers (the same addresses each rollout where the compiled step keeps them), or new tensors."""
    B, V = logits.shape
    device = logits.device
    L = draw.max_new_tokens + 1  # a column past the longest row: where a finished slot writes
    if lean is None:
        def buffer(name, shape, dtype, fill):
            return torch.full(shape, fill, dtype=dtype, device=device)
    else:
        buffer = lean.buffer
    state = Rows(buffer("rows.logits", (B, V), torch.float32, 0.0), buffer("rows.row", (B,), torch.long, 0),
                 buffer("rows.global", (B,), torch.long, 0), buffer("rows.count", (B,), torch.long, 0),
                 buffer("rows.alive", (B,), torch.bool, True), buffer("rows.position", (B,), torch.long, 0))
    state.logits.copy_(logits)
    state.row.copy_(rows)
    state.global_row.copy_(global_rows)
    state.position.copy_(positions)
    made = Made(buffer("made.tokens", (n_rows, L), torch.long, draw.pad_id),
                buffer("made.logprobs", (n_rows, L), torch.float32, 0.0), buffer("made.live", (n_rows, L), torch.bool, False))
    return state, made


def _sample_batch(model, prompt_ids: list[Sequence[int]], rows: torch.Tensor, *, draw: Draw, pad_id: int,
                  share_prompts: bool, lean: LeanDecoder | None = None,
                  done_everywhere: Callable[[bool], bool] | None = None,
                  check_every: int = DONE_CHECK_EVERY) -> tuple[torch.Tensor, ...]:
    """Sample one batch in lock-step, every row until the last one ends (the model's forward, or a sharded
    model). `rows` (B,) are the rows' global indices (their random draws). Run under no_grad. Returns
    the completions (B, L), their mask and log-probs. Nothing is read back but "is every row done?", every
    `check_every` steps (the steps after the last row ended are masked and cut off), and at the end L."""
    device = next(model.parameters()).device
    max_new_tokens = draw.max_new_tokens
    ids, mask, next_pos, logits, cache = _prefill(model, prompt_ids, pad_id, device, share_prompts)
    B, width = ids.shape
    state, made = _state(lean, logits, torch.arange(B, device=device), rows, next_pos, B, draw)
    del logits
    # The KV cache is sized for the whole completion at once: no regrowth (which briefly holds the old
    # and the new cache, 1.5x at the doubling), and the prefill's own cache is dropped once adopted.
    session = lean.session(cache, mask, capacity=width + max_new_tokens) if lean is not None else None
    if session is not None:
        del cache
    steps = 0
    for j in range(max_new_tokens):
        steps = j + 1
        if session is not None:
            session.step(state, made, draw, lockstep=True)
        else:
            token, moving, ended = advance(state, made, draw, lockstep=True)
            if steps < max_new_tokens:  # the token's own column is attended where its row was alive
                mask = torch.cat([mask, (moving | ended).long()[:, None]], dim=1)
                state.logits.copy_(model(input_ids=token[:, None], attention_mask=mask,
                                         position_ids=state.position[:, None], cache=cache, use_cache=True,
                                         logits_to_keep=1).logits[:, -1].float())
                state.position.add_(1)
        if steps % check_every == 0 or steps == max_new_tokens:
            done = bool((~state.alive).all())  # asked as the plan answers it: 'no' until it has probed
            if done_everywhere is not None:  # decoding in lock-step with other processes (a sharded model)
                done = done_everywhere(done)
            if done:
                break
    del session
    # the columns where some row was alive, a prefix (a row never comes back to life): with a check at every
    # step, the steps run (the plan's way: it answers the checks, never this read)
    L = steps if check_every == 1 else int(made.live[:, :steps].any(0).sum())
    return made.tokens[:, :L].clone(), made.live[:, :L].clone(), made.logprobs[:, :L].clone()


def _sample_continuous(model, lean: LeanDecoder, prompt_ids: list[Sequence[int]], rows: list[int], *, slots: int,
                       draw: Draw, pad_id: int, share_prompts: bool,
                       on_done: Callable[[int], None] | None = None) -> tuple[torch.Tensor, ...]:
    """Continuous batching: `slots` sequences decode together; a finished row's slot is refilled with the
    next pending row (prefilled into that slot), so no step is spent on a row that has ended. Once no
    rows are pending, the live slots move to the front when half the batch has ended, and the batch
    shrinks to a power of two. Each step reads back one small tensor (which slots ended); the host
    touches the device otherwise only to admit rows. Returns the completions (rows, L), their mask
    (EOS included) and the log-probs of their tokens, padded to the longest."""
    device = lean.device
    capacity = max(len(p) for p in prompt_ids) + draw.max_new_tokens + 1
    pending = list(range(len(prompt_ids)))[::-1]  # popped from the end: row order
    first = [pending.pop() for _ in range(min(slots, len(pending)))]
    _, mask, next_pos, logits, cache = _prefill(model, [prompt_ids[r] for r in first], pad_id, device, share_prompts)
    session = lean.slots(len(first), capacity)
    session.admit(list(range(len(first))), cache, mask)
    del cache
    global_rows = torch.tensor(rows, device=device)
    local = torch.tensor(first, device=device)
    state, made = _state(lean, logits, local, global_rows[local], next_pos, len(prompt_ids), draw)
    del logits
    slot_row: list[int | None] = list(first)  # the row each slot decodes; None once it ended
    length = [0] * len(prompt_ids)  # tokens each row has made (the host's count)
    while True:
        ended = session.step(state, made, draw, lockstep=False).tolist()  # the step's one read-back
        live, freed = [], []
        for s, r in enumerate(slot_row):
            if r is not None:
                length[r] += 1
                if ended[s]:
                    slot_row[s] = None
                    freed.append(s)
                    if on_done:
                        on_done(1)
            live.append(slot_row[s] is not None)
        session.moved(live)
        if not any(live) and not pending:
            break
        refill = [(s, pending.pop()) for s in freed[:len(pending)]]
        if refill:
            _, mask, pos, fresh, cache = _prefill(model, [prompt_ids[r] for _, r in refill], pad_id, device,
                                                  share_prompts)
            session.admit([s for s, _ in refill], cache, mask)
            del cache
            at, new_rows = torch.tensor(refill, device=device).T
            state.logits[at], state.position[at], state.row[at] = fresh, pos, new_rows
            state.global_row[at], state.count[at], state.alive[at] = global_rows[new_rows], 0, True
            for s, r in refill:
                slot_row[s] = r
        idle = [s for s, r in enumerate(slot_row) if r is None]
        if not pending and len(idle) * 2 >= len(slot_row) and len(idle) < len(slot_row):
            busy = [s for s, r in enumerate(slot_row) if r is not None]
            n = bucket(len(busy), len(slot_row))
            if n < len(slot_row):  # in place, to a power of two (a finished slot fills the rest, masked)
                keep = busy + idle[:n - len(busy)]
                session.keep(keep)
                state = state.keep_(torch.tensor(keep, device=device))
                slot_row = [slot_row[s] for s in keep]
    L = max(length)
    return made.tokens[:, :L].clone(), made.live[:, :L].clone(), made.logprobs[:, :L].clone()


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
    check_every: int = DONE_CHECK_EVERY,
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
        check_every: lock-step batches read "is every row done?" back from the device every this many
            steps (1: every step, as the plan probes them); the steps past the end are masked and cut off.

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
    draw = Draw.make(seed, eos_ids, device, pad_id=tokenizer.pad_token_id, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_p=top_p, top_k=top_k, suppress_eos=suppress_eos)
    common = dict(draw=draw, pad_id=tokenizer.pad_token_id, share_prompts=share_prompts)
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
                                                   + start, lean=lean, done_everywhere=done_everywhere,
                                                   check_every=check_every, **common)))
                if on_batch:
                    on_batch(len(chunk))
    if lean is not None:
        lean.release()
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
