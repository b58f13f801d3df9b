"""Peak memory of one reheat training step, chunked LM head vs all positions at once.

    python bench/memory.py --vocab 151936 --hidden 256 --layers 4 --batch 4 --length 1024 --chunk 1024
    python bench/memory.py ... --chunk 0        # all positions at once (B x T x V logits per side)

Builds a random Qwen3-architecture model offline, a synthetic rollout of `batch` sequences with
`length` completion tokens (generation is not part of this measurement), and runs one LoRA step
(teacher pass + student forward/backward) through `tsopsd.step.train_step`. Prints the peak
resident memory above the level before the step (RSS sampled every 2 ms on CPU;
`max_memory_allocated` on CUDA), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=1024, help="LM-head chunk (0: all positions at once)")
    ap.add_argument("--mode", default="lora", choices=["lora", "full"])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from tsopsd.batch import Rollout
    from tsopsd.config import load_config
    from tsopsd.lab.tiny import model_config
    from tsopsd.policy import prepare_policy
    from tsopsd.step import train_step

    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = AutoModelForCausalLM.from_config(model_config("qwen3", args.vocab, hidden=args.hidden, layers=args.layers,
                                                          heads=4, max_positions=args.length + 64)).to(dev)
    cfg = load_config(None, {"model.path": "x", "data.prompts": "x", "output.out": "x", "train.mode": args.mode,
                             "loss.chunk_size": args.chunk, "train.micro_batch": args.batch})
    policy = prepare_policy(model, cfg.train)
    P, B, L = 16, args.batch, args.length
    ids = torch.randint(0, args.vocab, (B, P + L), device=dev)
    cmask = torch.zeros(B, P + L, dtype=torch.bool, device=dev)
    cmask[:, P:] = True
    rollout = Rollout(input_ids=ids, attention_mask=torch.ones_like(ids), completion_mask=cmask,
                      prompt_lengths=torch.full((B,), P), prompt_index=torch.arange(B),
                      sample_logprobs=torch.zeros(B, P + L), prompt_width=P)

    peak = {"rss": 0}
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], rss_bytes())
            time.sleep(0.002)

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
    t0 = time.perf_counter()
    train_step(policy, rollout, tau=1.5, cfg=cfg)
    seconds = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        stop.set()
        thread.join()
        extra = peak["rss"] - base
    logits_one_side = B * L * args.vocab * 4
    print(f"vocab {args.vocab}, hidden {args.hidden}, layers {args.layers}, batch {B} x {L} completion tokens, "
          f"chunk {args.chunk or 'none'} ({args.mode}, {dev.type})")
    print(f"  peak memory above baseline: {extra / 2**20:.0f} MiB  (one B x T x V float32 logits tensor: "
          f"{logits_one_side / 2**20:.0f} MiB)  step {seconds:.2f} s")
    print(json.dumps({"vocab": args.vocab, "hidden": args.hidden, "layers": args.layers, "batch": B, "length": L,
                      "chunk": args.chunk, "mode": args.mode, "device": dev.type, "peak_extra_mib": extra / 2**20,
                      "btv_logits_mib": logits_one_side / 2**20, "seconds": seconds}))


if __name__ == "__main__":
    main()
