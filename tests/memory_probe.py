"""Measure a real reheat step's memory per phase on the CPU, to hold `tsopsd plan` against (test_plan.py).

    MALLOC_MMAP_THRESHOLD_=65536 python tests/memory_probe.py CONFIG.yaml MODEL_DIR [key=value ...]

Runs the functions `plan` runs, in the same order and on the same worst-case batch, but on real
tensors of a randomly initialised model, and prints one JSON object: per phase, the peak resident
memory (RSS, sampled every 0.2 ms by a thread; torch releases the GIL in its kernels) minus the RSS
before the model was built. With glibc's mmap threshold pinned at 64 KiB every tensor of a
measurable size is its own mapping, returned to the OS when freed, so RSS follows the live tensors.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import sys
import threading
import time
import warnings

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Sampler:
    """A thread that records (time, RSS) every 0.2 ms; a phase's peak is the largest sample inside it."""

    def __init__(self):
        self.samples: list[tuple[float, int]] = []
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            self.samples.append((time.perf_counter(), rss()))
            time.sleep(0.0002)

    @contextlib.contextmanager
    def phase(self, name: str, out: dict, baseline: int):
        gc.collect()
        start = time.perf_counter()
        first = rss()
        yield
        time.sleep(0.002)
        end = time.perf_counter()
        inside = [v for t, v in self.samples if start <= t <= end]
        out[name] = max([first, rss(), *inside]) - baseline


def main() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    from transformers import AutoConfig, AutoModelForCausalLM

    from tsopsd.config import load_config
    from tsopsd.errors import TsopsdError
    from tsopsd.parallel import Launch, Single
    from tsopsd.plan import _Tokenizer, worst_case_rollout
    from tsopsd.policy import make_optimizer, prepare_policy
    from tsopsd.prompts import Prompt
    from tsopsd.rollout import sample_rollouts
    from tsopsd.step import train_step
    from tsopsd.teacher import check_teacher

    config, model_dir, *sets = sys.argv[1:]
    cfg = load_config(config, dict(s.split("=", 1) for s in sets), inputs=False)
    mc = AutoConfig.from_pretrained(model_dir)
    P, L = cfg.data.max_prompt_tokens, cfg.rollout.max_new_tokens
    rows = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    mb, batch = cfg.train.micro_batch, min(cfg.rollout.batch_size, rows)
    import peft  # noqa: F401 - imported here, not inside the measured load phase (its code is ~10 MiB)

    # Warm up torch's lazily made state (thread pools, kernels) on a throwaway model, then measure.
    small = {**mc.to_dict(), "num_hidden_layers": 1}
    small.pop("layer_types", None)
    tiny = AutoModelForCausalLM.from_config(mc.__class__(**small))
    tiny(input_ids=torch.zeros(2, 8, dtype=torch.long)).logits.sum().backward()
    del tiny
    gc.collect()
    baseline = rss()
    backend = Single(Launch(), torch.device("cpu"))
    sampler = Sampler()
    peaks: dict[str, int] = {}
    with sampler.phase("load", peaks, baseline):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(mc, dtype=getattr(torch, cfg.model.dtype)).eval()
        policy = prepare_policy(model, cfg.train)
        optimizer = make_optimizer(policy.trainable, lr=cfg.train.lr, weight_decay=0.0)
    with sampler.phase("rollout", peaks, baseline), policy.compute():
        sample_rollouts(policy.student, _Tokenizer(mc), [Prompt(ids=[5] * P, text="") for _ in range(batch)],
                        samples_per_prompt=1, max_new_tokens=L, batch_size=batch, suppress_eos=True,
                        engine=cfg.rollout.engine, share_prompts=False)  # the plan's worst case: every row's own prefill
    rollout = worst_case_rollout(rows, P, L)
    tau = cfg.teacher.temperature
    with sampler.phase("check", peaks, baseline):
        try:
            check_teacher(policy.teacher, rollout.rows(0, 1), tau, chunk_size=cfg.loss.chunk_size)
        except TsopsdError:  # a random model is near uniform: the check ran (its memory is measured) and refused
            pass
    with sampler.phase("train", peaks, baseline):
        train_step(policy, rollout.rows(0, min(2, math.ceil(rows / mb)) * mb), tau=tau, cfg=cfg,
                   normalizer=float(rows * L))
    with sampler.phase("update", peaks, baseline):
        backend.clip_grad_norm(policy.trainable, cfg.train.max_grad_norm)
        snapshot = backend.snapshot(policy)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sampler.stop = True
    del snapshot
    print(json.dumps(peaks))


if __name__ == "__main__":
    main()
