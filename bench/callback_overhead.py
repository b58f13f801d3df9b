"""What `ReheatCallback` costs a TRL run when it never fires: the same GRPO run with and without it.

    python bench/callback_overhead.py                      # the demo's collapsed model (runs/demo, built if absent)
    python bench/callback_overhead.py --steps 40 --every 10 --held-out 12

Runs `trl.GRPOTrainer` for `--steps` steps on the demo's prompts (4 prompts x 4 generations a step, 8 new tokens,
CPU, one thread), once without the callback and once with one that measures every `--every` steps on `--held-out`
prompts and whose rule cannot fire (ratio 0.01). Prints each run's seconds, the callback's measurements and the
overhead as a share of the run. Needs TRL (`pip install -e .[trl]`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--held-out", type=int, default=12)
    ap.add_argument("--samples", type=int, default=4, help="samples per held-out prompt in a measurement")
    args = ap.parse_args()
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsopsd.integrations.trl import ReheatCallback
    from tsopsd.lab.demo import FULL, build_models
    from tsopsd.lab.sumtask import is_correct, parse_target

    torch.set_num_threads(1)
    _, collapsed, prompts = build_models(args.work, FULL)
    texts = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(collapsed)

    def reward(prompts, completions, **kwargs):
        return [float(is_correct(parse_target(p), c)) for p, c in zip(prompts, completions)]

    def run(callbacks) -> float:
        cfg = trl.GRPOConfig(output_dir=str(args.work / "overhead-grpo"), per_device_train_batch_size=4,
                             num_generations=4, max_completion_length=8, max_steps=args.steps, learning_rate=1e-4,
                             logging_steps=10, report_to="none", save_strategy="no", use_cpu=True, bf16=False, seed=0)
        trainer = trl.GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(collapsed), reward_funcs=[reward], args=cfg,
                                  processing_class=tok, callbacks=callbacks,
                                  train_dataset=Dataset.from_list([{"prompt": t} for t in texts[:-args.held_out]]))
        t0 = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t0

    plain = run([])
    callback = ReheatCallback(texts[-args.held_out:], every=args.every, ratio=0.01, consecutive=1, max_new_tokens=8,
                              samples_per_prompt=args.samples, precision=None)
    watched = run([callback])
    measurements = 1 + args.steps // args.every
    print(f"GRPO, {args.steps} steps, CPU 1 thread: without the callback {plain:.1f} s, with it {watched:.1f} s "
          f"({measurements} measurements of {args.held_out} prompts x {args.samples}, every {args.every} steps and at "
          f"the start): overhead {watched - plain:+.1f} s ({(watched - plain) / plain:+.1%}), "
          f"{(watched - plain) / measurements:.2f} s a measurement; reheats {len(callback.reheats)}")


if __name__ == "__main__":
    main()
