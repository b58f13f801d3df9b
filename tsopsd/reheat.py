"""`tsopsd reheat`: the TS-OPSD loop.

    report = reheat(load_config("configs/tiny-cpu.yaml", {"model.path": "ckpt", "data.prompts": "p.jsonl",
                                                           "output.out": "reheated"}))

One flat loop, one step at a time:

    prompts -> on-policy rollouts of the *current* student at T=1
            -> frozen teacher hidden states (no grad) and student hidden states
            -> per-token divergence to softmax(z0 / tau) over the full vocabulary, in chunks
            -> guards (NaN, drift, convergence) -> optimizer step -> metrics.jsonl

Resumable state lives in a sibling folder ``OUT.tsopsd-run/`` while the run is going (every
``save_every`` steps and on Ctrl-C); the output folder itself is written once, complete, through a
temporary folder and a rename. Sampling seeds derive from (seed, step), so a resumed run repeats
exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch

from tsopsd import __version__, dist
from tsopsd.checkpoint import atomic_output, check_output_dir, load_checkpoint, saved_dtype
from tsopsd.config import Config, save_config
from tsopsd.console import progress
from tsopsd.errors import TrainingStopped, TsopsdError
from tsopsd.loss import ChunkStats, Workspace, chunked_divergence_backward
from tsopsd.metrics import measure
from tsopsd.model import Policy, make_optimizer, prepare_policy
from tsopsd.prompts import Prompt, load_prompts
from tsopsd.rollout import Rollout, sample_rollouts
from tsopsd.scoring import completion_hidden, head_logits
from tsopsd.teacher import calibrate_temperature, check_teacher

log = logging.getLogger(__name__)
T = TypeVar("T")

STATE_FILE = "state.pt"


def run_dir_for(out: Path) -> Path:
    return out.with_name(out.name + ".tsopsd-run")


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 17) % (2**63 - 1)


def prompts_for_step(n_prompts: int, per_step: int, step: int, seed: int) -> list[int]:
    """Indices of the prompts for `step`: a seeded permutation per epoch, read in order."""
    out = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(i, n_prompts)
        g = torch.Generator().manual_seed(step_seed(seed, -1 - epoch))
        out.append(int(torch.randperm(n_prompts, generator=g)[pos]))
    return out


@dataclass
class StepResult:
    step: int
    loss: float
    student_entropy: float
    teacher_entropy: float
    kl_student_original: float
    top1_agreement: float
    completion_length: float
    tokens: int
    generated_tokens_per_s: float
    trained_tokens_per_s: float
    lr: float
    grad_norm: float | None
    seconds: float

    def line(self, total: int) -> str:
        return (f"step {self.step + 1}/{total}  loss {self.loss:.4f}  H student {self.student_entropy:.3f}  "
                f"H teacher {self.teacher_entropy:.3f}  top-1 agree {self.top1_agreement:.3f}  "
                f"len {self.completion_length:.1f}  gen {self.generated_tokens_per_s:.0f} tok/s  "
                f"train {self.trained_tokens_per_s:.0f} tok/s")


def train_step(policy: Policy, rollout: Rollout, *, tau: float, cfg: Config, normalizer: float | None = None,
               sharded: bool = False, timings: dict[str, float] | None = None) -> ChunkStats:
    """Accumulate gradients of the mean divergence over the rollout's completion tokens.

    Args:
        normalizer: divide the summed divergence by this many tokens (default: this rollout's count;
            data-parallel runs pass the global count so that summed gradients give the global mean).
        sharded: FSDP: every rank must run the same forwards and backwards, so no micro-batch is skipped
            and one without completion tokens still back-propagates (zeros).
        timings: if given, seconds spent in teacher scoring and in the student's forward/backward are
            added under ``teacher`` and ``student`` (the device is synchronized for honest numbers).

    Returns statistics summed over tokens. Gradients are left in `.grad` (not applied).
    """
    n_tokens = normalizer if normalizer is not None else int(rollout.completion_mask.sum())
    total = ChunkStats()
    mb = cfg.train.micro_batch
    clock = _Clock(policy.teacher.device, timings)
    workspace = Workspace()  # chunk x V buffers shared by all micro-batches of the step
    for s in range(0, rollout.input_ids.shape[0], mb):
        part = rollout.rows(s, s + mb)
        if not part.completion_mask.any() and not sharded:
            continue
        with clock("teacher"), torch.no_grad():
            teacher_hidden = policy.teacher.hidden(part)  # (n, D), adapter disabled in LoRA mode
        with clock("student"):
            student_hidden = completion_hidden(policy.student, part)  # (n, D), with grad
            stats = chunked_divergence_backward(
                student_hidden, teacher_hidden, partial(head_logits, policy.student), policy.teacher.logits,
                normalizer=n_tokens, divergence=cfg.loss.divergence, teacher_temperature=tau, beta=cfg.loss.beta,
                chunk_size=cfg.loss.chunk_size, always_backward=sharded, workspace=workspace)
        total.add(stats)
        del teacher_hidden, student_hidden
        if total.nonfinite and not sharded:
            break
    return total


def _everywhere(env: dist.DistEnv, fn: Callable[[], T], *, prefix: str = "") -> T:
    """Run `fn` (on every rank, or as given), and raise its TsopsdError on *every* rank, naming the ranks."""
    result, error = None, None
    try:
        result = fn()
    except TsopsdError as e:
        if not env.enabled:
            raise
        error = str(e)
    if env.enabled:
        error = dist.gather_errors(env, error)
        if error:
            raise TsopsdError(prefix + error)
    return result


def _all_sum_stats(env: dist.DistEnv, stats: ChunkStats, device) -> ChunkStats:
    if not env.enabled:
        return stats
    d, se, te, kl, top1, bad = dist.all_sum(env, [stats.divergence, stats.student_entropy, stats.teacher_entropy,
                                                  stats.kl_student_original, stats.top1_agreement,
                                                  float(stats.nonfinite)], device)
    return ChunkStats(divergence=d, student_entropy=se, teacher_entropy=te, kl_student_original=kl,
                      top1_agreement=top1, nonfinite=bad > 0)


class _Clock:
    """Adds wall time of `with clock(name):` blocks to a dict (no-op without one)."""

    def __init__(self, device: torch.device, timings: dict[str, float] | None):
        self.device, self.timings = device, timings

    def __call__(self, name: str):
        if self.timings is None:
            return contextlib.nullcontext()
        return self._timed(name)

    @contextlib.contextmanager
    def _timed(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"tsopsd": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def _save_state(run_dir: Path, state: dict) -> None:
    tmp = run_dir / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, run_dir / STATE_FILE)


def _comparable(cfg: Config) -> dict:
    """The config fields that must match for a resume to continue the same run."""
    d = cfg.to_dict()
    d["output"] = {k: v for k, v in d["output"].items() if k not in ("overwrite", "resume", "save_every")}
    d["train"] = {k: v for k, v in d["train"].items() if k != "steps"}
    d["model"] = {k: v for k, v in d["model"].items() if k != "device"}
    return d


def _eval_report(student, tokenizer, prompts: list[Prompt], cfg: Config, reference=None, all_done=None) -> dict | None:
    if cfg.output.eval_prompts == 0:
        return None
    return measure(student, tokenizer, prompts[: cfg.output.eval_prompts], reference=reference,
                   samples_per_prompt=cfg.output.eval_samples_per_prompt, max_new_tokens=cfg.rollout.max_new_tokens,
                   batch_size=cfg.rollout.batch_size, seed=cfg.seed, all_done=all_done)


def _model_card(report: dict) -> str:
    b, a = report.get("before") or {}, report.get("after") or {}
    ent = lambda r: f"{r['entropy']['mean']:.4f}" if r else "n/a"  # noqa: E731
    agree = a.get("reference", {}).get("top1_agreement") if a else None
    return (
        "---\nlibrary_name: transformers\ntags: [tsopsd, reheated]\n---\n\n"
        f"# Reheated with tsopsd {__version__}\n\n"
        f"Input checkpoint: `{report['input']}`. Method: TS-OPSD (temperature-scaled on-policy self-distillation), "
        f"teacher temperature tau = {report['teacher_temperature']:.4f}, divergence `{report['divergence']}`, "
        f"mode `{report['mode']}`, {report['steps_run']} steps (stopped: {report['stop_reason']}).\n\n"
        f"| | before | after |\n|---|---|---|\n| mean token entropy (nats) | {ent(b)} | {ent(a)} |\n"
        f"| top-1 agreement with input | 1.000 | {agree if agree is None else f'{agree:.3f}'} |\n\n"
        "Files: `config.yaml` (the resolved run config), `metrics.jsonl` (one line per step), "
        "`reheat_report.json` (before/after metrics).\n"
    )


def reheat(cfg: Config, *, show_progress: bool = True, interrupt_at_step: int | None = None,
           on_trained: Callable[[torch.nn.Module], None] | None = None) -> dict:
    """Run TS-OPSD on `cfg.model.path` and write the output folder `cfg.output.out`.

    Args:
        cfg: a validated config (see `config.load_config`).
        show_progress: progress bar / lines on stderr.
        interrupt_at_step: testing aid; behave as if Ctrl-C arrived at the start of this step.
        on_trained: called with the trained student before it is saved (tests compare logits).

    Returns:
        The report written to ``reheat_report.json``.

    Raises:
        TsopsdError: bad input (checkpoint, prompts, output folder, unreachable target entropy).
        TrainingStopped: a non-finite loss; the last good state was written to the output.
        KeyboardInterrupt: after saving resumable state.
    """
    started = time.monotonic()
    if interrupt_at_step is None and os.environ.get("TSOPSD_TEST_INTERRUPT_AT_STEP"):
        interrupt_at_step = int(os.environ["TSOPSD_TEST_INTERRUPT_AT_STEP"])  # testing aid for launched runs
    out = Path(cfg.output.out)
    run_dir = run_dir_for(out)
    env, device = dist.init(cfg.model.device)
    fsdp = cfg.train.parallel == "fsdp"
    if fsdp and not env.enabled:
        env, device = dist.init_single(device)  # FSDP needs a process group, even of one
    show_progress = show_progress and env.is_main

    def preflight() -> None:
        check_output_dir(out, overwrite=cfg.output.overwrite)
        if cfg.output.resume and not (run_dir / STATE_FILE).is_file():
            raise TsopsdError(f"nothing to resume: no saved state in {run_dir}")
        if not cfg.output.resume and run_dir.exists():
            if not cfg.output.overwrite:
                raise TsopsdError(f"an unfinished run exists at {run_dir}: pass --resume to continue it or "
                                  "--overwrite to start over")
            shutil.rmtree(run_dir)

    # Rank 0 owns the output folders; every rank learns the verdict, so all stop together.
    _everywhere(env, preflight if env.is_main else lambda: None)

    torch.manual_seed(cfg.seed)
    ckpt = _everywhere(env, lambda: load_checkpoint(cfg.model.path, base=cfg.model.base, device=device,
                                                    dtype=cfg.model.dtype),
                       prefix="checkpoint failed to load on ")
    tokenizer = ckpt.tokenizer
    model = ckpt.model
    input_dtype = saved_dtype(ckpt.base_path or ckpt.path)
    if ckpt.is_adapter:
        if cfg.output.save == "adapter":
            raise TsopsdError("the input is a PEFT adapter: reheat it with --save merged, or merge it first "
                              "(tsopsd merge ADAPTER --out MERGED)")
        model = model.merge_and_unload()  # the teacher is the checkpoint as loaded: base + adapter
    prompts = load_prompts(cfg.data.prompts, tokenizer, prompt_field=cfg.data.prompt_field,
                           max_prompt_tokens=cfg.data.max_prompt_tokens, limit=cfg.data.limit)
    per_rank = cfg.rollout.prompts_per_step
    if env.enabled and len(prompts) < env.world_size * per_rank:
        raise TsopsdError(f"{len(prompts)} prompts are fewer than {env.world_size} ranks x {per_rank} prompts per "
                          "step: lower rollout.prompts_per_step or add prompts")
    if cfg.train.parallel == "auto" and env.enabled:
        fsdp = _needs_sharding(model, cfg)
    if fsdp and ckpt.is_adapter:
        raise TsopsdError("--parallel fsdp with an adapter input is not supported: merge it first (tsopsd merge)")
    policy = prepare_policy(model, cfg.train)
    dist.broadcast_params(env, policy.trainable)  # replicas start identical whatever their RNG did
    dev = policy.teacher.device
    all_done = None
    if fsdp:
        dist.fsdp_shard(policy.student, dev)
        if policy.mode == "full":
            dist.fsdp_shard(policy.teacher.model, dev)
        policy.trainable = [p for p in policy.student.parameters() if p.requires_grad]
        all_done = dist.all_done_fn(env, dev)
        log.info("FSDP2 over %d rank(s): decoder layers and trunk sharded, LM head replicated", env.world_size)
    optimizer = make_optimizer(policy.trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    warmup = cfg.train.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))

    def rollout_for(step: int) -> Rollout:
        # The step's global prompt list is the same for any world size; rank r samples its slice, with
        # the generator seeds one process would use for those rows.
        idx = prompts_for_step(len(prompts), per_rank * env.world_size, step, cfg.seed)
        mine = idx[env.rank * per_rank:(env.rank + 1) * per_rank]
        return sample_rollouts(policy.student, tokenizer, [prompts[i] for i in mine],
                               samples_per_prompt=cfg.rollout.samples_per_prompt,
                               max_new_tokens=cfg.rollout.max_new_tokens, temperature=1.0,
                               batch_size=cfg.rollout.batch_size, seed=step_seed(cfg.seed, step),
                               row_offset=env.rank * per_rank * cfg.rollout.samples_per_prompt,
                               all_done=all_done, engine=cfg.rollout.engine)

    # ---- state: fresh or resumed ----
    metrics_path = run_dir / "metrics.jsonl"
    if cfg.output.resume:
        state = torch.load(run_dir / STATE_FILE, map_location="cpu", weights_only=False)
        if state.get("world_size", 1) != env.world_size:
            raise TsopsdError(f"cannot resume: the run was saved with {state.get('world_size', 1)} rank(s), this launch "
                              f"has {env.world_size}; relaunch with the same number of processes")
        if state["config"] != _comparable(cfg):
            diff = sorted(k for k in state["config"] if state["config"][k] != _comparable(cfg)[k])
            raise TsopsdError(f"cannot resume: the config differs from the saved run in section(s) {', '.join(diff)}")
        if fsdp:
            _load_sharded(run_dir, policy.student, optimizer)
        else:
            policy.load_trainable_state(state["trainable"])
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, tau, tau_source, before = state["step"], state["tau"], state["tau_source"], state["before"]
        last_good = state["last_good"]
        # Drop metric lines of steps that will run again.
        if env.is_main:
            lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
            metrics_path.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] < start))
            log.info("resuming %s at step %d of %d", run_dir, start, cfg.train.steps)
    else:
        if env.is_main:
            run_dir.mkdir(parents=True)
        start, last_good = 0, None
        tau_source = "temperature"
        tau = cfg.teacher.temperature
        target = cfg.teacher.target_entropy
        if cfg.teacher.target_entropy_from is not None:
            target = _entropy_of(cfg.teacher.target_entropy_from, prompts, cfg, tokenizer.get_vocab())
            tau_source = f"target_entropy_from:{cfg.teacher.target_entropy_from}"
        elif target is not None:
            tau_source = "target_entropy"
        if target is not None:
            # Calibrate on exactly the completions step 0 will train on (same seed, same prompts; rank 0's
            # share when data-parallel, and every rank uses rank 0's tau).
            rollout0 = rollout_for(0)
            if env.is_main or fsdp:  # sharded models compute together
                tau = calibrate_temperature(policy.teacher, rollout0, target, chunk_size=cfg.loss.chunk_size or 1024)
            tau = dist.broadcast(env, tau)
            log.info("teacher temperature tau = %.4f gives mean entropy %.4f nats", tau, target)
        before = _eval_report(policy.student, tokenizer, prompts, cfg, all_done=all_done) if env.is_main or fsdp \
            else None
        if env.is_main:
            save_config(cfg, run_dir / "config.yaml")
            metrics_path.write_text("")
        dist.barrier(env)

    def save_state(next_step: int) -> None:
        if fsdp:  # sharded weights and optimizer state: torch.distributed.checkpoint, every rank its shard
            _save_sharded(run_dir, policy.student, optimizer)
        if not env.is_main:
            return
        _save_state(run_dir, {"world_size": env.world_size, "step": next_step,
                              "trainable": None if fsdp else policy.snapshot(),
                              "optimizer": None if fsdp else optimizer.state_dict(),
                              "scheduler": scheduler.state_dict(), "tau": tau, "tau_source": tau_source,
                              "before": before, "last_good": None if fsdp else last_good, "config": _comparable(cfg)})

    # ---- the loop ----
    stop_reason = f"completed {cfg.train.steps} steps"
    steps_run = start
    failure: str | None = None
    recent: deque[tuple[float, float]] = deque(maxlen=cfg.stop.window)  # (student, teacher) entropy
    with progress(show_progress, plain=False) as task:
        advance = task("reheat", cfg.train.steps)
        advance(start)
        step = start
        try:
            for step in range(start, cfg.train.steps):
                if interrupt_at_step is not None and step == interrupt_at_step:
                    raise KeyboardInterrupt
                t0 = time.monotonic()
                rollout = rollout_for(step)
                t_gen = time.monotonic() - t0
                local_tokens = int(rollout.completion_mask.sum())
                n_tokens = int(dist.all_sum(env, [float(local_tokens)], device)[0])
                t1 = time.monotonic()
                # FSDP averages gradients over ranks; plain all-reduce sums them: normalize accordingly.
                stats = train_step(policy, rollout, tau=tau, cfg=cfg, sharded=fsdp,
                                   normalizer=n_tokens / env.world_size if fsdp else n_tokens)
                if step == 0:
                    check_teacher(policy.teacher, rollout, tau, dtype=ckpt.dtype,
                                  measured_teacher_entropy=stats.teacher_entropy / max(local_tokens, 1))
                stats = _all_sum_stats(env, stats, device)
                if fsdp:
                    dist.all_mean_grads(env, [p for p in policy.trainable if not dist.is_sharded(p)])
                else:
                    dist.all_sum_grads(env, policy.trainable)
                n = max(n_tokens, 1)
                if stats.nonfinite:
                    optimizer.zero_grad(set_to_none=True)
                    if last_good is not None:
                        policy.load_trainable_state(last_good)
                    failure = stop_reason = f"non-finite loss at step {step + 1}; kept the last good state"
                    break
                agreement = stats.top1_agreement / n
                if agreement < cfg.stop.min_top1_agreement:
                    optimizer.zero_grad(set_to_none=True)
                    if last_good is not None and cfg.stop.rollback:
                        policy.load_trainable_state(last_good)
                    stop_reason = (f"drift guard: top-1 agreement {agreement:.3f} < {cfg.stop.min_top1_agreement} at "
                                   f"step {step + 1}; kept the last state that passed")
                    break
                student_h, teacher_h = stats.student_entropy / n, stats.teacher_entropy / n
                recent.append((student_h, teacher_h))
                mean_s = sum(h for h, _ in recent) / len(recent)
                mean_t = sum(h for _, h in recent) / len(recent)
                if len(recent) == cfg.stop.window and mean_s >= mean_t * (1 - cfg.stop.entropy_tolerance):
                    optimizer.zero_grad(set_to_none=True)
                    stop_reason = (f"converged: student entropy {mean_s:.4f} within {cfg.stop.entropy_tolerance:.0%} "
                                   f"of the teacher's {mean_t:.4f} over steps {step + 2 - len(recent)}-{step + 1}")
                    break
                if cfg.stop.rollback:
                    last_good = policy.snapshot()
                grad_norm = None
                if cfg.train.max_grad_norm > 0:
                    grad_norm = dist.clip_grad_norm(policy.trainable, cfg.train.max_grad_norm)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                t_train = time.monotonic() - t1
                result = StepResult(
                    step=step, loss=stats.divergence / n, student_entropy=student_h, teacher_entropy=teacher_h,
                    kl_student_original=stats.kl_student_original / n, top1_agreement=agreement,
                    completion_length=float(rollout.completion_lengths.float().mean()), tokens=n_tokens,
                    generated_tokens_per_s=n_tokens / max(t_gen, 1e-9), trained_tokens_per_s=n_tokens / max(t_train, 1e-9),
                    lr=lr, grad_norm=grad_norm, seconds=time.monotonic() - t0)
                if env.is_main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({k if k == "step" else f"train/{k}": v
                                            for k, v in asdict(result).items()}) + "\n")
                    log.info(result.line(cfg.train.steps))
                steps_run = step + 1
                advance(1)
                if cfg.output.save_every and steps_run % cfg.output.save_every == 0 and steps_run < cfg.train.steps:
                    save_state(steps_run)
        except KeyboardInterrupt:
            optimizer.zero_grad(set_to_none=True)
            save_state(step)
            if env.is_main:
                log.warning("interrupted at step %d: state saved in %s; continue with --resume", step + 1, run_dir)
            raise

    # ---- report and output (rank 0; the others wait) ----
    report: dict = {}
    after = None
    if env.is_main or fsdp:
        after = _eval_report(policy.student, tokenizer, prompts, cfg, reference=policy.teacher, all_done=all_done)
    trained = policy.student
    if fsdp:  # gather the full weights onto rank 0 and rebuild an ordinary model there
        full = dist.full_state_dict(policy.student)
        trained = _rebuild(cfg, full, policy) if env.is_main else None
    if env.is_main:
        report = _write_output(cfg, out, run_dir, trained, policy.mode, tokenizer, ckpt, input_dtype, tau, tau_source,
                               before, after, steps_run, stop_reason, started, on_trained, str(dev))
    dist.finish(env)
    if failure:
        raise TrainingStopped(f"{failure}; written to {out}")
    return report


def _write_output(cfg: Config, out: Path, run_dir: Path, student, mode: str, tokenizer, ckpt, input_dtype, tau: float,
                  tau_source: str, before, after, steps_run: int, stop_reason: str, started: float, on_trained,
                  device: str) -> dict:
    """Write the output folder atomically and remove the run folder; returns the report."""
    metrics_path = run_dir / "metrics.jsonl"
    report = {
        "input": str(cfg.model.path), "output": str(out), "mode": cfg.train.mode, "save": cfg.output.save,
        "teacher_temperature": tau, "teacher_temperature_source": tau_source,
        "target_entropy": cfg.teacher.target_entropy, "divergence": cfg.loss.divergence,
        "steps_run": steps_run, "steps_requested": cfg.train.steps, "stop_reason": stop_reason,
        "before": before, "after": after, "device": device,
        "dtype": str(ckpt.dtype).removeprefix("torch."), "seconds": time.monotonic() - started,
        "versions": _versions(),
    }
    if on_trained is not None:
        on_trained(student)
    with atomic_output(out, overwrite=cfg.output.overwrite or cfg.output.resume) as tmp:
        if cfg.output.save == "adapter":
            student.peft_config["default"].base_model_name_or_path = str(Path(cfg.model.path).resolve())
            student.save_pretrained(str(tmp))
        else:
            merged = student.merge_and_unload() if mode == "lora" else student
            merged.to(input_dtype).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        save_config(cfg, tmp / "config.yaml")
        shutil.copy(metrics_path, tmp / "metrics.jsonl")
        (tmp / "reheat_report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(report))
    shutil.rmtree(run_dir, ignore_errors=True)
    log.info("wrote %s (%s)", out, stop_reason)
    return report


def _needs_sharding(model: torch.nn.Module, cfg: Config) -> bool:
    """auto: shard when one device cannot hold the run (a rough count of weights, grads and AdamW state)."""
    p = next(model.parameters())
    if p.device.type != "cuda":
        return False
    n = sum(x.numel() for x in model.parameters())
    per = p.element_size()
    need = n * per * (2 + 1) + n * 8 if cfg.train.mode == "full" else n * per * 1.2
    return need > 0.8 * torch.cuda.get_device_properties(p.device).total_memory


def _save_sharded(run_dir: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(run_dir / "sharded"))


def _load_sharded(run_dir: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(run_dir / "sharded"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _rebuild(cfg: Config, full: dict[str, torch.Tensor], policy: Policy):
    """An ordinary (unsharded, CPU) student with the gathered weights: what gets saved."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32, local_files_only=True)
    if policy.mode == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, policy.student.peft_config["default"])
    missing, unexpected = model.load_state_dict(full, strict=False)
    if unexpected or [k for k in missing if "lora_" in k or policy.mode == "full"]:
        raise RuntimeError(f"gathered state does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def _entropy_of(path: str, prompts: list[Prompt], cfg: Config, prompts_tokenizer_vocab: dict) -> float:
    """Mean token entropy of another checkpoint on its own rollouts, as measure-entropy computes it."""
    other = load_checkpoint(path, device=cfg.model.device, dtype=cfg.model.dtype)
    if other.tokenizer.get_vocab() != prompts_tokenizer_vocab:
        raise TsopsdError(f"--target-entropy-from {path}: its tokenizer differs from the checkpoint's")
    n = cfg.output.eval_prompts or cfg.rollout.prompts_per_step
    result = measure(other.model, other.tokenizer, prompts[:n], samples_per_prompt=cfg.rollout.samples_per_prompt,
                     max_new_tokens=cfg.rollout.max_new_tokens, batch_size=cfg.rollout.batch_size, seed=cfg.seed)
    h = result["entropy"]["mean"]
    log.info("target entropy from %s: %.4f nats", path, h)
    del other
    return h
