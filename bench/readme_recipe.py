"""README step 3, as written, on collapsed toy models: does the shipped recipe reach its target, in how many steps?

    python bench/readme_recipe.py runs/demo runs/gpt2demo        # worlds that `tsopsd demo` (or build_models) made
    python bench/readme_recipe.py runs/demo --set train.max_lr_factor=1   # the same with a fixed lr

Each world is a folder with `sft/`, `collapsed/` and `prompts.jsonl`. For `--config lora` and `--config full` it runs
`tsopsd reheat WORLD/collapsed --prompts WORLD/prompts.jsonl --out OUT --config C --target-entropy-from WORLD/sft`
in a subprocess (one thread) and prints one row each: exit code, status, steps run, the lr factor pace reached,
the held-out entropy after against the target, and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(world: Path, config: str, out: Path, sets: list[str]) -> dict:
    cmd = [sys.executable, "-m", "tsopsd", "reheat", str(world / "collapsed"), "--prompts", str(world / "prompts.jsonl"),
           "--out", str(out), "--config", config, "--target-entropy-from", str(world / "sft"), "--quiet",
           *[a for kv in sets for a in ("--set", kv)]]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - t0
    report = json.loads((out / "reheat_report.json").read_text()) if (out / "reheat_report.json").is_file() else {}
    after = (report.get("target") or {}).get("after") or {}
    return {"world": world.name, "config": config, "exit": p.returncode, "status": report.get("status"),
            "steps": report.get("steps_run"), "lr_factor": (report.get("pace") or {}).get("lr_factor"),
            "target": report.get("target_entropy"), "after": after.get("entropy"),
            "after_interval": after.get("interval"), "relative_error": after.get("relative_error"),
            "seconds": seconds, "error": p.stderr.strip().splitlines()[-1] if p.returncode else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("worlds", nargs="+", type=Path)
    ap.add_argument("--configs", default="lora,full")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="also passed on: --set train.max_lr_factor=1 is the recipe with a fixed lr")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            for config in args.configs.split(","):
                rows.append(run(world, config, Path(tmp) / f"{world.name}-{config}", args.set))
                r = rows[-1]
                lo, hi = r["after_interval"] or (float("nan"), float("nan"))
                print(f"{r['world']:<12} {r['config']:<5} exit {r['exit']}  {r['status']!s:<13} {r['steps']!s:>4} steps  "
                      f"lr x{r['lr_factor']!s:<4} held-out {r['after'] or float('nan'):.4f} ({lo:.4f}-{hi:.4f}) vs "
                      f"{r['target'] or float('nan'):.4f}: {(r['relative_error'] or float('nan')):+.1%}  {r['seconds']:.0f} s "
                      f"{r['error']}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
