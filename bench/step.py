"""Time tsopsd reheat steps and break them down.

    python bench/step.py --model bench/out/models/q8x512 --mode lora --prompts-per-step 8 \
        --samples-per-prompt 1 --length 64 --steps 6

Each step: generation (on-policy, EOS suppressed so every completion has exactly --length tokens),
teacher scoring, student forward/backward (the divergence included), optimizer step. The first
step is a warm-up and is not counted. Prints one line per step, then one JSON line with medians,
generated and trained tokens/s and peak memory (RSS on CPU, max_memory_allocated on CUDA).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import bench_prompts, job_arguments, peak_memory_mib, set_threads, summarize  # noqa: E402


def main() -> None:
    ap = job_arguments(__doc__)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-share-prompts", action="store_true", help="run every row's prompt (train.share_prompts false)")
    ap.add_argument("--engine", choices=["auto", "model"], default="auto",
                    help="decoding: auto = tsopsd's lean decoder where supported; model = the model's forward")
    args = ap.parse_args()
    set_threads(args.threads)

    from tsopsd.checkpoint import load_checkpoint
    from tsopsd.config import load_config
    from tsopsd.policy import make_optimizer, prepare_policy
    from tsopsd.prompts import Prompt
    from tsopsd.rollout import sample_rollouts
    from tsopsd.step import train_step

    ck = load_checkpoint(args.model, device=args.device, dtype=args.dtype)
    dev = next(ck.model.parameters()).device
    cfg = load_config(None, {"model.path": str(args.model), "data.prompts": "-", "output.out": "-",
                             "train.mode": args.mode, "train.lr": 1e-5, "loss.chunk_size": args.chunk,
                             "train.micro_batch": args.micro_batch, "train.share_prompts": not args.no_share_prompts})
    policy = prepare_policy(ck.model, cfg.train)
    opt = make_optimizer(policy.trainable, lr=cfg.train.lr, weight_decay=0.0)
    tok = ck.tokenizer
    texts = bench_prompts(tok, max(16, args.prompts_per_step), args.prompt_tokens)
    prompts = [Prompt(t, tuple(tok(t)["input_ids"])) for t in texts]
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    measured = []
    for step in range(args.steps + 1):
        batch = [prompts[(step * args.prompts_per_step + i) % len(prompts)] for i in range(args.prompts_per_step)]
        sync()
        t0 = time.perf_counter()
        rollout = sample_rollouts(policy.student, tok, batch, samples_per_prompt=args.samples_per_prompt,
                                  max_new_tokens=args.length,
                                  batch_size=args.rollout_batch or len(batch) * args.samples_per_prompt,
                                  seed=step, suppress_eos=not args.natural_eos, engine=args.engine,
                                  share_prompts=not args.no_share_prompts)
        sync()
        t_gen = time.perf_counter() - t0
        timings: dict[str, float] = {}
        train_step(policy, rollout, tau=args.tau, cfg=cfg, timings=timings)
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(policy.trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t_opt = time.perf_counter() - t1
        n = int(rollout.completion_mask.sum())
        total = time.perf_counter() - t0
        row = {"step_s": total, "generation_s": t_gen, "teacher_s": timings["teacher"], "student_s": timings["student"],
               "optimizer_s": t_opt, "generated_tok_s": n / t_gen,
               "trained_tok_s": n / (timings["teacher"] + timings["student"] + t_opt)}
        print(f"step {step}{' (warm-up)' if step == 0 else ''}: " + "  ".join(
            f"{k} {v:.3f}" if k.endswith("_s") else f"{k} {v:.0f}" for k, v in row.items()), flush=True)
        if step > 0:
            measured.append(row)
    summarize("tsopsd", measured, {"mode": args.mode, "engine": args.engine, "model": str(args.model), "prompts": args.prompts_per_step,
                                   "samples": args.samples_per_prompt, "length": args.length,
                                   "prompt_tokens": len(prompts[0].ids), "share_prompts": not args.no_share_prompts, "device": dev.type,
                                   "dtype": str(ck.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
                                   "peak_memory_mib": peak_memory_mib(dev)})


if __name__ == "__main__":
    main()
