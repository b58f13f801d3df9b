"""The lab's exploration suite: is a reheated checkpoint a better start for continued RL?

    result = run_suite("runs/lab", SUITE, seeds=8, jobs=2)     # what `bench/paper_toy.py` runs

From the demo's checkpoints (SFT -> GRPO-collapsed -> reheated, built or reused under `work` exactly
as `tsopsd demo` builds them), the same budget of continued GRPO runs from each start, for each seed
and each of two rewards:

  starts   (a) collapsed, sampling at T=1            (what users do by default)
           (b) collapsed, sampling at T=tau          (rollout-level reheating)
           (c) reheated at the same fixed tau, T=1   (`tsopsd reheat --temperature tau`)
           (d) collapsed, T=1, with an entropy bonus (verl's `actor.entropy_coeff`)
           (e) reheated to the SFT model's entropy   (the demo's `--target-entropy-from sft`), T=1
           (f) the closed form at the same target    (`--method scale --target-entropy-from sft`: no training)
           (g) SSD-style: fine-tuned by cross-entropy on its own samples at T = (f)'s tau (off-policy heat)
           (h) a selective reheat to the same target (`teacher.heat`, the suite's `heat`), T=1
  rewards  "same":    any correct answer (the reward that collapsed the model)
           "shifted": correct *and* the first number larger (`sumtask.larger_first`)

Why the shifted reward tests the paper's claim: after collapse each prompt has one favourite answer.
Where the favourite breaks the new rule, a group of samples at T=1 is all wrong, every advantage is
0 and GRPO learns nothing on that prompt until a sample happens to differ. A start with more mass on
the other correct answers gets non-zero advantages there from the first step.

Seed s of every start uses the same prompt order, the same sampling seeds and the same evaluation
seeds (paired). Every run is evaluated at T=1 on all the task's prompts every `eval_every` steps and
at the end; `summarize` gives means with 95% bootstrap intervals over seeds and the paired
differences between starts (`tsopsd.lab.stats`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tsopsd.checkpoint import load_checkpoint
from tsopsd.lab.stats import interval, paired, pass_at_k
from tsopsd.lab.sumtask import REWARDS, parse_target

log = logging.getLogger(__name__)

TAU = 1.5  # (b) and (c): the same temperature, once in the sampler and once in the weights
ENTROPY_COEFF = 0.01  # (d): 10x verl's former default of 0.001, so that the bonus acts within this budget
THRESHOLDS = {"same": 0.95, "shifted": 0.9}  # pass@1 at T=1 that counts as "reached"


@dataclass(frozen=True)
class Start:
    label: str
    checkpoint: str  # a key of the suite's checkpoints
    temperature: float = 1.0
    entropy_coeff: float = 0.0


STARTS = (
    Start("(a) collapsed, T=1", "collapsed"),
    Start(f"(b) collapsed, T={TAU:g}", "collapsed", temperature=TAU),
    Start(f"(c) reheated tau={TAU:g}, T=1", "reheated_tau"),
    Start(f"(d) collapsed, entropy bonus {ENTROPY_COEFF:g}", "collapsed", entropy_coeff=ENTROPY_COEFF),
    Start("(e) reheated to SFT entropy, T=1", "reheated_target"),
    Start("(f) closed form to SFT entropy, T=1", "scaled_target"),
    Start("(g) SSD: own samples at T=tau(f), T=1", "ssd"),
    Start("(h) selective reheat to SFT entropy, T=1", "selective_target"),
)
# The comparisons the tables show: each reheated start against each baseline, the two reheats, and the closed form,
# SSD and the selective reheat against what they must beat.
COMPARISONS = tuple((x, y) for x in (2, 4) for y in (0, 1, 3)) + ((4, 2), (4, 5), (6, 5), (7, 1), (7, 4), (7, 5))
PASS_K = (1, 2, 4, 8, 16, 32, 64)  # unbiased pass@k at the end (final_samples >= 64)


@dataclass(frozen=True)
class Budget:
    rl_steps: int = 150
    eval_every: int = 10
    eval_samples: int = 8  # per prompt, on the curves
    final_samples: int = 64  # per prompt, at the end (pass@k up to 64)
    prompts_per_step: int = 8
    group_size: int = 8
    lr: float = 1e-3
    max_new_tokens: int = 8


SUITE = Budget()
QUICK_SUITE = Budget(rl_steps=30, eval_every=10, eval_samples=4, final_samples=16)


# ---- one continued-RL run --------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, tokenizer, prompts, verifier: Callable[[int, str], bool], *, samples: int, seed: int,
             max_new_tokens: int = 8) -> dict:
    """At T=1 on every prompt: pass@1, pass@8, distinct correct answers per prompt, mean token entropy."""
    from tsopsd.distributions import entropy
    from tsopsd.rollout import sample_rollouts
    from tsopsd.scoring import completion_hidden, head_logits

    r = sample_rollouts(model, tokenizer, prompts, samples_per_prompt=samples, max_new_tokens=max_new_tokens,
                        seed=seed, batch_size=len(prompts) * samples)
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in r.completions()]
    per_prompt: dict[int, list[str]] = {}
    for i, t in zip(r.prompt_index.tolist(), texts):
        per_prompt.setdefault(i, []).append(t)
    ks = [k for k in PASS_K if k <= samples]
    passk, distinct = {k: [] for k in ks}, []
    for i, ts in per_prompt.items():
        ok = [verifier(i, t) for t in ts]
        for k in ks:
            passk[k].append(pass_at_k(len(ts), sum(ok), k))
        distinct.append(len({t.strip() for t, good in zip(ts, ok) if good}))
    h = float(entropy(head_logits(model, completion_hidden(model, r))).mean())
    n = len(per_prompt)
    mean = {k: sum(v) / n for k, v in passk.items()}
    return {"pass@1": mean[1], "pass@8": mean.get(8, mean[max(ks)]), "pass@k": {str(k): v for k, v in mean.items()},
            "distinct_correct": sum(distinct) / n, "entropy": h}


def continued_rl(job: dict) -> dict:
    """One run: `job` = {folder, prompts, start (Start as dict), reward, seed, budget (Budget as dict)}."""
    from tsopsd.lab.grpo import grpo
    from tsopsd.prompts import load_prompts

    start, budget, seed = Start(**job["start"]), Budget(**job["budget"]), job["seed"]
    ck = load_checkpoint(job["folder"], device="cpu")
    prompts = load_prompts(job["prompts"], ck.tokenizer)
    targets = [parse_target(p.text) for p in prompts]
    reward = REWARDS[job["reward"]]

    def verifier(i: int, text: str) -> bool:
        return reward(targets[i], text)

    def point(step: int, samples: int) -> dict:  # the evaluation seed depends on seed and step only: paired
        return {"step": step, **evaluate(ck.model, ck.tokenizer, prompts, verifier, samples=samples,
                                         seed=10_007 * seed + step, max_new_tokens=budget.max_new_tokens)}

    curve = [point(0, budget.eval_samples)]

    def on_step(step: int, record: dict) -> None:
        if (step + 1) % budget.eval_every == 0 and step + 1 < budget.rl_steps:
            curve.append(point(step + 1, budget.eval_samples))

    started = time.monotonic()
    history = grpo(ck.model, ck.tokenizer, prompts, verifier, steps=budget.rl_steps,
                   prompts_per_step=budget.prompts_per_step, group_size=budget.group_size,
                   max_new_tokens=budget.max_new_tokens, lr=budget.lr, sampling_temperature=start.temperature,
                   entropy_coeff=start.entropy_coeff, seed=1000 + seed, on_step=on_step)
    final = point(budget.rl_steps, budget.final_samples)
    curve.append(point(budget.rl_steps, budget.eval_samples))  # the curve keeps one sample size throughout
    return {"start": start.label, "reward": job["reward"], "seed": seed, "seconds": time.monotonic() - started,
            "train_reward": [h["reward"] for h in history], "train_entropy": [h["entropy"] for h in history],
            "curve": curve, "final": final}


# ---- the suite -----------------------------------------------------------------------------------

def steps_to(curve: list[dict], threshold: float, budget: Budget) -> tuple[int, bool]:
    """First evaluated step with pass@1 >= threshold; (rl_steps + eval_every, False) when never reached."""
    for p in curve:
        if p["pass@1"] >= threshold:
            return p["step"], True
    return budget.rl_steps + budget.eval_every, False


def per_seed(runs: list[dict], budget: Budget) -> dict[str, list[float]]:
    """The summary numbers of each run of one (start, reward), in seed order."""
    runs = sorted(runs, key=lambda r: r["seed"])
    tail = max(1, min(10, budget.rl_steps))
    out: dict[str, list[float]] = {k: [r["final"][k] for r in runs] for k in ("pass@1", "pass@8", "distinct_correct",
                                                                              "entropy")}
    out["train_reward"] = [sum(r["train_reward"][-tail:]) / tail for r in runs]
    # re-collapse: the entropy left after continued RL, as a share of the start's (curve points share a sample size)
    out["entropy_kept"] = [r["curve"][-1]["entropy"] / max(r["curve"][0]["entropy"], 1e-9) for r in runs]
    for k in PASS_K:  # "k=K": the pass@k curve's points; pass@64 is also a metric of the tables
        if runs and all(str(k) in r["final"].get("pass@k", {}) for r in runs):
            out[f"k={k}"] = [r["final"]["pass@k"][str(k)] for r in runs]
    if "k=64" in out:
        out["pass@64"] = out["k=64"]
    reached = [steps_to(r["curve"], THRESHOLDS[r["reward"]], budget) for r in runs]
    out["steps_to_threshold"] = [float(s) for s, _ in reached]
    out["reached"] = [float(ok) for _, ok in reached]
    return out


METRICS = ("pass@1", "pass@8", "pass@64", "train_reward", "distinct_correct", "entropy", "entropy_kept",
           "steps_to_threshold")


def summarize(runs: list[dict], budget: Budget) -> dict:
    """Per reward: each start's mean and 95% interval per metric, and the paired differences."""
    out = {}
    for reward in REWARDS:
        values = {s.label: per_seed([r for r in runs if r["reward"] == reward and r["start"] == s.label], budget)
                  for s in STARTS}
        values = {k: v for k, v in values.items() if v["pass@1"]}
        starts = {label: {m: interval(v[m]) for m in METRICS if m in v} | {"reached": int(sum(v["reached"]))}
                  | {"pass@k": {str(k): interval(v[f"k={k}"]) for k in PASS_K if f"k={k}" in v}}
                  for label, v in values.items()}
        pairs = {}
        for x, y in COMPARISONS:
            a, b = STARTS[x].label, STARTS[y].label
            if a in values and b in values:
                pairs[f"{a} - {b}"] = {m: paired(values[a][m], values[b][m]) for m in METRICS
                                       if m in values[a] and m in values[b]}
        if starts:
            out[reward] = {"threshold": THRESHOLDS[reward], "starts": starts, "differences": pairs,
                           "per_seed": values}
    return out


