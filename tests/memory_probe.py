"""Measure a real reheat step's memory per phase on the CPU, to hold `tsopsd plan` against (test_plan.py).

    MALLOC_MMAP_THRESHOLD_=65536 python tests/memory_probe.py CONFIG.yaml MODEL_DIR [key=value ...]
    python tests/memory_probe.py CONFIG.yaml MODEL_DIR model.device=cuda [key=value ...]

Runs the functions `plan` runs, in the same order and on the same worst-case batch, but on real
tensors of a randomly initialised model, and prints one JSON object: per phase, the peak resident
memory (RSS, read every 0.2 ms by a thread, torch releasing the GIL in its kernels; only the peak is kept) minus the RSS
before the model was built. With glibc's mmap threshold pinned at 64 KiB every tensor of a
measurable size is its own mapping, returned to the OS when freed, so RSS follows the live tensors.
With `model.device=cuda`: per phase `torch.cuda.max_memory_allocated` minus what was allocated
before the model was built (the plan's device bytes; `bench/gpu.sh`).
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
    """A thread that reads RSS every 0.2 ms and keeps the largest value since the phase began.

    Only the running peak is kept: a list of every sample would itself grow RSS by ~100 bytes per
    sample (~18 MiB over a 30 s probe), which the later phases would then measure as theirs.
    """

    def __init__(self):
        self.peak = 0
        self.stop = False
        self.now = rss
        self.lock = threading.Lock()  # a read from before a phase's reset cannot land after it
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            with self.lock:
                self.peak = max(self.peak, rss())
            time.sleep(0.0002)

    @contextlib.contextmanager
    def phase(self, name: str, out: dict, baseline: int):
        """Record the phase's peak RSS above `baseline`, less what RSS held at its start that is not tensors."""
        gc.collect()
        with self.lock:
            self.peak = start = rss()
        # Python objects, allocator state and library caches that earlier phases left (~20 MiB after a
        # training step, whatever the model's size): not tensors, so not the plan's (it keeps a fixed
        # reserve for them), and at the small sizes measured here as large as what is being checked.
        others = max(start - baseline - tensor_bytes(), 0)
        yield
        time.sleep(0.002)
        with self.lock:
            out[name] = max(self.peak, rss()) - baseline - others


class CudaPeaks:
    """The same per-phase peaks on a GPU, from the caching allocator's own count of allocated bytes."""

    stop = False

    @staticmethod
    def now() -> int:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    @contextlib.contextmanager
    def phase(self, name: str, out: dict, baseline: int):
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield
        torch.cuda.synchronize()
        out[name] = torch.cuda.max_memory_allocated() - baseline


def tensor_bytes() -> int:
    """Bytes of the distinct storages of the CPU tensors alive now (found through the garbage collector) and
    of their gradients."""
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):  # and its gradient, which has no Python object until it is read
            for t in (obj, obj.grad):
                if t is not None and t.device.type == "cpu" and not t.is_meta:
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


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
    device = torch.device("cuda" if cfg.model.device == "cuda" else "cpu")
    mc = AutoConfig.from_pretrained(model_dir)
    P, L = cfg.data.max_prompt_tokens, cfg.rollout.max_new_tokens
    rows = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    mb, batch = cfg.train.micro_batch, min(cfg.rollout.batch_size, rows)
    import peft  # noqa: F401 - imported here, not inside the measured load phase (its code is ~10 MiB)

    # Warm up torch's lazily made state (thread pools, kernels, the code pages of the optimizer's and the
    # gradient clipping's kernels: ~16 MiB of RSS at their first call) on a throwaway model, then measure.
    small = {**mc.to_dict(), "num_hidden_layers": 1}
    small.pop("layer_types", None)
    tiny = AutoModelForCausalLM.from_config(mc.__class__(**small)).to(device)
    tiny(input_ids=torch.zeros(2, 8, dtype=torch.long, device=device)).logits.sum().backward()
    backend = Single(Launch(), device)
    warm = make_optimizer(list(tiny.parameters()), lr=1e-3, weight_decay=0.0)
    backend.clip_grad_norm(list(tiny.parameters()), 1.0)
    warm.step()
    del tiny, warm
    gc.collect()
    sampler = Sampler() if device.type == "cpu" else CudaPeaks()
    baseline = sampler.now()
    peaks: dict[str, int] = {}
    with sampler.phase("load", peaks, baseline), device:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(mc, dtype=getattr(torch, cfg.model.dtype)).eval()
        policy = prepare_policy(model, cfg.train)
        optimizer = make_optimizer(policy.trainable, lr=cfg.train.lr, weight_decay=0.0)
    with sampler.phase("rollout", peaks, baseline), policy.compute():
        sample_rollouts(policy.student, _Tokenizer(mc), [Prompt(ids=[5] * P, text="") for _ in range(batch)],
                        samples_per_prompt=1, max_new_tokens=L, batch_size=batch, suppress_eos=True,
                        engine=cfg.rollout.engine, share_prompts=False)  # the plan's worst case: every row's own prefill
    rollout = worst_case_rollout(rows, P, L).to(device)
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
