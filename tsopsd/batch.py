"""The rollout batch: sampled sequences with their masks, the type every stage after sampling reads.

    rollout.input_ids, rollout.completion_mask        # (B, T)
    prediction_mask(rollout)                          # (B, T) positions that predict a completion token
    position_ids_from_mask(rollout.attention_mask)    # (B, T) positions that ignore left padding

Layout of a row: ``[left padding][prompt][completion][right padding]``. The prompt part is
left-padded to a common width ``prompt_width``; completions start at column ``prompt_width``.
Nothing here imports the rest of tsopsd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """A batch of sampled sequences.

    Attributes:
        input_ids: (B, T) prompt and completion tokens; padding holds the pad id.
        attention_mask: (B, T) 1 on real tokens (prompt, completion up to and including EOS).
        completion_mask: (B, T) bool, True on completion tokens up to and including EOS.
        prompt_lengths: (B,) unpadded prompt length of each row.
        prompt_index: (B,) index into the prompt list that each row was sampled from.
        sample_logprobs: (B, T) float32 log-prob at T=1 of each completion token as sampled; 0 elsewhere.
        prompt_width: column where completions start.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    prompt_index: torch.Tensor
    sample_logprobs: torch.Tensor
    prompt_width: int

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def completions(self) -> list[list[int]]:
        """Completion token ids of each row (EOS included when sampled)."""
        return [row[m].tolist() for row, m in zip(self.input_ids, self.completion_mask)]

    def rows(self, start: int, stop: int) -> Rollout:
        """The rows [start, stop) as a Rollout."""
        return Rollout(**{k: (v[start:stop] if torch.is_tensor(v) else v) for k, v in self.__dict__.items()})

    def trimmed(self) -> Rollout:
        """The same rows without the columns that are padding in every one of them: left of the longest
        prompt, right of the longest completion. A micro-batch of short rows then costs what its rows
        need, not the longest row of the whole step. Positions come from the mask, so nothing else moves."""
        from torch._subclasses.fake_tensor import FakeTensor

        if isinstance(self.attention_mask, FakeTensor):  # `tsopsd plan`: no values to look at (its rows are full)
            return self
        real = self.attention_mask.bool().any(0).nonzero()
        if real.numel() == 0:
            return self
        first, last = min(int(real[0]), self.prompt_width), int(real[-1]) + 1
        if first == 0 and last == self.attention_mask.shape[1]:
            return self
        cols = {k: v[:, first:last] for k, v in self.__dict__.items() if torch.is_tensor(v) and v.dim() == 2}
        return Rollout(**{**self.__dict__, **cols, "prompt_width": self.prompt_width - first})

    def to(self, device) -> Rollout:
        return Rollout(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()})


def concat(rollouts: list[Rollout], pad_id: int = 0) -> Rollout:
    """One Rollout of the rows of `rollouts` (each padded to the widest prompt and completion part), the rows of
    one prompt together (a stable sort by `prompt_index`, so a prompt's samples can share its pass)."""
    if len(rollouts) == 1:
        return rollouts[0]
    P = max(r.prompt_width for r in rollouts)
    C = max(r.input_ids.shape[1] - r.prompt_width for r in rollouts)
    parts: dict[str, list[torch.Tensor]] = {}
    for r in rollouts:
        left, right = P - r.prompt_width, C - (r.input_ids.shape[1] - r.prompt_width)
        for k, v in r.__dict__.items():
            if torch.is_tensor(v):
                if v.dim() == 2:
                    fill = pad_id if k == "input_ids" else 0
                    v = torch.cat([v.new_full((v.shape[0], left), fill), v, v.new_full((v.shape[0], right), fill)], 1)
                parts.setdefault(k, []).append(v)
    cat = {k: torch.cat(v) for k, v in parts.items()}
    order = torch.argsort(cat["prompt_index"], stable=True)
    return Rollout(**{k: v[order] for k, v in cat.items()}, prompt_width=P)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counting only real tokens, so left padding does not shift positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def prediction_mask(rollout: Rollout) -> torch.Tensor:
    """(B, T) True at positions whose next token is a completion token (the last column never is)."""
    mask = torch.zeros_like(rollout.completion_mask)
    mask[:, :-1] = rollout.completion_mask[:, 1:]
    return mask


def completion_targets(rollout: Rollout) -> torch.Tensor:
    """(N,) the completion tokens, in the order of the rows of `prediction_mask`'s positions."""
    return rollout.input_ids[rollout.completion_mask]