def build_checkpoints(work: Path, *, quick: bool, fresh: bool, heat: str = "forking") -> dict[str, Path]:
    """The demo's SFT, collapsed and reheated-to-SFT-entropy checkpoints, a reheat at fixed TAU, the closed form at
    the SFT entropy, the SSD-style baseline at the closed form's tau and a selective reheat (`heat`) to the SFT
    entropy; each built once under `work` and reused."""
    from tsopsd.config import load_config
    from tsopsd.errors import TrainingStopped
    from tsopsd.lab.demo import CONFIG, FULL, QUICK, run_demo
    from tsopsd.loop import reheat

    size = QUICK if quick else FULL
    run_demo(work, quick=quick, fresh=fresh, show_progress=False)
    base = {"model.path": str(work / "collapsed"), "data.prompts": str(work / "prompts.jsonl"), "seed": size.seed,
            "train.steps": size.reheat_steps}
    fixed, scaled, selective = work / f"reheated-tau{TAU:g}", work / "scaled", work / f"reheated-{heat}"
    to_sft = {"teacher.temperature": None, "teacher.target_entropy_from": str(work / "sft")}
    for folder, keys in ((fixed, {"teacher.temperature": TAU, "teacher.target_entropy_from": None}),
                         (scaled, to_sft | {"teacher.method": "scale"}),
                         (selective, to_sft | {"teacher.heat": heat})):
        if not folder.is_dir():
            log.info("reheat %s -> %s", keys, folder)
            try:
                reheat(load_config(CONFIG, base | keys | {"output.out": str(folder)}), show_progress=False)
            except TrainingStopped as e:  # a guard stop writes the last good weights: the lab uses them, and says so
                log.warning("%s: %s", folder, e)
    ssd = work / "ssd"
    if not ssd.is_dir():
        tau = json.loads((scaled / "reheat_report.json").read_text())["teacher_temperature"]
        build_ssd(work / "collapsed", work / "prompts.jsonl", ssd, temperature=tau, seed=size.seed)
    return {"sft": work / "sft", "collapsed": work / "collapsed", "reheated_tau": fixed,
            "reheated_target": work / "reheated", "scaled_target": scaled, "ssd": ssd, "selective_target": selective,
            "prompts": work / "prompts.jsonl"}


