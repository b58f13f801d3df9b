"""`tsopsd demo`: the whole job on a laptop, nothing downloaded.

    tsopsd demo --out runs/demo

1. SFT: a tiny causal LM learns the toy task ("sum 12 =" -> " 5 7", any correct pair) from diverse
   correct answers: accurate and diverse.
2. Collapse: GRPO with the verifier's reward (`tsopsd.lab.grpo`) until entropy has fallen and completions
   per prompt are near-identical.
3. Reheat: the real `tsopsd.loop.reheat` path with `tsopsd/lab/demo.yaml` (package data).
4. One before/after table for the three checkpoints (entropy, distinct completions, accuracy,
   agreement and KL with the collapsed one) and pictures (PNG with matplotlib, else terminal charts).

Each stage is cached in its folder under --out (written atomically, so a folder that exists is
complete) and seeded; `--fresh` rebuilds everything.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from tsopsd.checkpoint import load_checkpoint
from tsopsd.console import progress
from tsopsd.errors import TrainingStopped
from tsopsd.writing import atomic_output

log = logging.getLogger(__name__)

CONFIG = Path(__file__).resolve().parent / "demo.yaml"  # package data: the demo runs from a wheel


@dataclass(frozen=True)
class DemoSize:
    sft_steps: int = 1500
    rl_steps: int = 300
    rl_lr: float = 1e-3
    rl_group_size: int = 16
    reheat_steps: int = 200
    eval_samples: int = 32
    phrasings: int = 4  # each target asked four ways: held-out prompts are new phrasings of trained targets
    arch: str = "qwen3"
    seed: int = 0


FULL = DemoSize()
QUICK = DemoSize(sft_steps=800, rl_steps=150, reheat_steps=80, eval_samples=16)


def _build_sft(path: Path, size: DemoSize, advance) -> None:
    from tsopsd.lab.sumtask import build_task_model, build_task_tokenizer, train_sft

    tok = build_task_tokenizer(phrasings=size.phrasings)
    model = build_task_model(tok, seed=size.seed, arch=size.arch)
    losses = train_sft(model, tok, steps=size.sft_steps, seed=size.seed, phrasings=size.phrasings, on_step=advance)
    with atomic_output(path, overwrite=True) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "sft_loss.json").write_text(json.dumps(losses))


def _build_collapsed(sft: Path, path: Path, prompts_file: Path, size: DemoSize, advance) -> None:
    from tsopsd.lab.grpo import grpo
    from tsopsd.prompts import load_prompts

    ck = load_checkpoint(sft, device="cpu")
    prompts = load_prompts(prompts_file, ck.tokenizer)
    history = grpo(ck.model, ck.tokenizer, prompts, verifier(prompts), steps=size.rl_steps,
                   lr=size.rl_lr, group_size=size.rl_group_size, seed=size.seed, on_step=lambda step, record: advance(1))
    with atomic_output(path, overwrite=True) as tmp:
        ck.model.save_pretrained(str(tmp))
        ck.tokenizer.save_pretrained(str(tmp))
        (tmp / "rl_history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))


def _reheat(sft: Path, collapsed: Path, path: Path, prompts_file: Path, size: DemoSize, show_progress: bool) -> None:
    from tsopsd.config import load_config
    from tsopsd.loop import reheat

    cfg = load_config(CONFIG, {"model.path": str(collapsed), "data.prompts": str(prompts_file), "output.out": str(path),
                               "teacher.target_entropy_from": str(sft), "train.steps": size.reheat_steps,
                               "seed": size.seed, "output.overwrite": True})
    try:
        reheat(cfg, show_progress=show_progress, config_file=CONFIG)
    except TrainingStopped as e:
        if e.report is None:  # nothing trained: nothing to show
            raise
        log.warning("%s: the demo shows the weights kept", e)  # a guard stopped it; the last good state was written


def verifier(prompts):
    """(prompt index, completion) -> correct, for the task's `prompts` in file order."""
    from tsopsd.lab.sumtask import is_correct, parse_target

    targets = [parse_target(p.text) for p in prompts]
    return lambda i, text: is_correct(targets[i], text)


def evaluate(folders: dict[str, Path], prompts_file: Path, reference: Path, *, samples: int, seed: int,
             show_progress: bool = False) -> dict:
    """Measure each checkpoint on the task's prompts against `reference` (the collapsed model)."""
    from tsopsd.metrics import measure
    from tsopsd.prompts import load_prompts

    ref = load_checkpoint(reference, device="cpu").model
    results = {}
    with progress(show_progress) as task:
        for name, folder in folders.items():
            ck = load_checkpoint(folder, device="cpu")
            prompts = load_prompts(prompts_file, ck.tokenizer)
            results[name] = measure(ck.model, ck.tokenizer, prompts, reference=ref, samples_per_prompt=samples,
                                    max_new_tokens=8, seed=seed + 1, verifier=verifier(prompts),
                                    keep_token_entropy=True, progress=lambda what, total, n=name: task(f"{n}: {what}", total))
    return results


