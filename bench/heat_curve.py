"""Entropy against accuracy: where does each way of heating the demo's collapsed model land?

    python bench/heat_curve.py                                  # the demo's world under runs/demo (built if absent)
    python bench/heat_curve.py --targets 0.3 0.5 0.8 --jobs 2 --results results/heat_curve

For each target entropy (nats, on the demo's held-out prompts) and each method -- TS-OPSD with `teacher.heat`
uniform, forking (the 20% most uncertain positions) and plausible (the input's candidates with p >= 0.001 p_max),
and the closed form (`--method scale`, no training) -- it reheats the collapsed model with the demo's config
(tsopsd/lab/demo.yaml, full fine-tuning), then measures every output as the demo measures its models: all 68
prompts x 32 samples at T=1, against the collapsed model, with the task's verifier. Prints one row per run (entropy
and accuracy with 95% intervals, distinct-2, top-1 agreement with the input, tau, steps, wall seconds, status)
and writes results.md, results.json and curve.png under --results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tsopsd.lab.demo import CONFIG, FULL, build_models, evaluate  # noqa: E402

METHODS = {  # name: extra reheat flags
    "closed form": ["--method", "scale"],
    "uniform": ["--set", "teacher.heat=uniform"],
    "forking": ["--set", "teacher.heat=forking"],
    "plausible": ["--set", "teacher.heat=plausible"],
}


def reheat(world: Path, out: Path, target: float, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "tsopsd", "reheat", str(world / "collapsed"), "--prompts", str(world / "prompts.jsonl"),
           "--out", str(out), "--config", str(CONFIG), "--target-entropy", str(target), "--overwrite", "--quiet",
           "--json", *extra]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    report = json.loads(p.stdout) if p.stdout.strip() else {}
    return {"code": p.returncode, "seconds": time.perf_counter() - t0, "status": report.get("status"),
            "steps": report.get("steps_run"), "tau": report.get("teacher_temperature"),
            "error": p.stderr.strip().splitlines()[-1] if p.returncode not in (0, 4) and p.stderr.strip() else ""}


def row(name: str, m: dict) -> dict:
    return {"entropy": m["entropy"]["mean"], "entropy_ci": m["intervals"]["entropy"], "accuracy": m["accuracy"],
            "accuracy_ci": m["intervals"].get("accuracy"), "distinct2": m.get("distinct_2"),
            "top1_agreement": (m.get("reference") or {}).get("top1_agreement")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "demo", help="the demo's world (sft/, collapsed/)")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.65, 0.8])
    ap.add_argument("--samples", type=int, default=32, help="samples per prompt in the measurement")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "heat_curve")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    sft, collapsed, prompts = build_models(args.work, FULL)
    runs = args.work.parent / "heat_curve"  # the reheated checkpoints (under runs/, never committed)
    jobs = [(method, t) for t in args.targets for method in METHODS]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = dict(zip(jobs, pool.map(lambda j: reheat(args.work, runs / f"{j[0].replace(' ', '_')}-{j[1]}", j[1],
                                                                METHODS[j[0]]), jobs)))
    folders = {"sft": sft, "collapsed": collapsed} | {
        f"{m}@{t}": runs / f"{m.replace(' ', '_')}-{t}" for (m, t), r in done.items() if r["code"] in (0, 4)}
    measured = evaluate(folders, prompts, collapsed, samples=args.samples, seed=0)
    table = []
    for name, m in measured.items():
        method, _, target = name.partition("@")
        r = done.get((method, float(target))) if target else None
        table.append({"name": name, "method": method, "target": float(target) if target else None,
                      **row(name, m), **({k: r[k] for k in ("seconds", "status", "steps", "tau")} if r else {})})
    for (method, t), r in done.items():
        if r["code"] not in (0, 4):
            table.append({"name": f"{method}@{t}", "method": method, "target": t, "failed": r["error"], **r})
    head = "| run | target | entropy (95% CI) | accuracy (95% CI) | distinct-2 | top-1 agr. | tau | steps | s | status |"
    lines = [head, "|" + "---|" * 10]
    for r in table:
        if "failed" in r:
            lines.append(f"| {r['name']} | {r['target']} | failed: {r['failed']} |  |  |  |  |  |  | exit {r['code']} |")
            continue
        ci = r["entropy_ci"] or (r["entropy"], r["entropy"])
        acc_ci = r["accuracy_ci"] or (r["accuracy"], r["accuracy"])
        agree = "" if r["top1_agreement"] is None else f"{r['top1_agreement']:.3f}"
        tau = "" if r.get("tau") is None else f"{r['tau']:.3f}"
        lines.append(f"| {r['name']} | {r['target'] or ''} | {r['entropy']:.3f} ({ci[0]:.3f}-{ci[1]:.3f}) | "
                     f"{r['accuracy']:.3f} ({acc_ci[0]:.3f}-{acc_ci[1]:.3f}) | {r['distinct2'] or 0:.3f} | {agree} | "
                     f"{tau} | {r.get('steps', '')} | {r.get('seconds', 0):.0f} | {r.get('status') or ''} |")
    text = "\n".join(lines)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.md").write_text(text + "\n")
    (args.results / "results.json").write_text(json.dumps(table, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method in METHODS:
        pts = sorted((r["entropy"], r["accuracy"]) for r in table if r["method"] == method and "failed" not in r)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
    for name in ("sft", "collapsed"):
        r = next(r for r in table if r["name"] == name)
        ax.scatter([r["entropy"]], [r["accuracy"]], marker="*", s=150, label=name, zorder=3)
    ax.set_xlabel("mean token entropy at T=1 (nats), all 68 prompts")
    ax.set_ylabel("accuracy")
    ax.set_title("Heating the demo's collapsed model: entropy against accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.results / "curve.png", dpi=120)


if __name__ == "__main__":
    main()
