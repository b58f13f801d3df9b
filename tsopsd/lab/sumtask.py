"""A tiny task with a verifier and many correct answers, and a small LM trained on it offline.

    "sum 12 =" -> " 5 7"   (any two positive integers that add up to the target)

Used by the demo, the lab and the tests. `train_sft` teaches a tiny causal LM the task from diverse
correct answers, so the SFT model is both accurate and diverse; `train_sft(..., answers_per_target=1)`
gives a deterministic, low-entropy model quickly (a test stand-in for collapse; the demo collapses the
SFT model with real RL, see `tsopsd.rl`).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

from tsopsd.lab.tiny import build_tokenizer, model_config

TARGETS = tuple(range(4, 21))
ANSWER = re.compile(r"^\s*(\d+) (\d+)\s*$")
# Ways to ask for the same thing. With several, a prompt held out of training is a new phrasing of a
# target the model is trained on (as a held-out problem is a new problem of a kind it trains on);
# with one, every prompt is a target of its own.
PHRASINGS = ("sum {} =", "add to {} =", "split {} =", "pair for {} =")


def prompt_text(target: int, phrasing: int = 0) -> str:
    return PHRASINGS[phrasing].format(target)


def task_prompts(targets=TARGETS, phrasings: int = 1) -> list[str]:
    """Every target in each of the first `phrasings` phrasings, phrasing by phrasing."""
    return [prompt_text(t, k) for k in range(phrasings) for t in targets]


def answers(target: int) -> list[str]:
    return [f" {a} {target - a}" for a in range(1, target)]


def parse_target(prompt: str) -> int:
    return int(re.search(r"\d+", prompt)[0])


def is_correct(target: int, completion: str) -> bool:
    """The verifier: two positive integers that add up to `target`, and nothing else."""
    m = ANSWER.match(completion)
    return bool(m) and int(m[1]) > 0 and int(m[2]) > 0 and int(m[1]) + int(m[2]) == target


def larger_first(target: int, completion: str) -> bool:
    """The shifted reward of the lab's second continuation: correct, and the first number is the larger.

    Every target from 3 up has such answers (about half of its correct ones), so the reward is reachable
    on every prompt; a collapsed model's favourite answer meets it on some prompts and misses on others.
    """
    m = ANSWER.match(completion)
    return is_correct(target, completion) and int(m[1]) > int(m[2])


REWARDS = {"same": is_correct, "shifted": larger_first}  # the lab's two continued-RL rewards


def task_texts(phrasings: int = 1) -> list[str]:
    """Every prompt with every correct answer, for training the task's tokenizer."""
    return [prompt_text(t, k) + a for k in range(phrasings) for t in range(0, 40) for a in answers(max(t, 2))]


def build_task_tokenizer(out: str | Path | None = None, *, phrasings: int = 1):
    return build_tokenizer(out, vocab_size=320, texts=task_texts(phrasings) * 3, chat_template=False)


def build_task_model(tokenizer, *, seed: int = 0, hidden: int = 64, layers: int = 2, arch: str = "qwen3"):
    from transformers import AutoModelForCausalLM

    cfg = model_config(arch, len(tokenizer), hidden=hidden, layers=layers, heads=4, eos_id=tokenizer.eos_token_id,
                       max_positions=64)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    return model


def _examples(tokenizer, targets, answers_per_target: int | None, rng: random.Random, phrasings: int = 1):
    """(prompt ids, completion ids incl. EOS) pairs; `answers_per_target` limits each target's answers."""
    out = []
    chosen = {}  # a target's answers are the same in every phrasing (a collapsed model prefers an answer, not a wording)
    for t in targets:
        chosen[t] = answers(t)
        if answers_per_target is not None:
            chosen[t] = rng.sample(chosen[t], min(answers_per_target, len(chosen[t])))
    for k, t in ((k, t) for k in range(phrasings) for t in targets):
        for a in chosen[t]:
            p = tokenizer(prompt_text(t, k))["input_ids"]
            c = tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            out.append((p, c))
    return out


def train_sft(model, tokenizer, *, steps: int = 300, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
              answers_per_target: int | None = None, targets=TARGETS, phrasings: int = 1,
              on_step=None) -> list[float]:
    """Plain next-token training on completions only (every target in `phrasings` phrasings). Returns the
    loss per step; `on_step(1)` after each (progress)."""
    rng = random.Random(seed)
    data = _examples(tokenizer, targets, answers_per_target, rng, phrasings)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pad = tokenizer.eos_token_id
    losses = []
    model.train()
    for _ in range(steps):
        batch = [rng.choice(data) for _ in range(batch_size)]
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((batch_size, width), pad)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (p, c) in enumerate(batch):  # right padding: positions start at 0 for every row
            seq = p + c
            ids[i, :len(seq)] = torch.tensor(seq)
            labels[i, len(p):len(seq)] = torch.tensor(c)
            mask[i, :len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if on_step:
            on_step(1)
    model.eval()
    return losses


def build_collapsed_checkpoint(out: str | Path, *, seed: int = 0, steps: int = 150, arch: str = "qwen3",
                               phrasings: int = 1):
    """A small model trained on one answer per prompt: accurate, near-deterministic. Saved to `out`."""
    tok = build_task_tokenizer(phrasings=phrasings)
    model = build_task_model(tok, seed=seed, arch=arch)
    train_sft(model, tok, steps=steps, answers_per_target=1, seed=seed, phrasings=phrasings)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return model, tok


def write_prompts(path: str | Path, targets=TARGETS, *, phrasings: int = 1) -> Path:
    import json

    path = Path(path)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in task_prompts(targets, phrasings)))
    return path
