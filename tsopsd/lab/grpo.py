"""A small on-policy RL loop (GRPO-style) for the toy task: it exists to *collapse* a model.

    history = grpo(model, tokenizer, prompts, verifier, steps=60)

Used by the demo and the lab, not a product. Each step samples a group of G completions per prompt at
T=1 from the current policy, rewards them with the verifier (1 correct, 0 not), normalizes rewards
within each group (advantage = (r - mean) / (std + eps)), and takes one policy-gradient step on
-A * log pi(completion) averaged over completion tokens. No KL penalty and no entropy bonus: this is
the recipe whose entropy collapse TS-OPSD repairs. A group whose rewards are all equal has zero
advantage and teaches nothing.

`sampling_temperature` > 1 gives "rollout-level reheating" (sample hotter, score at T=1 with the
importance weight ignored, as verl and OpenRLHF do when users raise the rollout temperature).
`entropy_coeff` > 0 adds an entropy bonus to the loss, -coeff x (mean full-vocabulary entropy over the
step's completion tokens), as verl's `actor.entropy_coeff` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tsopsd.batch import completion_targets, prediction_mask
from tsopsd.distributions import entropy
from tsopsd.prompts import Prompt
from tsopsd.rollout import sample_rollouts
from tsopsd.scoring import completion_hidden, head_logits


def grpo(model, tokenizer, prompts: Sequence[Prompt], verifier: Callable[[int, str], bool], *, steps: int = 60,
         prompts_per_step: int = 8, group_size: int = 8, max_new_tokens: int = 8, lr: float = 1e-3,
         sampling_temperature: float = 1.0, entropy_coeff: float = 0.0, seed: int = 0, parameters=None,
         on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Run GRPO; returns one dict per step (reward, entropy, loss).

    Args:
        verifier: (prompt index, completion text) -> correct?
        parameters: what to train (default: every parameter of `model`).
    """
    params = [p for p in (parameters if parameters is not None else model.parameters())]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    history = []
    model.eval()  # no dropout: rollouts and scores must come from the same policy
    for step in range(steps):
        idx = torch.randperm(len(prompts), generator=g)[:prompts_per_step].tolist()
        batch = [prompts[i] for i in idx]
        rollout = sample_rollouts(model, tokenizer, batch, samples_per_prompt=group_size,
                                  max_new_tokens=max_new_tokens, temperature=sampling_temperature,
                                  batch_size=len(batch) * group_size, seed=seed * 100_003 + step)
        texts = [tokenizer.decode(c, skip_special_tokens=True) for c in rollout.completions()]
        rewards = torch.tensor([float(verifier(idx[int(pi)], t)) for pi, t in zip(rollout.prompt_index, texts)])
        grouped = rewards.view(len(batch), group_size)
        adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).flatten()
        hidden = completion_hidden(model, rollout)  # (N, D)
        logits = head_logits(model, hidden)
        logp = logits.log_softmax(-1).gather(-1, completion_targets(rollout)[:, None]).squeeze(-1)  # (N,)
        row = prediction_mask(rollout).nonzero()[:, 0]  # the row of each completion token
        lengths = rollout.completion_lengths.clamp_min(1).float()
        # Sequence-level policy gradient, each sequence's log-prob averaged over its tokens.
        loss = -(adv[row] * logp / lengths[row]).sum() / len(rewards)
        token_entropy = entropy(logits if entropy_coeff else logits.detach())  # a graph only for the bonus
        if entropy_coeff:
            loss = loss - entropy_coeff * token_entropy.mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        h = float(token_entropy.detach().mean())
        record = {"step": step, "reward": float(rewards.mean()), "entropy": h, "loss": loss.item()}
        history.append(record)
        if on_step:
            on_step(step, record)
    return history
