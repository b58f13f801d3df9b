"""`tsopsd reheat`: the TS-OPSD loop (the Python API is `tsopsd.reheat`, in `api.py`).

    report = reheat(load_config("configs/tiny-cpu.yaml", {"model.path": "ckpt", "data.prompts": "p.jsonl",
                                                           "output.out": "reheated"}))

Three parts, as a torchtune recipe has: `setup` (load, shard, optimizer, fresh or resumed state),
`train` (the loop, one `reheat_step` at a time) and `finish` (the after-report and the output folder). One step:

    prompts -> on-policy rollouts of the *current* student at T=1
            -> frozen teacher hidden states (no grad) and student hidden states
            -> per-token divergence to softmax(z0 / tau) over the full vocabulary, in chunks, backward
            -> stop rules (non-finite, drift, convergence) -> optimizer step -> metrics.jsonl -> save

Rank logic lives in the parallel backend (`parallel.py`), resumable state in `state.py`, stop rules in
`stop.py`; the loop asks them and never branches on the parallel mode. The output folder is written
once, complete, through a temporary folder and a rename (`output.py`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import torch

from tsopsd.begin import fresh_state, resumed_state
from tsopsd.checkpoint import Checkpoint, load_checkpoint, resolve_device, resolve_dtype
from tsopsd.closed_form import check_scaled, scale_logits_, solve_scale
from tsopsd.config import Config
from tsopsd.console import progress, timed
from tsopsd.decode import COMPILE, forget
from tsopsd.errors import ExitCode, TrainingStopped, TsopsdError
from tsopsd.family import causal_lm, max_positions
from tsopsd.folders import fingerprint, saved_dtype
from tsopsd.loss import ChunkStats
from tsopsd.output import cast_model, versions, write_output, written_model
from tsopsd.parallel import Backend, join, make_backend
from tsopsd.paths import check_out_name, check_writes
from tsopsd.policy import Policy, enable_checkpointing, make_optimizer, prepare_policy
from tsopsd.preflight import check_enough, check_run
from tsopsd.prompts import Prompt, fit_prompts, load_prompts, prompts_fingerprint
from tsopsd.report import assemble, what_to_change
from tsopsd.run import PHASES, Run, StepResult, held_out_count, hold_out
from tsopsd.state import (
    OutputLock,
    discard_run_dir,
    discard_unsaved,
    interrupts,
    run_dir_for,
    settle_run_dir,
)
from tsopsd.step import train_step
from tsopsd.stop import StopRules, judge
from tsopsd.teacher import check_teacher
from tsopsd.trackers import logging_dir, open_trackers
from tsopsd.writing import check_output_dir, remove_stale_temporaries

log = logging.getLogger(__name__)

__all__ = ["reheat", "setup", "train", "reheat_step", "finish", "train_step", "run_dir_for"]


def train(run: Run, *, show_progress: bool = True) -> None:
    """The method, step after step until a stop rule ends the run or the budget is spent; Ctrl-C saves the state."""
    cfg, state, signals = run.cfg, run.state, run.signals
    COMPILE["compile_s"] = 0.0  # this run's compiling (a compiled step is kept for the process)
    with progress(run.shows_progress(show_progress), plain=False) as task:
        advance = task("reheat", cfg.train.steps)
        advance(state.next_step)
        try:
            while state.stop_reason is None and state.next_step < cfg.train.steps:
                if not reheat_step(run):  # a stop rule ended the run
                    break
                advance(1)
            run.rollout_compile = dict(COMPILE)
            with signals.held():
                if state.stop_reason is None:
                    state.stop_reason, state.kept_step = f"completed {cfg.train.steps} steps", cfg.train.steps
                run.save()  # an interrupted finish resumes straight to the output
        except KeyboardInterrupt:
            with signals.held():  # a second Ctrl-C waits for this save
                run.optimizer.zero_grad(set_to_none=True)
                run.save()
            run.note(f"interrupted at step {state.next_step + 1}: state saved in {run.run_dir}; continue with --resume")
            raise


def reheat_step(run: Run) -> bool:
    """One step of the method: rollout -> teacher -> loss -> stop rules -> optimizer step -> log -> save (once the
    stop rules pass, the step lands whole or not at all). False: a stop rule ended the run (the state says why, and
    which weights are kept)."""
    cfg, backend, policy, state, optimizer, signals = run.cfg, run.backend, run.policy, run.state, run.optimizer, \
        run.signals
    step, t0 = state.next_step, time.monotonic()
    timings = dict.fromkeys(PHASES, 0.0)  # seconds per phase; every step has every column
    clock = run.clock(timings)
    with clock("heldout"):  # a steered run, every stop.heldout_every steps: steers the training target
        heldout = run.heldout(step)
    if heldout and (verdict := run.stop.steer(step, heldout["entropy"], (heldout["low"], heldout["high"]),
                                               refined=bool(heldout["refined"]))):
        with signals.held():
            state.stop_reason, state.kept_step = run.stop.apply(verdict, policy, step)
        return False
    with clock("rollout"):
        rollout = run.rollout(step)  # on-policy: the current student, T=1
    t_gen = time.monotonic() - t0
    local_tokens = int(rollout.completion_mask.sum())
    n_tokens = int(backend.sum([float(local_tokens)])[0])
    with clock("solve"):
        tau, teacher_hidden, heat = run.temperature(step, rollout)  # fixed, or solved for the target
    stats = train_step(policy, rollout, tau=tau, cfg=cfg, skip_empty=not backend.lockstep,
                       normalizer=backend.loss_normalizer(n_tokens), timings=timings,
                       teacher_hidden=teacher_hidden, heat=heat)  # teacher, student, loss, backward
    if step == 0:  # the training path against the model's own forward, in float64
        with clock("check"):
            check_teacher(policy.teacher, rollout, tau, dtype=run.dtype, chunk_size=cfg.loss.chunk_size, heat=heat,
                          measured_teacher_entropy=float(stats.teacher_entropy) / max(local_tokens, 1))
    stats = ChunkStats.from_sums(backend.sum(stats.sums()))
    backend.reduce_gradients(policy.trainable)
    with signals.held():  # from here the step lands whole, or (interrupted before) not at all
        verdict = run.stop.check(step, stats, n_tokens)
        if verdict is not None:
            optimizer.zero_grad(set_to_none=True)
            state.stop_reason, state.kept_step = run.stop.apply(verdict, policy, step)
            state.failed = verdict.failure
            return False
        run.stop.passed(step, backend.snapshot(policy) if run.stop.wants_snapshot(step) else None)
        run.note(run.stop.pace(step), level=logging.INFO)  # the next step's lr (the scheduler reads it)
        grad_norm = backend.clip_grad_norm(policy.trainable, cfg.train.max_grad_norm) \
            if cfg.train.max_grad_norm > 0 else None
        lr = run.scheduler.get_last_lr()[0]
        with clock("optimizer"):
            optimizer.step()
        run.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.next_step, state.tau = step + 1, tau
        n = max(n_tokens, 1)
        run.log(StepResult(
            step=step, tau=tau, target=run.stop.target, heldout=heldout, loss=stats.divergence / n,
            student_entropy=stats.student_entropy / n, teacher_entropy=stats.teacher_entropy / n,
            kl_student_original=stats.kl_student_original / n, top1_agreement=stats.top1_agreement / n,
            tokens=n_tokens, completion_length=float(rollout.completion_lengths.float().mean()),
            generated_tokens_per_s=n_tokens / max(t_gen, 1e-9),
            trained_tokens_per_s=n_tokens / max(time.monotonic() - t0 - t_gen, 1e-9),
            lr=lr, grad_norm=grad_norm, seconds=time.monotonic() - t0, phases=timings, memory=run.memory_peaks()))
        if run.due(cfg.output.checkpoint_every):  # before the state: a resume redoes it
            run.checkpoint()
        if run.due(cfg.output.save_every):
            run.save()
    return True


def closed_form(run: Run) -> None:
    """`teacher.method: scale`: the student edited so its logits are the input's / tau (fixed, or solved for the
    target on the edited model's own held-out rollouts), checked against the input on the prompts; no steps."""
    state, policy = run.state, run.policy
    tau, tries = (state.tau, []) if state.target is None else solve_scale(run, state.before)
    what = scale_logits_(policy.student, tau, policy.teacher.model)  # from the teacher's weights: the edit, said
    ids = _check_ids(run)
    error = check_scaled(policy.student, policy.teacher.model, ids, tau, compute=policy.compute())
    state.tau, state.kept_step = tau, 0
    state.stop_reason = f"closed form: logits / {tau:.4g} ({what}; max logit error {error:.1e} of their range)"
    run.closed_form = {"tau": tau, "edited": what, "max_logit_error": error, "measurements": tries}
    log.info("%s", state.stop_reason)


