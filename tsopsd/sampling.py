"""Leaf: choosing the next token of every row from its logits, on the device, with counter-based draws.

    draw = Draw(seed=0, pad_id=0, eos=torch.tensor([2]), temperature=1.0)
    token, logprob = choose(logits, draw, rows, counts, alive)      # (B,) each, nothing read back

What a row samples depends only on the seed, its global row index and how many tokens it has
(`uniforms`), never on its batch, slot or rank. Every function here is pure tensor work: no host
synchronisation, no tensor made from host data, so a decode step that calls it can run many steps
ahead of the host and can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MASK64 = (1 << 64) - 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors (wrapping arithmetic; logical shifts by masking)."""
    def shr(v, k):
        return (v >> k) & ((1 << (64 - k)) - 1)

    x = (x ^ shr(x, 30)) * -4658895280553007687  # 0xBF58476D1CE4E5B9 as a signed int64
    x = (x ^ shr(x, 27)) * -7723592293110705685  # 0x94D049BB133111EB
    return x ^ shr(x, 31)


def seed_key(seed: int) -> int:
    """The draws' key of a seed (splitmix64 of it, as a signed int64), in Python ints: no device work."""
    key = seed & MASK64
    key = ((key ^ (key >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    key = ((key ^ (key >> 27)) * 0x94D049BB133111EB) & MASK64
    key ^= key >> 31
    return key - (1 << 64) if key >= 1 << 63 else key


def uniforms(seed: int, rows: torch.Tensor, steps: torch.Tensor | int) -> torch.Tensor:
    """(B, 1) float64 uniforms in [0, 1), one per (seed, row, step): a counter-based draw.

    `rows` (B,) are global row indices and `steps` (B,) or an int how many tokens each row has. A
    row draws the same whatever batch, slot or rank it is decoded in: continuous batching, any batch
    size and any number of data-parallel ranks draw the same completions.
    """
    return keyed_uniforms(seed_key(seed), rows, steps)


def keyed_uniforms(key: int | torch.Tensor, rows: torch.Tensor, steps: torch.Tensor | int) -> torch.Tensor:
    """`uniforms` from the seed's key (`seed_key`), an int or a 0-dim int64 tensor on the rows' device (which
    a compiled step reads as data, so a new seed is not a new graph)."""
    x = _mix(rows.long() * -7046029254386353131 + key)  # 0x9E3779B97F4A7C15: the golden-ratio step
    if isinstance(steps, torch.Tensor):
        x = _mix(x + steps.long() * -7046029254386353131)
    else:  # an int: the same wrapping product in Python, added as a scalar (no tensor made from host data)
        step = (steps * 0x9E3779B97F4A7C15) & MASK64
        x = _mix(x + (step - (1 << 64) if step >= 1 << 63 else step))
    return (((x >> 11) & ((1 << 53) - 1)).double() / float(1 << 53))[:, None]


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, u: torch.Tensor) -> torch.Tensor:
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
    # and a float64 prefix sum: exact to float64 rounding, and much cheaper than drawing V exponentials
    # (Gumbel-max) or torch.multinomial at a 150k vocabulary.
    cdf = logits.softmax(-1).double().cumsum_(-1)
    total = cdf[:, -1:].contiguous()
    token = torch.searchsorted(cdf, u.to(cdf.device) * total, right=True)
    # u * total can round up to total; the last token with nonzero probability is where cdf first reaches it.
    return torch.minimum(token, torch.searchsorted(cdf, total)).squeeze(-1)


@dataclass(frozen=True)
class Draw:
    """How rows choose their tokens: the sampling settings, the ids that end or pad a row, the length cap.

    `key` (the seed's, `seed_key`) and `eos` are device tensors, made once per rollout (`Draw.make`).
    """

    key: torch.Tensor
    eos: torch.Tensor
    pad_id: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    suppress_eos: bool = False

    @classmethod
    def make(cls, seed: int, eos_ids: list[int], device, **settings) -> Draw:
        return cls(key=torch.tensor(seed_key(seed), dtype=torch.long, device=device),
                   eos=torch.tensor(eos_ids, dtype=torch.long, device=device), **settings)


def choose(logits: torch.Tensor, draw: Draw, rows: torch.Tensor, counts: torch.Tensor | int,
           alive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's next token and its log-prob under the policy (T=1 logits) from (B, V) float32 `logits`.

    `rows` (B,) global row indices and `counts` how many tokens each row has (the draw's counter);
    a row not `alive` (B,) gets the pad id and log-prob 0. EOS suppression writes into `logits`.
    """
    if draw.suppress_eos and draw.eos.numel():
        logits.index_fill_(-1, draw.eos, float("-inf"))
    u = keyed_uniforms(draw.key, rows, counts)
    token = sample_next(logits, draw.temperature, draw.top_p, draw.top_k, u)
    token = torch.where(alive, token, draw.pad_id)
    logprob = logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
    return token, torch.where(alive, logprob, 0.0)


@dataclass
class Rows:
    """The decode state of each slot (B,), on the device, updated in place (the addresses never change).

    logits: (B, V) float32, the logits the slot's next token is drawn from;
    row: the slot's row in `Made`; global_row: its global index (its draws); count: its tokens so far;
    alive: still decoding; position: the position id of its next token.
    """

    logits: torch.Tensor
    row: torch.Tensor
    global_row: torch.Tensor
    count: torch.Tensor
    alive: torch.Tensor
    position: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.logits, self.row, self.global_row, self.count, self.alive, self.position

    def prefix(self, n: int) -> Rows:
        """The first `n` slots (views: the same addresses)."""
        return Rows(*(t[:n] for t in self.tensors()))

    def keep_(self, index: torch.Tensor) -> Rows:
        """Slots `index` moved to the front, in place; returns the view of them."""
        for t in self.tensors():
            t[:index.shape[0]] = t[index]
        return self.prefix(index.shape[0])


@dataclass
class Made:
    """What rows have made, (R, L + 1) each: tokens, their log-probs, and whether the row was alive (the
    completion mask). Column `count` of a row is written at each step; a finished row writes pad, 0 and
    False one column past its end (the extra column), so nothing it made is overwritten."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    live: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.tokens, self.logprobs, self.live


def advance(rows: Rows, made: Made, draw: Draw, *, lockstep: bool) -> tuple[torch.Tensor, ...]:
    """Choose each slot's token, record it in `made`, and move the slots on, all in place on the device.

    Returns (token, moving, ended), (B,) each: the tokens chosen, the slots still decoding after them, and
    the slots whose row ended at this step (EOS or the length cap). Lock-step: every slot's counter moves
    (a row's t-th draw is the batch's t-th step, finished or not); otherwise only a live slot's.
    """
    token, logprob = choose(rows.logits, draw, rows.global_row, rows.count, rows.alive)
    at = (rows.row, rows.count)
    made.tokens.index_put_(at, token)
    made.logprobs.index_put_(at, logprob)
    made.live.index_put_(at, rows.alive)
    ended = rows.alive & (torch.isin(token, draw.eos) | (rows.count >= draw.max_new_tokens - 1))
    moving = rows.alive & ~ended
    rows.count.add_(1 if lockstep else rows.alive)
    rows.alive.copy_(moving)
    return token, moving, ended
