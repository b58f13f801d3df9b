"""The lab: does reheating give continued RL a better start? A toy-scale check of the paper's claims.

    python bench/paper_toy.py --suite exploration            # 13 min on 2 CPU cores (8 seeds, 2 jobs)
    python bench/paper_toy.py --suite exploration --quick    # ~2 min, 2 seeds: a smoke run, not evidence
    python bench/paper_toy.py --suite ablations              # the reheat itself: tau, divergence, LoRA vs full

exploration (`tsopsd/lab/exploration.py`): from the demo's checkpoints, the same budget of continued
GRPO from eight starts -- (a) collapsed at T=1, (b) collapsed at T=tau, (c) reheated at fixed tau,
(d) collapsed with an entropy bonus, (e) reheated to the SFT model's entropy, (f) the closed form at that
entropy, (g) SSD (fine-tuned on its own samples at (f)'s tau), (h) a selective reheat (--heat) -- under the reward that
collapsed the model and under a shifted one, for paired seeds. Means with 95% bootstrap intervals,
paired differences, curves with bands. Writes results.md, results.json and PNGs under --results.

ablations: variants of the reheat (tau in {1.2, 1.5, 2.0}; forward KL, reverse KL, JSD; LoRA vs full)
from the collapsed checkpoint: entropy, accuracy, distinct correct answers, agreement with the
collapsed model and per-layer hidden-state similarity to it.

Checkpoints are built once under --work (as `tsopsd demo` builds them) and reused; --fresh rebuilds.
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
from tsopsd.lab import exploration  # noqa: E402
from tsopsd.lab.demo import CONFIG as DEMO_CONFIG  # noqa: E402
from tsopsd.lab.demo import FULL, QUICK, verifier  # noqa: E402
from tsopsd.loop import reheat  # noqa: E402
from tsopsd.metrics import measure  # noqa: E402
from tsopsd.prompts import load_prompts  # noqa: E402


def ablation(paths: dict, out: Path, overrides: dict, steps: int) -> dict:
    cfg = load_config(DEMO_CONFIG, {
        "model.path": str(paths["collapsed"]), "data.prompts": str(paths["prompts"]), "output.out": str(out),
        "output.overwrite": True, "train.steps": steps, "output.eval_prompts": 0, **overrides})
    report = reheat(cfg, show_progress=False)
    ck = load_checkpoint(out, device="cpu")
    prompts = load_prompts(paths["prompts"], ck.tokenizer)
    m = measure(ck.model, ck.tokenizer, prompts, reference=load_checkpoint(paths["collapsed"], device="cpu").model,
                samples_per_prompt=16, max_new_tokens=8, seed=5, verifier=verifier(prompts),
                batch_size=len(prompts) * 16)
    r = m["reference"]
    return {"entropy": m["entropy"]["mean"], "accuracy": m["accuracy"], "top1_agreement": r["top1_agreement"],
            "kl_to_collapsed": r["kl_model_ref"], "hidden_cosine": r["layers"]["cosine"],
            "linear_cka": r["layers"]["linear_cka"], "teacher_temperature": report["teacher_temperature"],
            "stop_reason": report["stop_reason"]}


def ablations(args) -> str:
    size = QUICK if args.quick else FULL
    started = time.time()
    paths = exploration.build_checkpoints(args.work, quick=args.quick, fresh=args.fresh)
    sft_entropy = {"teacher.target_entropy_from": str(paths["sft"])}  # the demo's own: tracked SFT entropy
    variants = {"target = SFT entropy (demo)": sft_entropy}
    variants |= {f"tau={t}": {"teacher.temperature": t, "teacher.target_entropy_from": None} for t in (1.2, 1.5, 2.0)}
    variants |= {d: {"loss.divergence": d, **sft_entropy} for d in ("reverse_kl", "jsd")}
    variants |= {"lora (lr 1e-3)": {"train.mode": "lora", "train.lr": 1e-3, **sft_entropy}}
    results = {name: ablation(paths, args.work / "ablation", ov, size.reheat_steps) for name, ov in variants.items()}
    keys = ("entropy", "accuracy", "top1_agreement", "kl_to_collapsed", "teacher_temperature")
    lines = [f"# TS-OPSD toy lab: reheat ablations\n\nCommand: `{command(args)}`. Machine: {exploration.machine()}. "
             f"From the collapsed checkpoint, {size.reheat_steps} steps, tsopsd/lab/demo.yaml otherwise; measured on "
             f"all prompts x 16 samples at T=1 against the collapsed model. Wall time {time.time() - started:.0f} s.\n",
             "| variant | " + " | ".join(keys) + " | hidden cosine per layer | stop |", "|---" * (len(keys) + 3) + "|"]
    lines += [f"| {n} | " + " | ".join(f"{v[k]:.3f}" for k in keys) + " | "
              + ", ".join(f"{c:.3f}" for c in v["hidden_cosine"]) + f" | {v['stop_reason']} |" for n, v in results.items()]
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.json").write_text(json.dumps({"command": command(args), "machine": exploration.machine(),
                                                           "ablations": results}, indent=1) + "\n")
    (args.results / "results.md").write_text("\n".join(lines) + "\n")
    return (args.results / "results.md").read_text()


def explore(args) -> str:
    budget = exploration.QUICK_SUITE if args.quick else exploration.SUITE
    seeds = args.seeds or (2 if args.quick else 8)

    def done(i: int, n: int, run: dict) -> None:
        print(f"[{i}/{n}] {run['reward']:>7} seed {run['seed']} {run['start']}: pass@1 "
              f"{run['curve'][0]['pass@1']:.3f} -> {run['final']['pass@1']:.3f} ({run['seconds']:.0f} s)", flush=True)

    result = exploration.run_suite(args.work, budget, seeds=seeds, quick=args.quick, jobs=args.jobs,
                                   fresh=args.fresh, on_done=done, heat=args.heat)
    exploration.write_results(result, args.results, command(args))
    return (args.results / "results.md").read_text()


def command(args) -> str:
    parts = ["python bench/paper_toy.py", f"--suite {args.suite}"] + (["--quick"] if args.quick else []) + \
        ([f"--heat {args.heat}"] if args.suite == "exploration" else [])
    return " ".join(parts + ([f"--seeds {args.seeds}"] if args.seeds else []))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("exploration", "ablations"), default="exploration")
    ap.add_argument("--quick", action="store_true", help="smaller budget: checks that it runs, not evidence")
    ap.add_argument("--work", type=Path, default=None, help="checkpoints (cached; default runs/lab or runs/lab-quick)")
    ap.add_argument("--results", type=Path, default=None, help="tables and PNGs (default results/<suite>)")
    ap.add_argument("--seeds", type=int, default=None, help="paired seeds (default 8; 2 with --quick)")
    ap.add_argument("--jobs", type=int, default=2, help="continued-RL runs in parallel, one thread each")
    ap.add_argument("--fresh", action="store_true", help="rebuild the cached checkpoints")
    ap.add_argument("--heat", choices=("forking", "plausible"), default="forking",
                    help="the selective reheat of start (h) (teacher.heat)")
    args = ap.parse_args(argv)
    args.work = args.work or ROOT / "runs" / ("lab-quick" if args.quick else "lab")
    args.results = args.results or ROOT / "results" / (args.suite + ("-quick" if args.quick else ""))
    setup_logging(quiet=True)
    print(explore(args) if args.suite == "exploration" else ablations(args))


if __name__ == "__main__":
    main()