def _check_ids(run: Run) -> torch.Tensor:
    """A few real prompts, unpadded (each as long as the shortest of them), for `check_scaled`."""
    prompts = (run.eval_prompts or run.prompts)[:4]
    n = min(len(p.ids) for p in prompts)
    return torch.tensor([list(p.ids[:n]) for p in prompts], device=run.policy.teacher.device)


def setup(cfg: Config, model: Checkpoint | None = None, *, show_progress: bool = True,
          config_file: str | Path | None = None) -> Run:
    """Load the checkpoint and prompts, build student, teacher and optimizer, and start or resume the state.

    `model`: a checkpoint already in memory (the Python API's), trained in place instead of loading `cfg.model.path`;
    `config_file`: the YAML the config came from, named in the log's start line.
    """
    started = time.monotonic()
    out = Path(cfg.output.out)
    check_out_name(out)  # before any name is derived from it
    run_dir = run_dir_for(out)
    launch = join(cfg.model.device, group=cfg.train.parallel == "fsdp")
    backend = make_backend(cfg.train.parallel, launch, resolve_device(launch.device))
    if backend.is_main:
        log.info(_start_line(cfg, backend, model, config_file))

    lock = OutputLock(out)

    def preflight() -> None:
        check_run(cfg, backend.world_size, in_memory=model is not None)  # what a dry run refuses too
        lock.acquire()  # from here on this run owns OUT and its run folder
        check_output_dir(out, overwrite=cfg.output.overwrite, resume=cfg.output.resume)
        remove_stale_temporaries(out)
        settle_run_dir(run_dir, out, overwrite=cfg.output.overwrite, resume=cfg.output.resume)

    try:
        backend.on_main(preflight)  # rank 0 owns the output folders; every rank learns the verdict
        run = _build(cfg, backend, launch, started, model, show_progress)
        if backend.is_main and cfg.output.report_to:
            run.trackers = open_trackers(cfg.output.report_to, logging_dir(out, cfg.output.logging_dir),
                                         resume_step=run.state.next_step + 1 if run.state.next_step else 0,
                                         config=cfg.to_dict(),
                                         name=cfg.output.run_name or out.name, project=cfg.output.wandb_project)
    except BaseException:
        _let_go(lock, run_dir)
        backend.close()
        raise
    run.lock = lock
    return run