def build_ssd(collapsed: Path, prompts_file: Path, out: Path, *, temperature: float, seed: int,
              samples: int = 32, epochs: int = 3, lr: float = 5e-4, batch: int = 256) -> None:
    """The off-policy way to put a temperature into weights (simple self-distillation, SSD): sample the collapsed
    model at T = `temperature` on every prompt, then fine-tune it (all weights) by cross-entropy on those
    completions. Written as a checkpoint with `ssd.json` (its settings and losses)."""
    from tsopsd.prompts import load_prompts
    from tsopsd.rollout import sample_rollouts
    from tsopsd.writing import atomic_output

    ck = load_checkpoint(collapsed, device="cpu")
    model, tok = ck.model, ck.tokenizer
    prompts = load_prompts(prompts_file, tok)
    with torch.no_grad():
        r = sample_rollouts(model, tok, prompts, samples_per_prompt=samples, max_new_tokens=8, temperature=temperature,
                            seed=seed, batch_size=len(prompts) * samples)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    n = r.input_ids.shape[0]
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(batch):
            ids, mask, comp = r.input_ids[idx], r.attention_mask[idx], r.completion_mask[idx]
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target, keep = ids[:, 1:], comp[:, 1:].bool()
            loss = torch.nn.functional.cross_entropy(logits[keep], target[keep])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
    model.eval()
    with atomic_output(out, overwrite=True) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "ssd.json").write_text(json.dumps({"temperature": temperature, "samples_per_prompt": samples,
                                                  "epochs": epochs, "lr": lr, "losses": losses}))


