"""The fixed-length bench end to end through the CLI: `tsopsd reheat` seconds per step against TRL's, and the floor.

    python bench/cli_step.py [--steps 6] [--repeats 2] [--threads 2] [--no-trl]

The job is `bench/compare.sh`'s step job: the random Qwen3 (8 layers x 512 hidden, vocab 8192, fp32;
its final norm scaled by 8, as `tsopsd reheat` refuses a near-uniform model), 8 prompts x 1 sample,
64-token completions, tau 1.5, LoRA (r=16, all linear layers) and full. tsopsd runs as users run
it, `python -m tsopsd reheat MODEL --prompts ... --config ...`, everything in: the rollout, the
teacher and student passes, the optimizer, the stop rules' rollback copy, metrics and state files.
Its time per step is the difference of a long run (2 + --steps steps) and a short one (2 steps),
divided by --steps, so start-up, the reports and the output's writing cancel. Completions stop at 64
tokens or at the tokenizer's EOS (the CLI cannot suppress it; TRL's runs are held to 64 tokens, so
an early EOS only makes tsopsd's step cheaper: `trained_tokens` says how many it trained).

TRL's figure is `bench/peer_trl.py`'s median step (min_new_tokens = 64) on the same job. Beside
each, the floor (`bench.common.step_floor`) at the matmul peak and memory bandwidth measured here.
Prints one line per run, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import PROMPTS, bandwidth, build_bench_model, matmul_peak, set_threads, step_floor  # noqa: E402

CONFIG = """\
model: {{device: cpu}}
rollout: {{prompts_per_step: 8, samples_per_prompt: 1, max_new_tokens: {length}, batch_size: 8}}
teacher: {{temperature: 1.5}}
train: {{mode: {mode}, lr: 1.0e-5, micro_batch: 8}}
stop: {{entropy_tolerance: 0.0, min_top1_agreement: 0.0}}
output: {{save: {save}, save_every: 0, eval_prompts: 0}}
"""


def sharpened(base: Path, factor: float = 8.0) -> Path:
    """The bench model with its final norm scaled by `factor`: a random model is near uniform, which
    `tsopsd reheat` refuses (nothing to reheat); sharpened, its entropy is a trained model's."""
    out = base.parent / f"{base.name}-sharp"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsopsd.lab.tiny import sharpen_

    model = AutoModelForCausalLM.from_pretrained(str(base))
    sharpen_(model, factor)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(out))
    return out


def reheat_seconds(model: Path, prompts: Path, config: Path, steps: int, out: Path, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "tsopsd", "reheat", str(model), "--prompts", str(prompts), "--out",
                        str(out), "--config", str(config), "--steps", str(steps), "--overwrite", "--quiet"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode not in (0, 4):  # a fixed number of steps: written, converged (0) or not (4)
        raise SystemExit(f"tsopsd reheat failed (exit {p.returncode}): {p.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="extra steps of the long run")
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--no-trl", action="store_true", help="skip TRL (not installed: pip install '.[bench]')")
    args = ap.parse_args()
    set_threads(args.threads)
    from transformers import AutoConfig, AutoTokenizer

    model = sharpened(build_bench_model(ROOT / "bench/out/models/q8x512", vocab=8192, hidden=512, layers=8))
    peak, bw = matmul_peak(), bandwidth()
    tok = AutoTokenizer.from_pretrained(str(model))
    prompt_tokens = statistics.mean(len(tok(p)["input_ids"]) for p in PROMPTS)
    result: dict = {"bench": "cli_step", "length": args.length, "threads": args.threads,
                    "matmul_peak_gflops": peak / 1e9, "bandwidth_gbs": bw / 1e9}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prompts = tmp / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
        for mode in args.modes.split(","):
            config = tmp / f"{mode}.yaml"
            config.write_text(CONFIG.format(length=args.length, mode=mode, save="adapter" if mode == "lora" else "merged"))
            ours, trl = [], []
            for rep in range(args.repeats):
                short = reheat_seconds(model, prompts, config, 2, tmp / "o", args.threads)
                long = reheat_seconds(model, prompts, config, 2 + args.steps, tmp / "o", args.threads)
                steps = [json.loads(line) for line in (tmp / "o" / "metrics.jsonl").read_text().splitlines()]
                tokens = statistics.mean(m["train/tokens"] for m in steps)
                ours.append((long - short) / args.steps)
                print(f"{mode} rep {rep}: tsopsd reheat {short:.1f} s (2 steps), {long:.1f} s ({2 + args.steps}): "
                      f"{ours[-1]:.3f} s/step, {tokens:.0f} trained tokens a step", flush=True)
                if not args.no_trl:
                    out = subprocess.run([sys.executable, "bench/peer_trl.py", "--model", str(model), "--mode", mode,
                                          "--prompts-per-step", "8", "--length", str(args.length), "--steps", "5",
                                          "--threads", str(args.threads)], cwd=ROOT, capture_output=True, text=True,
                                         check=True)
                    trl.append(json.loads(out.stdout.strip().splitlines()[-1])["median_step_s"])
                    print(f"{mode} rep {rep}: TRL {trl[-1]:.3f} s/step", flush=True)
            floor = step_floor(AutoConfig.from_pretrained(str(model)), mode=mode, prompts=8, samples=1,
                               prompt_tokens=prompt_tokens, length=args.length, peak=peak, bw=bw)["floor_s"]
            row = {"tsopsd_step_s": statistics.median(ours), "floor_s": floor, "trained_tokens": tokens}
            row["tsopsd_x_floor"] = row["tsopsd_step_s"] / floor
            if trl:
                row.update(trl_step_s=statistics.median(trl), trl_x_floor=statistics.median(trl) / floor,
                           tsopsd_vs_trl=row["tsopsd_step_s"] / statistics.median(trl))
            result[mode] = row
            print(f"{mode}: tsopsd {row['tsopsd_step_s']:.3f} s/step ({row['tsopsd_x_floor']:.2f}x floor {floor:.3f} s)"
                  + (f", TRL {row['trl_step_s']:.3f} s ({row['trl_x_floor']:.2f}x), ratio {row['tsopsd_vs_trl']:.2f}"
                     if trl else ""), flush=True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
