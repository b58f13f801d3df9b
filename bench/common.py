"""Shared bits of the benchmarks: bench models built offline, prompts, memory, the JSON line."""

from __future__ import annotations

import json
import os
import resource
import statistics
from pathlib import Path

import torch

PROMPTS = [
    "the cat sat on the mat and", "one two three four five six", "give me a number that is",
    "what is the sum of two and three", "a red dog ran on the green", "blue green red one two",
    "the answer to the question is", "what rhymes with cat and dog", "seven eight nine ten and",
    "the blue cat and the red dog", "four five six seven eight", "give me a word that rhymes with",
    "the mat is red and the cat", "question: what is one plus two", "two three five seven and",
    "a green dog sat on a blue mat",
]


def build_bench_model(out: Path, *, vocab: int, hidden: int, layers: int, heads: int = 8, seed: int = 0) -> Path:
    """A random Qwen3-architecture model with `vocab` output rows and a small trained tokenizer."""
    from transformers import AutoModelForCausalLM

    from tsopsd.lab.tiny import build_tokenizer, model_config

    if (out / "config.json").is_file():
        return out
    tok = build_tokenizer(vocab_size=384)
    cfg = model_config("qwen3", vocab, hidden=hidden, layers=layers, heads=heads, eos_id=tok.eos_token_id,
                       max_positions=8192)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.eos_token_id
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def job_arguments(doc: str):
    """The flags both benchmark scripts share (the same job for both tools)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--length", type=int, default=64, help="completion tokens (EOS suppressed)")
    ap.add_argument("--steps", type=int, default=6, help="measured steps (plus one warm-up)")
    ap.add_argument("--tau", type=float, default=1.5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    return ap


def peak_memory_mib(device: torch.device) -> float:
    """Peak RSS of this process (CPU) or peak allocated memory (CUDA), MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = str(n)


def summarize(name: str, steps: list[dict], extra: dict) -> dict:
    """Median of each timing over the measured steps, printed as one JSON line (last line of output)."""
    keys = sorted({k for s in steps for k in s})
    med = {k: statistics.median(s[k] for s in steps if k in s) for k in keys}
    out = {"tool": name, **extra, **{f"median_{k}": v for k, v in med.items()}}
    print(json.dumps(out), flush=True)
    return out