def _start_line(cfg: Config, backend: Backend, given: Checkpoint | None, config_file: str | Path | None) -> str:
    """What runs, in one line: versions, input and OUT (absolute), device, dtype, mode, teacher, lr, steps, config."""
    v, t = versions(), cfg.teacher
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else \
        f"auto ({str(resolve_dtype('auto', backend.device)).removeprefix('torch.')})"
    teacher = f"tau {t.temperature:g}" if t.temperature is not None else f"target entropy {t.target_entropy:g}" \
        if t.target_entropy is not None else f"target entropy from {Path(t.target_entropy_from).resolve()}"
    source = "a model in memory" if given is not None else str(Path(cfg.model.path).resolve())
    return (f"tsopsd {v['tsopsd']} reheat (torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}): "
            f"{source} -> {Path(cfg.output.out).resolve()}; {backend.world_size} process(es) on {backend.device}, "
            f"dtype {dtype}, mode {cfg.train.mode}, {teacher}, lr {cfg.train.lr:g} (up to x{cfg.train.max_lr_factor:g}), "
            f"up to {cfg.train.steps} steps, seed {cfg.seed}, "
            f"config {Path(config_file).resolve() if config_file else 'defaults'}" + ("; resuming" if cfg.output.resume else ""))


def _let_go(lock: OutputLock, run_dir: Path) -> None:
    """Release OUT; a run folder this run made that never got a saved state, and holds no checkpoint, is removed."""
    if lock.held and run_dir.is_dir():
        discard_unsaved(run_dir)
    lock.release()