def build_models(out: str | Path, size: DemoSize = FULL, *, show_progress: bool = False) -> tuple[Path, Path, Path]:
    """Stages 1 and 2 (each skipped when its folder exists): (SFT folder, collapsed folder, prompt file)."""
    from tsopsd.lab.sumtask import write_prompts

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(size.seed)
    prompts_file = write_prompts(out / "prompts.jsonl", phrasings=size.phrasings)
    sft, collapsed = out / "sft", out / "collapsed"
    with progress(show_progress) as task:  # minutes each on a CPU: a bar, or a PROGRESS line every 10% in a log
        if not sft.is_dir():
            log.info("1/3 SFT on diverse correct answers (%d steps) -> %s", size.sft_steps, sft)
            _build_sft(sft, size, task("1/3 SFT", size.sft_steps))
        if not collapsed.is_dir():
            log.info("2/3 GRPO until entropy collapses (%d steps) -> %s", size.rl_steps, collapsed)
            _build_collapsed(sft, collapsed, prompts_file, size, task("2/3 GRPO", size.rl_steps))
    return sft, collapsed, prompts_file


def run_demo(out: str | Path = "runs/demo", *, quick: bool = False, fresh: bool = False,
             show_progress: bool = True, threads: int | None = 1) -> dict:
    """Build (or reuse) SFT, collapsed and reheated checkpoints; measure them; draw the pictures.

    `threads`: torch's CPU threads for the demo (None: as they are). One by default: the toy model's time is
    per-operation overhead, and with two a busy machine's spinning threads stall it (docs/lab.md).

    Returns:
        {"results": {name: measure result}, "pictures": [paths], "charts": text or None, "out": str}
    """
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    log.info("demo: %d CPU thread(s) of %d cores", torch.get_num_threads(), len(os.sched_getaffinity(0)))
    try:
        return _run_demo(Path(out), QUICK if quick else FULL, fresh=fresh, show_progress=show_progress)
    finally:
        torch.set_num_threads(before)


def _run_demo(out: Path, size: DemoSize, *, fresh: bool, show_progress: bool) -> dict:
    if fresh and out.exists():
        shutil.rmtree(out)
    sft, collapsed, prompts_file = build_models(out, size, show_progress=show_progress)
    reheated = out / "reheated"
    if not reheated.is_dir():
        log.info("3/3 reheat with %s (%d steps) -> %s", CONFIG.name, size.reheat_steps, reheated)
        _reheat(sft, collapsed, reheated, prompts_file, size, show_progress)
    log.info("measuring the three checkpoints (%d samples per prompt)", size.eval_samples)
    results = evaluate({"sft": sft, "collapsed": collapsed, "reheated": reheated}, prompts_file, collapsed,
                       samples=size.eval_samples, seed=size.seed, show_progress=show_progress)
    rl = [json.loads(line)["entropy"] for line in (collapsed / "rl_history.jsonl").read_text().splitlines()]
    rh = [json.loads(line) for line in (reheated / "metrics.jsonl").read_text().splitlines()]
    curves = {"GRPO (collapse)": rl, "reheat: student": [m["train/student_entropy"] for m in rh],
              "reheat: teacher": [m["train/teacher_entropy"] for m in rh]}
    histograms = {name: r.pop("token_entropy") for name, r in results.items()}
    from tsopsd.lab.plots import have_matplotlib, save_pngs, terminal_charts

    pictures, charts = [], None
    if have_matplotlib():
        offsets = {"reheat: student": len(rl), "reheat: teacher": len(rl)}
        pictures = [str(p) for p in save_pngs(out, curves, histograms, offsets=offsets,
                                             curve_title="mean token entropy: GRPO steps, then reheat steps")]
    else:
        charts = terminal_charts(curves, histograms)
    summary = {"results": results, "pictures": pictures, "charts": charts, "out": str(out),
               "reheat_report": json.loads((reheated / "reheat_report.json").read_text())}
    (out / "demo_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def show_summary(summary: dict) -> None:
    """The demo's before/after table, its report against the target, its charts and where it wrote them."""
    from rich.console import Console

    from tsopsd.intervals import describe
    from tsopsd.output import teacher_line
    from tsopsd.tables import metrics_table

    report = summary["reheat_report"]
    con = Console()

    con.print(metrics_table(summary["results"], target=report["target_entropy"], title=(
        f"tsopsd demo: SFT -> GRPO-collapsed -> reheated to the SFT model's entropy: {teacher_line(report, 2)}, "
        f"{report['steps_run']} steps; all prompts; reference for KL/agreement: the collapsed model")))
    target = report.get("target") or {}
    for name, where in (("after", "held out of training"), ("after_training_prompts", "training prompts")):
        if target.get(name):
            r = target[name]
            con.print(f"the run's report, {where} ({r['prompts']} prompts x {r['samples'] // r['prompts']}): entropy "
                      f"{describe(r['entropy'], r['interval'])} (95% interval) against the target "
                      f"{target['entropy']:.4f}: {r['relative_error']:+.1%}", highlight=False)
    if summary["charts"]:
        con.print(summary["charts"], highlight=False)
    for picture in summary["pictures"]:
        con.print(f"wrote {picture}")
    con.print(f"checkpoints and results in {summary['out']}/")