def describe_checkpoints(paths: dict[str, Path], budget: Budget) -> dict:
    """Each checkpoint before continued RL: both rewards at T=1, and drift from the collapsed model
    (top-1 agreement, top-5 overlap, KL, per-layer hidden-state similarity)."""
    from tsopsd.metrics import measure
    from tsopsd.prompts import load_prompts

    ref = load_checkpoint(paths["collapsed"], device="cpu").model
    out = {}
    for name in ("sft", "collapsed", "reheated_tau", "reheated_target", "scaled_target", "ssd", "selective_target"):
        ck = load_checkpoint(paths[name], device="cpu")
        prompts = load_prompts(paths["prompts"], ck.tokenizer)
        targets = [parse_target(p.text) for p in prompts]
        row = {}
        for reward, fn in REWARDS.items():
            row[reward] = evaluate(ck.model, ck.tokenizer, prompts, lambda i, t, fn=fn, ts=targets: fn(ts[i], t),
                                   samples=budget.final_samples, seed=4242, max_new_tokens=budget.max_new_tokens)
        m = measure(ck.model, ck.tokenizer, prompts, reference=ref, samples_per_prompt=budget.final_samples,
                    max_new_tokens=budget.max_new_tokens, seed=4242, batch_size=len(prompts) * budget.final_samples)
        r = m["reference"]
        row["vs_collapsed"] = {"top1_agreement": r["top1_agreement"], "top5_overlap": r["top5_overlap"],
                               "kl_model_ref": r["kl_model_ref"], "layers": r["layers"]}
        out[name] = row
    return out