def _build(cfg: Config, backend: Backend, launch, started: float, given: Checkpoint | None = None,
           show_progress: bool = True) -> Run:
    """Everything after the preflight: checkpoint, prompts, policy, optimizer, state."""
    out = Path(cfg.output.out)
    torch.manual_seed(cfg.seed)
    phases: dict[str, float] = {}
    if given is None:
        log.info("loading %s", cfg.model.path)
    with timed("load", phases, log if backend.is_main and given is None else None):
        ckpt = given or backend.everywhere(lambda: load_checkpoint(cfg.model.path, base=cfg.model.base,
                                                                   device=launch.device, dtype=cfg.model.dtype),
                                           prefix="checkpoint failed to load on ")
    model = ckpt.model
    if ckpt.source != "model folder":
        log.info("loaded %s", ckpt.source)
    backend.on_main(lambda: check_writes({"output folder": out, "run folder": run_dir_for(out)}, {"adapter base": ckpt.base_path}))
    if ckpt.is_adapter:
        if cfg.output.save == "adapter":
            raise TsopsdError("the input is a PEFT adapter: reheat it with --save merged, or merge it first "
                              "(tsopsd merge ADAPTER --out MERGED)")
        model = model.merge_and_unload()  # the teacher is the checkpoint as loaded: base + adapter
    prompts = load_prompts(cfg.data.prompts, ckpt.tokenizer, prompt_field=cfg.data.prompt_field,
                           max_prompt_tokens=cfg.data.max_prompt_tokens, limit=cfg.data.limit)
    held = load_prompts(cfg.data.eval_prompts, ckpt.tokenizer, prompt_field=cfg.data.prompt_field,
                        max_prompt_tokens=cfg.data.max_prompt_tokens) if cfg.data.eval_prompts else []
    fitted, new_tokens = fit_prompts(prompts + held, max_positions(model), cfg.rollout.max_new_tokens)
    prompts, held = fitted[:len(prompts)], fitted[len(prompts):]
    if new_tokens != cfg.rollout.max_new_tokens:  # what runs, what is saved and what a resume compares
        cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_new_tokens=new_tokens))
    if cfg.data.eval_prompts:  # the user's held-out prompts (e.g. other problem families): all of them train
        train_prompts, eval_prompts = prompts, held[:cfg.output.eval_prompts] if cfg.output.eval_prompts is not None else held
    else:
        train_prompts, eval_prompts = hold_out(prompts, held_out_count(len(prompts), cfg.output.eval_prompts), cfg.seed)
    check_enough(cfg, backend.world_size, len(prompts), len(train_prompts), len(eval_prompts))
    backend = backend.for_model(model, cfg.train.parallel, mode=cfg.train.mode, adapter_input=ckpt.is_adapter)
    torch.manual_seed(cfg.seed)  # the adapter's init: the same however the input was loaded (a verl LoRA draws)
    policy = prepare_policy(model, cfg.train)
    try:
        return _build_run(cfg, backend, policy, ckpt, given, started, show_progress, phases, train_prompts,
                          eval_prompts)
    except BaseException:  # the caller's model in memory goes back as it came, whatever failed in set-up
        if given is not None:
            _put_back(policy, ckpt.dtype)
        raise


def _build_run(cfg: Config, backend: Backend, policy: Policy, ckpt: Checkpoint, given: Checkpoint | None,
               started: float, show_progress: bool, phases: dict, train_prompts: list[Prompt],
               eval_prompts: list[Prompt]) -> Run:
    """The run around a built policy: backend placement, optimizer, schedule, stop rules, fresh or resumed state."""
    backend.prepare(policy)
    if _wants_checkpointing(cfg, backend, policy):
        enable_checkpointing(policy)
    optimizer = make_optimizer(policy.trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    warmup = cfg.train.warmup_steps
    stop = StopRules(cfg.stop, mode=cfg.train.mode, steps=cfg.train.steps, max_lr_factor=cfg.train.max_lr_factor,
                     warmup=warmup)
    # linear warm-up, times the pace factor the stop rules raise while the entropy gap closes too slowly
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)) * stop.lr_factor)
    run = Run(cfg=cfg, backend=backend, policy=policy, tokenizer=ckpt.tokenizer, optimizer=optimizer,
              scheduler=scheduler, stop=stop, state=None, prompts=train_prompts,
              eval_prompts=eval_prompts, save_dtype=ckpt.dtype if given else saved_dtype(ckpt.config_dir),
              show_progress=show_progress, phase_seconds=phases,
              dtype=ckpt.dtype, started=started, config_dir=None if given else ckpt.config_dir, in_memory=given is not None,
              input_fingerprint=({} if given else fingerprint(ckpt.path, ckpt.base_path)) | prompts_fingerprint(cfg.data.prompts)
              | {f"prompts:held-out {k.removeprefix('prompts:')}": v
                 for k, v in (prompts_fingerprint(cfg.data.eval_prompts) if cfg.data.eval_prompts else {}).items()})
    run.state = resumed_state(run) if cfg.output.resume else fresh_state(run)
    run.stop.set_goal(run.state.target, steering=bool(eval_prompts) and cfg.stop.heldout_every > 0)
    return run


