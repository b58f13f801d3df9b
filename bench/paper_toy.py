"""The lab: does reheating give continued RL a better start? A toy-scale check of the paper's claims.

    python bench/paper_toy.py                 # full budget (~5 min on 2 CPU cores)
    python bench/paper_toy.py --quick         # smaller budget (~1 min)

From the demo's GRPO-collapsed checkpoint (built or reused under --work, exactly as `tsopsd demo`
builds it), run the same budget of continued GRPO under three starts, for several seeds:

  (a) continued RL from the collapsed checkpoint, sampling at T=1;
  (b) continued RL from the collapsed checkpoint, sampling at T=tau (rollout-level reheating);
  (c) continued RL from the reheated checkpoint (TS-OPSD with tsopsd/lab/demo.yaml), sampling at T=1.

Reported per start (mean over seeds): reward during RL, then at the end accuracy (T=1), pass@1/4/16,
distinct correct answers per prompt among 16 samples, and mean token entropy; curves of reward and
entropy over RL steps. Ablations of the reheat itself (tau in {1.2, 1.5, 2.0}; forward KL, reverse
KL, JSD; LoRA vs full): entropy, accuracy, distinct correct answers and top-1 agreement with the
collapsed model after reheating. Writes results.md, results.json and PNGs under --results.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tsopsd.checkpoint import load_checkpoint  # noqa: E402
from tsopsd.config import load_config  # noqa: E402
from tsopsd.console import setup_logging  # noqa: E402
from tsopsd.distributions import entropy  # noqa: E402
from tsopsd.lab.demo import CONFIG as DEMO_CONFIG  # noqa: E402
from tsopsd.lab.demo import FULL, QUICK, run_demo  # noqa: E402
from tsopsd.lab.grpo import grpo  # noqa: E402
from tsopsd.lab.sumtask import is_correct, parse_target  # noqa: E402
from tsopsd.prompts import load_prompts  # noqa: E402
from tsopsd.reheat import reheat  # noqa: E402
from tsopsd.rollout import sample_rollouts  # noqa: E402
from tsopsd.scoring import completion_hidden, head_logits  # noqa: E402


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


@torch.no_grad()
def evaluate(model, tokenizer, prompts, *, samples: int = 16, seed: int = 12345) -> dict:
    r = sample_rollouts(model, tokenizer, prompts, samples_per_prompt=samples, max_new_tokens=8, seed=seed,
                        batch_size=len(prompts) * samples)
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in r.completions()]
    per_prompt: dict[int, list[str]] = {}
    for i, t in zip(r.prompt_index.tolist(), texts):
        per_prompt.setdefault(i, []).append(t)
    acc, p1, p4, p16, distinct = [], [], [], [], []
    for i, ts in per_prompt.items():
        ok = [is_correct(parse_target(prompts[i].text), t) for t in ts]
        c = sum(ok)
        acc.append(c / len(ts))
        p1.append(pass_at_k(len(ts), c, 1))
        p4.append(pass_at_k(len(ts), c, 4))
        p16.append(pass_at_k(len(ts), c, min(16, len(ts))))
        distinct.append(len({t.strip() for t, good in zip(ts, ok) if good}))
    h = float(entropy(head_logits(model, completion_hidden(model, r))).mean())
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"accuracy": mean(acc), "pass@1": mean(p1), "pass@4": mean(p4), "pass@16": mean(p16),
            "distinct_correct": mean(distinct), "entropy": h}


def continued_rl(folder: Path, prompts_file: Path, *, steps: int, temperature: float, seed: int) -> dict:
    ck = load_checkpoint(folder, device="cpu")
    prompts = load_prompts(prompts_file, ck.tokenizer)
    torch.manual_seed(seed)
    history = grpo(ck.model, ck.tokenizer, prompts, lambda i, t: is_correct(parse_target(prompts[i].text), t), steps=steps,
                   lr=1e-3, group_size=8, sampling_temperature=temperature, seed=1000 + seed)
    return {"history": history, "final": evaluate(ck.model, ck.tokenizer, prompts, seed=777 + seed)}


def ablation(collapsed: Path, prompts_file: Path, out: Path, overrides: dict, steps: int) -> dict:
    cfg = load_config(DEMO_CONFIG, {
        "model.path": str(collapsed), "data.prompts": str(prompts_file), "output.out": str(out),
        "output.overwrite": True, "train.steps": steps, "output.eval_prompts": 0, **overrides})
    report = reheat(cfg, show_progress=False)
    ck = load_checkpoint(out, device="cpu")
    ref = load_checkpoint(collapsed, device="cpu").model
    prompts = load_prompts(prompts_file, ck.tokenizer)
    result = evaluate(ck.model, ck.tokenizer, prompts)
    from tsopsd.metrics import measure

    m = measure(ck.model, ck.tokenizer, prompts, reference=ref, samples_per_prompt=8, max_new_tokens=8, seed=5)
    result["top1_agreement"] = m["reference"]["top1_agreement"]
    result["kl_to_collapsed"] = m["reference"]["kl_model_ref"]
    result["stop_reason"] = report["stop_reason"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller budget")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "lab", help="checkpoints (cached)")
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "paper_toy", help="tables and PNGs")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--fresh", action="store_true", help="rebuild the cached checkpoints")
    args = ap.parse_args()
    setup_logging(quiet=True)
    size = QUICK if args.quick else FULL
    seeds = args.seeds or (2 if args.quick else 3)
    rl_steps = 60 if args.quick else 120
    tau = 1.5
    started = time.time()
    demo = run_demo(args.work, quick=args.quick, fresh=args.fresh, show_progress=False)
    collapsed, reheated = args.work / "collapsed", args.work / "reheated"
    prompts_file = args.work / "prompts.jsonl"
    tau = demo["reheat_report"]["teacher_temperature"]
    starts = {"(a) collapsed, T=1": (collapsed, 1.0), f"(b) collapsed, T={tau:g}": (collapsed, tau),
              "(c) reheated, T=1": (reheated, 1.0)}
    runs = {name: [continued_rl(folder, prompts_file, steps=rl_steps, temperature=t, seed=s) for s in range(seeds)]
            for name, (folder, t) in starts.items()}
    initial = {}
    for name, folder in (("collapsed", collapsed), ("reheated", reheated)):
        ck = load_checkpoint(folder, device="cpu")
        initial[name] = evaluate(ck.model, ck.tokenizer, load_prompts(prompts_file, ck.tokenizer))
    abl_steps = size.reheat_steps
    sft_entropy = {"teacher.target_entropy_from": str(args.work / "sft")}  # the demo's own: tracked SFT entropy
    variants = {"target = SFT entropy (demo)": sft_entropy}
    variants |= {f"tau={t}": {"teacher.temperature": t, "teacher.target_entropy_from": None} for t in (1.2, 1.5, 2.0)}
    variants |= {d: {"loss.divergence": d, **sft_entropy} for d in ("reverse_kl", "jsd")}
    variants |= {"lora (lr 1e-3)": {"train.mode": "lora", "train.lr": 1e-3, **sft_entropy}}
    abl = {name: ablation(collapsed, prompts_file, args.work / "ablation", ov, abl_steps)
           for name, ov in variants.items()}

    keys = ("accuracy", "pass@1", "pass@4", "pass@16", "distinct_correct", "entropy")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    summary = {name: {k: mean([r["final"][k] for r in rs]) for k in keys} for name, rs in runs.items()}
    for name, rs in runs.items():
        summary[name]["reward_last10"] = mean([mean([h["reward"] for h in r["history"][-10:]]) for r in rs])
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.json").write_text(json.dumps(
        {"budget": {"continued_rl_steps": rl_steps, "seeds": seeds, "demo_size": size.__dict__, "tau": tau},
         "initial": initial, "continued_rl": summary, "ablations": abl,
         "curves": {n: [[h["reward"] for h in r["history"]] for r in rs] for n, rs in runs.items()}}, indent=1))
    cmd = "python bench/paper_toy.py" + (" --quick" if args.quick else "")
    n_prompts = len(prompts_file.read_text().splitlines())
    lines = [f"# TS-OPSD toy lab\n\nCommand: `{cmd}`; {seeds} seeds; continued GRPO: {rl_steps} steps "
             f"(8 prompts x 8 samples, lr 1e-3) from each start; evaluation: {n_prompts} prompts x 16 samples at T=1.\n",
             "## Starting points\n", "| checkpoint | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(f"{v[k]:.3f}" for k in keys) + " |" for n, v in initial.items()]
    lines += ["\n## After the same continued-RL budget (mean over seeds)\n",
              "| start | reward (last 10 steps) | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    lines += [f"| {n} | {v['reward_last10']:.3f} | " + " | ".join(f"{v[k]:.3f}" for k in keys) + " |"
              for n, v in summary.items()]
    akeys = ("entropy", "accuracy", "distinct_correct", "top1_agreement", "kl_to_collapsed")
    lines += [f"\n## Reheat ablations (from the collapsed checkpoint, {abl_steps} steps, tsopsd/lab/demo.yaml otherwise)\n",
              "| variant | " + " | ".join(akeys) + " | stop |", "|---" * (len(akeys) + 2) + "|"]
    lines += [f"| {n} | " + " | ".join(f"{v[k]:.3f}" for k in akeys) + f" | {v['stop_reason']} |"
              for n, v in abl.items()]
    lines.append(f"\nWall time: {time.time() - started:.0f} s.\n")
    (args.results / "results.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name, rs in runs.items():
            for key, ax in zip(("reward", "entropy"), axes):
                ys = [mean([r["history"][i][key] for r in rs]) for i in range(rl_steps)]
                ax.plot(range(1, rl_steps + 1), ys, label=name)
        for key, ax in zip(("reward (mean over seeds)", "token entropy (mean over seeds)"), axes):
            ax.set_xlabel("continued GRPO step")
            ax.set_title(key)
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(args.results / "continued_rl.png", dpi=110)
    except ImportError:
        pass
    print((args.results / "results.md").read_text())


if __name__ == "__main__":
    main()