def _worker() -> None:
    from tsopsd.console import setup_logging

    setup_logging(quiet=True)  # no weight-loading bars from every run
    torch.set_num_threads(1)


def run_suite(work: str | Path, budget: Budget = SUITE, *, seeds: int = 8, quick: bool = False, jobs: int = 1,
              fresh: bool = False, on_done: Callable[[int, int, dict], None] | None = None,
              heat: str = "forking") -> dict:
    """Build or reuse the checkpoints, run every (start, reward, seed), summarize. JSON-ready."""
    work = Path(work)
    started = time.monotonic()
    paths = build_checkpoints(work, quick=quick, fresh=fresh, heat=heat)
    built = time.monotonic() - started
    checkpoints = describe_checkpoints(paths, budget)
    todo = [{"folder": str(paths[s.checkpoint]), "prompts": str(paths["prompts"]), "start": asdict(s),
             "reward": reward, "seed": seed, "budget": asdict(budget)}
            for reward in REWARDS for seed in range(seeds) for s in STARTS]
    runs = []
    if jobs <= 1:
        for job in todo:
            runs.append(continued_rl(job))
            if on_done:
                on_done(len(runs), len(todo), runs[-1])
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # Tiny models spend their time in per-op overhead, not in maths: one thread per process, several
        # processes, is faster than one process with several threads.
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker) as pool:
            for future in as_completed([pool.submit(continued_rl, job) for job in todo]):
                runs.append(future.result())
                if on_done:
                    on_done(len(runs), len(todo), runs[-1])
    runs.sort(key=lambda r: (r["reward"], r["seed"], r["start"]))
    n_prompts = len(paths["prompts"].read_text().splitlines())
    return {"budget": asdict(budget), "seeds": seeds, "quick": quick, "tau": TAU, "entropy_coeff": ENTROPY_COEFF,
            "heat": heat,
            "prompts": n_prompts, "starts": [asdict(s) for s in STARTS], "checkpoints": checkpoints,
            "summary": summarize(runs, budget), "runs": runs,
            "seconds": {"checkpoints": built, "total": time.monotonic() - started}}


# ---- the results folder ----------------------------------------------------------------------------

def machine() -> str:
    """CPU model, cores and the vector extensions that matter for timings, and torch's version."""
    import os
    import platform

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or "unknown CPU"
    flags = set(fields.get("flags", "").split())
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model}, {os.cpu_count()} cores, {vector}, torch {torch.__version__}"


def _cell(ci: dict, digits: int = 3) -> str:
    return f"{ci['mean']:.{digits}f} [{ci['low']:.{digits}f}, {ci['high']:.{digits}f}]"


MIN_SEEDS = 8  # fewer paired seeds than this: the tables say so, and no difference is called real


def _diff(ci: dict, digits: int = 3) -> str:
    text = f"{ci['mean']:+.{digits}f} [{ci['low']:+.{digits}f}, {ci['high']:+.{digits}f}]"
    return f"**{text}**" if ci["real"] and ci["n"] >= MIN_SEEDS else text