def _wants_checkpointing(cfg: Config, backend: Backend, policy: Policy) -> bool:
    """`train.activation_checkpointing`; auto: on a GPU, on when the plan of one micro-batch says its
    activations would not fit in what the device has left once gradients and optimizer state exist."""
    choice = cfg.train.activation_checkpointing
    if choice != "auto" or backend.device.type != "cuda":
        return choice == "true"

    def decide() -> bool:
        import warnings

        from tsopsd.plan import activations_need_checkpointing

        free, _ = torch.cuda.mem_get_info(backend.device)
        local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in policy.trainable)
        log.info("activation checkpointing auto: planning one micro-batch on fake tensors (tens of seconds for a 4B model)")
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            need = activations_need_checkpointing(cfg, causal_lm(policy.teacher.model).config, free_bytes=free,
                                                  later_bytes=local * 12)  # float32 gradient and AdamW state
        log.info("activation checkpointing %s (auto, from the plan of one micro-batch, %.0f s)",
                 "on" if need else "off", time.perf_counter() - started)
        return need

    return bool(backend.broadcast(decide() if backend.is_main else None))


def finish(run: Run) -> dict:
    """Measure the result as it will be written, write the output folder (rank 0), remove the run folder."""
    forget(run.policy.student)  # the rollouts' kept decode copies and cache: not held for the report and save
    cfg, backend, state, policy = run.cfg, run.backend, run.state, run.policy
    if not state.kept_step and cfg.teacher.method != "scale":  # a run that trained nothing is not a success
        if backend.is_main:
            with run.signals.held():
                discard_run_dir(run.run_dir)
        backend.finish()
        run.trackers.close()
        raise TrainingStopped(f"{state.stop_reason}: nothing was trained, so no output was written; "
                              f"{what_to_change(state.stop_reason)}", code=ExitCode.NOTHING_TRAINED)
    save = dict(mode=policy.mode, save=cfg.output.save, save_dtype=run.save_dtype)
    run.announce("the after-report: measuring the output")
    measured = written = None  # what the after-report measures (None: the student as trained)
    if run.in_memory:  # the caller's model: measured as trained, then the training folded into it in place
        measured_on = "the model in memory"
    elif backend.lockstep:  # sharded: measured on every rank, then gathered onto rank 0 and written there
        measured_on = backend.round_to(policy, run.save_dtype) if cfg.output.save == "merged" else "the adapter"
    else:
        written = written_model(policy.student, **save)  # merged and cast as it will be saved
        adapter = cfg.output.save == "adapter"
        measured_on = "the adapter" if adapter else "the written checkpoint"
        measured = None if adapter else written
    judged = state.target is not None and not state.failed  # a target run's goal is judged on this measurement
    with run.timed("after-report"):
        after = run.evaluate(model=measured, reference=policy.teacher, bar="after-report",
                             precision=cfg.stop.heldout_tolerance if judged else None)
        after_training = run.evaluate(model=measured, prompts=run.training_sample(),
                                      bar="after-report, training prompts") if run.compares_training() else None
    if run.in_memory:
        written = written_model(policy.student, **save | {"save": "merged"}, keep_student=False)
        run.handed_back = True
    elif backend.lockstep:
        trained = backend.gather_for_saving(policy, cfg.model.path)
        written = written_model(trained, **save, keep_student=False) if backend.is_main else None
    goal = judge(target=state.target, tolerance=cfg.stop.heldout_tolerance, heldout=after, stop_reason=state.stop_reason)
    status = "guard_stop" if state.failed else "met" if goal["met"] else "goal_not_met"
    report: dict = {}
    if backend.is_main:
        metrics = run.run_dir / "metrics.jsonl"
        steps = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        report = assemble(run, status=status, goal=goal, after=after, after_training=after_training,
                          measured_on=measured_on, steps=steps)
        if run.writes_output:
            log.info("writing %s", cfg.output.out)
        with run.signals.held(), run.timed("write"):  # the output and the end of the run folder land together
            if run.writes_output:
                write_output(cfg, written, tokenizer=run.tokenizer, report=report, metrics=metrics)
            discard_run_dir(run.run_dir)
        log.info("%s (%s)", f"wrote {cfg.output.out}" if run.writes_output else "reheated the model in memory",
                 state.stop_reason)
        log.info("done in %.0f s: %s; %s", time.monotonic() - run.started, status.replace("_", " "),
                 ", ".join(f"{k} {v:.0f} s" for k, v in run.phase_seconds.items()))
    backend.finish()
    run.trackers.close()
    if state.failed:
        kept = f"written to {cfg.output.out}" if run.writes_output else "the model in memory holds the last good weights"
        raise TrainingStopped(f"{state.stop_reason}; {kept}", report=report, code=ExitCode.GUARD_STOP)
    if status == "goal_not_met":
        run.note(f"goal not met: {goal['evidence']}; {goal['advice']}")
    return report


