"""One training step's gradient: teacher and student passes over the rollout, the chunked loss, backward.

    stats = train_step(policy, rollout, tau=1.5, cfg=cfg)     # gradients left in .grad
    hidden = teacher_states(policy, rollout, micro_batch=4)   # first, when tau is solved on them
    stats = train_step(policy, rollout, tau=tau, cfg=cfg, teacher_hidden=hidden)

Per micro-batch of `train.micro_batch` sequences: the frozen teacher's hidden states at completion
positions (no grad), the student's (with grad, under its compute dtype), then the divergence to
softmax(z0 / tau) over the full vocabulary chunk by chunk (`loss.chunked_divergence_backward`), so no
B x T x V tensor exists. `reheat.train` calls it once per step; `plan` calls it on fake tensors.
"""

from __future__ import annotations

import contextlib
import time
from functools import partial

import torch

from tsopsd.batch import Rollout
from tsopsd.config import Config
from tsopsd.distributions import Heat, row_temperatures
from tsopsd.loss import ChunkStats, Workspace, chunked_divergence_backward
from tsopsd.policy import Policy
from tsopsd.scoring import completion_hidden, head_logits


def teacher_states(policy: Policy, rollout: Rollout, *, micro_batch: int, skip_empty: bool = True,
                   timings: dict[str, float] | None = None, share_prompts: bool = True) -> list[torch.Tensor | None]:
    """The frozen teacher's (n, D) hidden states at completion positions, one per micro-batch (None for
    a micro-batch without completion tokens, when `skip_empty`).

    A run that tracks a target entropy computes them before the loss, solves tau on them and hands
    them to `train_step`: N x D values kept for the step, where the logits would be N x V.
    """
    clock = Clock(policy.teacher.device, timings)
    out = []
    for s in range(0, rollout.input_ids.shape[0], micro_batch):
        part = rollout.rows(s, s + micro_batch)
        if skip_empty and not part.completion_mask.any():
            out.append(None)
            continue
        with clock("teacher"), torch.no_grad():
            out.append(policy.teacher.hidden(part, share_prompts=share_prompts))
    return out


def train_step(policy: Policy, rollout: Rollout, *, tau: float, cfg: Config, normalizer: float | None = None,
               skip_empty: bool = True, timings: dict[str, float] | None = None,
               teacher_hidden: list[torch.Tensor | None] | None = None, heat: Heat | None = None) -> ChunkStats:
    """Accumulate gradients of the mean divergence over the rollout's completion tokens.

    Args:
        normalizer: divide the summed divergence by this many tokens (default: this rollout's count;
            data-parallel runs pass the backend's `loss_normalizer` so that reduced gradients give the
            global mean).
        skip_empty: skip micro-batches without completion tokens (False: run every forward and backward, as
            ranks in lock-step must). One read of the device per micro-batch; the statistics stay on the
            device (a non-finite chunk is not looked for until the step's statistics are read).
        timings: if given, seconds spent in teacher scoring and in the student's forward/backward are
            added under ``teacher`` and ``student`` (the device is synchronized for honest numbers).
        teacher_hidden: `teacher_states` of this rollout, computed beforehand (None: computed here,
            one micro-batch at a time); the list's entries are set to None as their micro-batches finish,
            so each is freed once used.
        heat: a selective heat (`teacher.heat`): tau only at its masked positions (the original, T = 1,
            elsewhere), and over the original's plausible candidates only (its min_p); None: tau everywhere.

    Returns statistics summed over tokens. Gradients are left in `.grad` (not applied).
    """
    n_tokens = normalizer if normalizer is not None else int(rollout.completion_mask.sum())
    total = ChunkStats()
    mb, share = cfg.train.micro_batch, cfg.train.share_prompts
    clock = Clock(policy.teacher.device, timings)
    workspace = Workspace()  # chunk x V buffers shared by all micro-batches of the step
    for i, s in enumerate(range(0, rollout.input_ids.shape[0], mb)):
        part = rollout.rows(s, s + mb)
        if skip_empty and not part.completion_mask.any():
            continue
        if teacher_hidden is not None:  # emptied as the step goes: each micro-batch's states freed after it
            hidden, teacher_hidden[i] = teacher_hidden[i], None
        else:
            with clock("teacher"), torch.no_grad():
                hidden = policy.teacher.hidden(part, share_prompts=share)  # (n, D), adapter disabled in LoRA mode
        with clock("student"):
            with policy.compute():  # autocast to bf16 over fp32 master weights, where there are some
                student_hidden = completion_hidden(policy.student, part, share_prompts=share)  # (n, D), with grad
            stats = chunked_divergence_backward(
                student_hidden, hidden, partial(head_logits, policy.student), policy.teacher.logits,
                normalizer=n_tokens, divergence=cfg.loss.divergence, beta=cfg.loss.beta,
                teacher_temperature=row_temperatures(tau, heat.masks[i] if heat and heat.masks else None),
                chunk_size=cfg.loss.chunk_size, workspace=workspace, min_p=heat.min_p if heat else 0.0)
        total.add(stats)
        del hidden, student_hidden
    clock.settle()
    return total


class Clock:
    """Adds the time of `with clock(name):` blocks to a dict (no-op without one). On a GPU each block is timed by
    CUDA events on the current stream (no synchronisation: each phase is charged its own kernels, read back
    once by `settle`); elsewhere by the host's clock."""

    def __init__(self, device: torch.device, timings: dict[str, float] | None):
        self.device, self.timings = device, timings
        self.pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def __call__(self, name: str):
        if self.timings is None:
            return contextlib.nullcontext()
        return self._timed(name)

    @contextlib.contextmanager
    def _timed(self, name: str):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending.append((name, start, end))
            return
        t0 = time.perf_counter()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def settle(self) -> None:
        """Add the timed blocks' seconds to the dict (on a GPU: waits for the last block's kernels)."""
        if not self.pending:
            return
        self.pending[-1][2].synchronize()
        for name, start, end in self.pending:
            self.timings[name] = self.timings.get(name, 0.0) + start.elapsed_time(end) / 1000
        self.pending.clear()