LABELS = {"pass@1": "pass@1", "pass@8": "pass@8", "pass@64": "pass@64", "train_reward": "train reward (last 10)",
          "distinct_correct": "distinct correct / prompt", "entropy": "entropy (nats)",
          "entropy_kept": "entropy kept (end / start)", "steps_to_threshold": "steps to threshold"}


def markdown(result: dict, command: str) -> str:
    """The results as Markdown: checkpoints, then per reward each start with intervals and the paired
    differences (bold where the interval excludes 0)."""
    b = result["budget"]
    lines = [
        "# TS-OPSD toy lab: exploration suite\n",
        f"Command: `{command}`. Machine: {machine()}. Wall time {result['seconds']['total']:.0f} s "
        f"({result['seconds']['checkpoints']:.0f} s building or loading checkpoints).\n",
        f"Continued GRPO from each start: {b['rl_steps']} steps of {b['prompts_per_step']} prompts x "
        f"{b['group_size']} samples, lr {b['lr']:g}, {result['seeds']} paired seeds. Evaluation at T=1 on all "
        f"{result['prompts']} prompts: every {b['eval_every']} steps with {b['eval_samples']} samples per prompt "
        f"(curves), at the end with {b['final_samples']} (tables). tau = {result['tau']:g}; entropy bonus "
        f"coefficient {result['entropy_coeff']:g}. Intervals: 95% percentile bootstrap over seeds; a difference "
        "is **bold** (real) only when its paired interval excludes 0"
        + (".\n" if result["seeds"] >= MIN_SEEDS else f"; with {result['seeds']} seeds (< {MIN_SEEDS}) nothing is: a "
           "smoke run, not evidence.\n"),
        "## Checkpoints before continued RL\n",
        "| checkpoint | entropy | pass@1 same | pass@1 shifted | distinct correct (same) | top-1 agreement vs "
        "collapsed | top-5 overlap | KL(model‖collapsed) | hidden cosine per layer | linear CKA per layer |",
        "|---" * 10 + "|",
    ]
    for name, c in result["checkpoints"].items():
        v, layers = c["vs_collapsed"], c["vs_collapsed"]["layers"] or {"cosine": [], "linear_cka": []}
        cka = ", ".join("–" if x is None else f"{x:.3f}" for x in layers["linear_cka"])
        lines.append(f"| {name} | {c['same']['entropy']:.3f} | {c['same']['pass@1']:.3f} | {c['shifted']['pass@1']:.3f} "
                     f"| {c['same']['distinct_correct']:.2f} | {v['top1_agreement']:.3f} | {v['top5_overlap']:.3f} | "
                     f"{v['kl_model_ref']:.4f} | {', '.join(f'{x:.3f}' for x in layers['cosine'])} | {cka} |")
    for reward, s in result["summary"].items():
        what = {"same": "the same reward (any correct answer)",
                "shifted": "the shifted reward (correct and the first number larger)"}[reward]
        shown = [m for m in METRICS if all(m in row for row in s["starts"].values())]
        lines += [f"\n## Continued RL with {what}\n",
                  f"Steps to threshold: first evaluated step with pass@1 >= {s['threshold']}; a run that never gets "
                  f"there counts as {b['rl_steps'] + b['eval_every']} (so that mean is a lower bound). Entropy kept: "
                  "the entropy at the end of continued RL over the start's (how much of the heat RL leaves).\n",
                  "| start | " + " | ".join(LABELS[m] for m in shown) + " | reached |", "|---" * (len(shown) + 2) + "|"]
        for label, row in s["starts"].items():
            lines.append(f"| {label} | " + " | ".join(_cell(row[m], 1 if m == "steps_to_threshold" else 3)
                                                    for m in shown) + f" | {row['reached']}/{row['pass@1']['n']} |")
        lines += ["\nPaired differences (first minus second, same seeds):\n",
                  "| difference | " + " | ".join(LABELS[m] for m in shown) + " |", "|---" * (len(shown) + 1) + "|"]
        for pair, row in s["differences"].items():
            lines.append(f"| {pair} | " + " | ".join(_diff(row[m], 1 if m == "steps_to_threshold" else 3)
                                                   for m in shown) + " |")
        ks = sorted({int(k) for row in s["starts"].values() for k in row.get("pass@k", {})})
        if ks:
            lines += ["\nUnbiased pass@k at the end of continued RL (mean over seeds [95% interval]):\n",
                      "| start | " + " | ".join(f"k={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
            for label, row in s["starts"].items():
                lines.append(f"| {label} | " + " | ".join(_cell(row["pass@k"][str(k)]) if str(k) in row["pass@k"] else "–"
                                                        for k in ks) + " |")
    return "\n".join(lines) + "\n"


def curves(result: dict, reward: str) -> dict[str, dict[str, tuple[list, list, list, list]]]:
    """Panels for `save_band_plot`: train reward (10-step mean), pass@1, pass@8 and entropy over steps."""
    from tsopsd.lab.stats import interval as ci

    runs = [r for r in result["runs"] if r["reward"] == reward]
    panels: dict[str, dict] = {"train reward (10-step mean, at the start's T)": {}, "pass@1 at T=1": {},
                               "pass@8 at T=1": {}, "token entropy at T=1 (nats)": {}}
    for label in dict.fromkeys(r["start"] for r in runs):
        mine = [r for r in runs if r["start"] == label]
        steps = [p["step"] for p in mine[0]["curve"]]
        for title, key in zip(list(panels)[1:], ("pass@1", "pass@8", "entropy")):
            cis = [ci([r["curve"][i][key] for r in mine], resamples=2000) for i in range(len(steps))]
            panels[title][label] = (steps, [c["mean"] for c in cis], [c["low"] for c in cis], [c["high"] for c in cis])
        n = len(mine[0]["train_reward"])
        smooth = [[sum(r["train_reward"][max(0, i - 9):i + 1]) / (i + 1 - max(0, i - 9)) for i in range(n)] for r in mine]
        xs = list(range(9, n, 5)) or [n - 1]
        cis = [ci([s[i] for s in smooth], resamples=2000) for i in xs]
        panels["train reward (10-step mean, at the start's T)"][label] = (
            [x + 1 for x in xs], [c["mean"] for c in cis], [c["low"] for c in cis], [c["high"] for c in cis])
        at_end = result["summary"].get(reward, {}).get("starts", {}).get(label, {}).get("pass@k", {})
        if at_end:
            ks = sorted(at_end, key=int)
            panels.setdefault("pass@k at the end (k = 1..64)", {})[label] = (
                [int(k) for k in ks], [at_end[k]["mean"] for k in ks], [at_end[k]["low"] for k in ks],
                [at_end[k]["high"] for k in ks])
    return panels


def _rounded(obj, digits: int = 5):
    """`obj` with every float rounded (the per-step records of 80 runs are most of the JSON)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v, digits) for v in obj]
    return obj


def write_results(result: dict, out: str | Path, command: str) -> list[Path]:
    """results.json, results.md and one PNG per reward (when matplotlib is there) under `out`."""
    import json

    from tsopsd.lab.plots import have_matplotlib, save_band_plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md"]
    compact = _rounded({"command": command, "machine": machine(), **result})
    written[0].write_text(json.dumps(compact, separators=(",", ":")) + "\n")
    written[1].write_text(markdown(result, command))
    if have_matplotlib():
        for reward in result["summary"]:
            written.append(save_band_plot(out / f"continued_rl_{reward}.png", curves(result, reward),
                                          title=f"continued GRPO, {reward} reward: mean over "
                                                f"{result['seeds']} seeds, 95% bootstrap band"))
    return written
