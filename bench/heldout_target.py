"""Does --target-entropy land on prompts the run never trained on? Steered against unsteered, two targets.

    python bench/heldout_target.py                     # ~10 min on 2 CPU cores (models built once under --work)
    python bench/heldout_target.py --targets 0.5 0.8 --steps 150

The demo's collapsed toy model (SFT on diverse answers, then GRPO), its 68 prompts split by *template and
problem*: the run trains on three phrasings ("sum {} =", "add to {} =", "split {} =") of the targets 4..16;
the held-out file is every prompt in the fourth phrasing ("pair for {} =") plus every phrasing of the targets
17..20 -- templates and problems the reheat never sees (the way users split by problem family).

For each target: one run steered on the held-out file (`--eval-prompts`, stop.heldout_every 5) and one
unsteered (stop.heldout_every 0, the training entropy meets the target); then each output measured
independently on the held-out file with `tsopsd measure-entropy`'s code (32 samples a prompt, --precision
0.05). Prints one table: held-out entropy with its 95% interval, its error against the target, the training
target the run ended on, steps, seconds, and the seconds spent measuring held-out prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tsopsd.checkpoint import load_checkpoint  # noqa: E402
from tsopsd.config import load_config  # noqa: E402
from tsopsd.console import setup_logging  # noqa: E402
from tsopsd.errors import TrainingStopped  # noqa: E402
from tsopsd.intervals import describe  # noqa: E402
from tsopsd.lab.demo import CONFIG, QUICK, build_models  # noqa: E402
from tsopsd.lab.sumtask import PHRASINGS, parse_target  # noqa: E402
from tsopsd.loop import reheat  # noqa: E402
from tsopsd.metrics import measure  # noqa: E402
from tsopsd.prompts import load_prompts  # noqa: E402

HELD_TARGETS = range(17, 21)


def split(prompts_file: Path, folder: Path) -> tuple[Path, Path]:
    lines = prompts_file.read_text().splitlines(keepends=True)
    held_phrase = PHRASINGS[3].split("{}")[0]
    held = [line for line in lines if json.loads(line)["prompt"].startswith(held_phrase)
            or parse_target(json.loads(line)["prompt"]) in HELD_TARGETS]
    train = [line for line in lines if line not in held]
    (folder / "train.jsonl").write_text("".join(train))
    (folder / "held.jsonl").write_text("".join(held))
    return folder / "train.jsonl", folder / "held.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "heldout-target")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.8])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    setup_logging(quiet=False)
    _, collapsed, prompts = build_models(args.work / "models", QUICK)
    train, held = split(prompts, args.work)
    n_train, n_held = len(train.read_text().splitlines()), len(held.read_text().splitlines())
    rows = []
    for target in args.targets:
        for steered in (True, False):
            out = args.work / f"t{target}-{'steered' if steered else 'unsteered'}"
            cfg = load_config(CONFIG, {
                "model.path": str(collapsed), "data.prompts": str(train), "data.eval_prompts": str(held),
                "output.out": str(out), "output.overwrite": True, "teacher.target_entropy_from": None,
                "teacher.target_entropy": target, "train.steps": args.steps, "seed": args.seed,
                "stop.heldout_every": 5 if steered else 0, "output.eval_samples_per_prompt": 8,
                "output.eval_prompts": None})  # every prompt of the held-out file (demo.yaml holds out 12)
            started = time.perf_counter()
            try:
                report = reheat(cfg, show_progress=False)
            except TrainingStopped as e:
                report = e.report
                if not report:
                    raise
            seconds = time.perf_counter() - started
            steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            ck = load_checkpoint(out, device="cpu")
            m = measure(ck.model, ck.tokenizer, load_prompts(held, ck.tokenizer), samples_per_prompt=32,
                        max_new_tokens=8, seed=args.seed + 7, precision=0.05, max_samples_per_prompt=128)
            h, ci = m["entropy"]["mean"], m["intervals"]["entropy"]
            rows.append({"target": target, "steered": steered, "heldout": h, "interval": ci,
                         "error": h / target - 1, "training_target": report["target"]["training_target"],
                         "training_entropy": sum(s["train/student_entropy"] for s in steps[-5:]) / len(steps[-5:]),
                         "steps": report["steps_run"], "seconds": seconds,
                         "heldout_seconds": sum(s["time/heldout"] for s in steps),
                         "stop": report["stop_reason"]})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\ntrain {n_train} prompts, held-out {n_held} prompts (other template or other targets); "
          f"{args.steps} steps max, demo.yaml settings; held-out measured with 32+ samples a prompt\n")
    print("| target | steered | held-out entropy (95% CI) | vs target | training entropy | training target | steps "
          "| seconds | of which held-out |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['target']} | {'yes' if r['steered'] else 'no'} | {describe(r['heldout'], r['interval'], digits=3)} "
              f"| {r['error']:+.1%} | {r['training_entropy']:.3f} | {r['training_target']:.3f} | {r['steps']} "
              f"| {r['seconds']:.0f} | {r['heldout_seconds']:.1f} |")
    for r in rows:
        print(f"target {r['target']} {'steered' if r['steered'] else 'unsteered'}: {r['stop']}")


if __name__ == "__main__":
    main()
