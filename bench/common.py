"""Shared bits of the benchmarks: bench models built offline, prompts, memory, the JSON line."""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
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


def bench_prompts(tok, n: int, prompt_tokens: int = 0) -> list[str]:
    """`n` distinct prompt texts: the short `PROMPTS`, or (prompt_tokens > 0) each grown word by word from
    a different start of them to at least `prompt_tokens` tokens (a long system prompt and question)."""
    if prompt_tokens <= 0:
        return [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    words = " ".join(PROMPTS).split()
    texts = []
    for i in range(n):
        out, j = [], i * 7
        while len(tok(" ".join(out))["input_ids"]) < prompt_tokens:
            out.extend(words[j % len(words):j % len(words) + 16])
            j += 16
        texts.append(" ".join(out))
    return texts


def _best_seconds(fn, device: torch.device, repeat: int = 4) -> float:
    """Seconds per call of `fn`, best of 5 rounds of `repeat` calls (a GPU's queue drained around each)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / repeat)
    return best


def matmul_peak(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a square matmul in `dtype`, best of 5 (the threads set by `set_threads`): 1024^3 on a
    CPU, 8192^3 on a GPU."""
    device = torch.device(device)
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _best_seconds(lambda: a @ a, device)


def bandwidth(device: str | torch.device = "cpu") -> float:
    """Bytes/s read by a sum over fp32 (256 MiB on a CPU, 1 GiB on a GPU), best of 5: what a decode
    step's weight streaming sees."""
    device = torch.device(device)
    x = torch.randn((256 if device.type == "cuda" else 64) * 2**20, device=device)
    return x.numel() * 4 / _best_seconds(x.sum, device, repeat=1)


def step_floor(config, *, mode: str, prompts: int, samples: int, prompt_tokens: int, length: int,
               peak: float, bw: float) -> dict:
    """Seconds a reheat step cannot go below on this machine: its FLOPs at `peak` plus the bytes that must
    stream at `bw`, counting each prompt once (what sharing makes possible) and fp32 weights.

    FLOPs: 2 per weight per token for a forward (the body; the LM head only where a completion token is
    predicted), for the rollout (prompts once, then `length` decode tokens per row), the teacher (1
    forward) and the student (forward + backward: 3 forwards in full mode, 2 with LoRA, which needs no
    weight gradients). Bytes: every weight once per decode step, and in full mode AdamW's read and
    write of weights, gradients and two moments (32 bytes per weight).
    """
    D, V, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    kv = config.num_key_value_heads * getattr(config, "head_dim", D // config.num_attention_heads)
    body = layers * (D * (D + 2 * kv) + D * D + 3 * D * config.intermediate_size)  # attention + gated MLP
    head = D * V
    rows = prompts * samples
    tokens = prompts * prompt_tokens + rows * length  # what the teacher and the student pass over
    passes = 1 + (3 if mode == "full" else 2)
    flops = 2 * body * (prompts * prompt_tokens + rows * length) + 2 * head * rows * length  # rollout
    flops += passes * (2 * body * tokens + 2 * head * rows * length)
    weight_bytes = 4 * (body + head * (1 if config.tie_word_embeddings else 2))
    moved = length * weight_bytes + (32 * (body + head) if mode == "full" else 0)
    return {"floor_s": flops / peak + moved / bw, "flops": flops, "bytes": moved}


def job_arguments(doc: str):
    """The flags both benchmark scripts share (the same job for both tools)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--length", type=int, default=64, help="completion tokens (EOS suppressed)")
    ap.add_argument("--samples-per-prompt", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=0, help="grow each prompt to this many tokens (0: short)")
    ap.add_argument("--natural-eos", action="store_true", help="completions end at the model's EOS, up to --length")
    ap.add_argument("--rollout-batch", type=int, default=0, help="sequences generated together (0: the whole step)")
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
