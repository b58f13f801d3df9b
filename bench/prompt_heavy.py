"""A prompt-heavy reheat step: shared prompt prefixes against the same step without them, and TRL's.

    python bench/prompt_heavy.py [--prompt-tokens 320] [--length 32] [--prompts 2] [--samples 4] [--repeats 2]

The job: the compare bench's random Qwen3 (8 layers x 512 hidden, vocab 8192, fp32), LoRA, 2 prompts of
~320 tokens (a long system prompt and question, grown from the bench prompts) x 4 samples, 32-token
completions (EOS suppressed): the prompt is 10x the completion, as with a chat model's system prompt
and short answers. Each run is its own process, alternating, --repeats times:
- `shared`: `bench/step.py` as tsopsd runs it (`train.share_prompts` true: each prompt prefilled
  once for its samples, and run once in the teacher and in the student pass);
- `unshared`: the same with `--no-share-prompts` (every row runs its own prompt everywhere);
- `trl`: `bench/peer_trl.py`, TRL's DistillationTrainer with each prompt k times in a row.

Beside every figure, the floor (`bench.common.step_floor`): the step's FLOPs, each prompt counted
once, at this machine's measured fp32 matmul peak, plus the bytes decode must stream at its measured
bandwidth. Prints one line per run, then one JSON line with the medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import bandwidth, build_bench_model, matmul_peak, set_threads, step_floor  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=320)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-trl", action="store_true", help="skip TRL (not installed: pip install '.[bench]')")
    args = ap.parse_args()
    set_threads(args.threads)
    model = build_bench_model(ROOT / "bench/out/models/q8x512", vocab=8192, hidden=512, layers=8)
    job = ["--model", str(model), "--mode", args.mode, "--prompts-per-step", str(args.prompts),
           "--samples-per-prompt", str(args.samples), "--prompt-tokens", str(args.prompt_tokens),
           "--length", str(args.length), "--steps", str(args.steps), "--threads", str(args.threads)]
    runs = {"shared": ["bench/step.py", *job], "unshared": ["bench/step.py", *job, "--no-share-prompts"]}
    if not args.no_trl:
        runs["trl"] = ["bench/peer_trl.py", *job]
    from transformers import AutoConfig

    peak, bw = matmul_peak(), bandwidth()
    times: dict[str, list[float]] = {k: [] for k in runs}
    prompt_tokens = None
    for rep in range(args.repeats):
        for name, cmd in runs.items():
            out = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            prompt_tokens = row["prompt_tokens"]
            times[name].append(row["median_step_s"])
            print(f"{name:9s} rep {rep}: median step {row['median_step_s']:.3f} s", flush=True)
    floor = step_floor(AutoConfig.from_pretrained(str(model)), mode=args.mode, prompts=args.prompts,
                       samples=args.samples, prompt_tokens=prompt_tokens, length=args.length, peak=peak, bw=bw)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"bench": "prompt_heavy", "mode": args.mode, "prompts": args.prompts, "samples": args.samples,
              "prompt_tokens": prompt_tokens, "length": args.length, "threads": args.threads,
              "matmul_peak_gflops": peak / 1e9, "bandwidth_gbs": bw / 1e9, "floor_s": floor["floor_s"],
              **{f"{k}_step_s": v for k, v in med.items()},
              **{f"{k}_x_floor": v / floor["floor_s"] for k, v in med.items()},
              "shared_vs_unshared": med["shared"] / med["unshared"]}
    if "trl" in med:
        result["shared_vs_trl"] = med["shared"] / med["trl"]
    print(f"floor {floor['floor_s']:.3f} s (matmul peak {peak / 1e9:.0f} GFLOP/s, bandwidth {bw / 1e9:.1f} GB/s)")
    for k, v in med.items():
        print(f"  {k:9s} {v:.3f} s  {v / floor['floor_s']:.2f}x floor")
    print(f"  shared / unshared {result['shared_vs_unshared']:.2f}"
          + (f"   shared / TRL {result['shared_vs_trl']:.2f}" if "trl" in med else ""))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