@torch.no_grad()
def _put_back(policy: Policy, dtype: torch.dtype) -> None:
    """An in-memory run stopped before its result was folded in (an error in set-up, Ctrl-C, nothing trained): the
    caller's model as it came. LoRA: the adapter layers taken out (the base weights never trained); full: the
    frozen teacher's weights copied back, in the model's dtype."""
    if policy.mode == "lora":
        policy.student.unload()  # peft puts the base layers back in place, in the caller's model object
        return
    student = cast_model(policy.student, dtype)
    student.load_state_dict(policy.teacher.model.state_dict())


def reheat(cfg: Config, *, show_progress: bool = True, model: Checkpoint | None = None,
           write: bool = True, config_file: str | Path | None = None) -> dict:
    """Run TS-OPSD on `cfg.model.path` and write the output folder `cfg.output.out`.

    `model`: a checkpoint in memory (the Python API's) instead of `cfg.model.path`, trained in place; `write`
    False: no output folder (the run folder at `cfg.output.out` is the caller's temporary one); `config_file`: the
    YAML `cfg` came from (the log's start line names it).

    Returns:
        The report written to ``reheat_report.json``.

    Raises:
        TsopsdError: bad input (checkpoint, prompts, output folder, unreachable target entropy).
        TrainingStopped: a guard stopped the run (non-finite loss, drift; the last good state was written to
            the output, its report in `.report`), or no update was kept (nothing written).
        KeyboardInterrupt: Ctrl-C or SIGTERM, after saving resumable state.
    """
    # Ctrl-C and SIGTERM: saved state, exit 130. Gradients on whatever the caller's context (an RL loop's no_grad or
    # inference_mode block would make every step a silent no-op); the teacher's passes turn them off themselves.
    scale = cfg.teacher.method == "scale"
    if scale:  # the closed form edits the whole student's weights: a full-mode policy, one process
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise TsopsdError("--method scale runs in one process (a weight edit, no training): run it without torchrun")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mode="full"))
    with interrupts() as signals, torch.inference_mode(False), torch.enable_grad():
        run = setup(cfg, model, show_progress=show_progress, config_file=config_file)
        run.signals, run.writes_output = signals, write
        try:
            if scale:
                with run.timed("closed form"):
                    closed_form(run)
            else:
                with run.timed("training"):
                    train(run, show_progress=show_progress)
            return finish(run)
        except BaseException:
            if run.in_memory and not run.handed_back:
                _put_back(run.policy, run.dtype)
            raise
        finally:
            run.trackers.close()
            _let_go(run.lock, run.run_dir)
            run.backend.close()
