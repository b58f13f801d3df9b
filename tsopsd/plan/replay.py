"""One worst-case reheat step replayed on fake tensors, phase by phase (`plan_once`), and its summary."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import torch

from tsopsd.batch import Rollout
from tsopsd.config import Config
from tsopsd.errors import TsopsdError
from tsopsd.family import causal_lm, config_positions, is_fake
from tsopsd.plan.hardware import CALIBRATED_ON, RESERVED_BYTES, RESERVED_RATIO, STEP_EFFICIENCY, Hardware
from tsopsd.plan.tracker import PHASES, Tracker
from tsopsd.prompts import fit_context

DECODE_PROBE = 3  # decoding steps run per rollout batch; the rest are extrapolated
SOLVE_EVALUATIONS = 3  # passes of the LM head a tracked step spends solving tau (2 or 3 from the last tau)



def load_model_config(path: str | Path):
    """The transformers config of a checkpoint folder, a PEFT adapter folder (its base's) or a `config.json`
    file; one-line errors for configs tsopsd cannot plan (`folders.check_model_config`)."""
    from tsopsd.checkpoint import adapter_base
    from tsopsd.folders import read_model_config

    p = Path(path)
    if p.is_dir() and not (p / "config.json").is_file() and (p / "adapter_config.json").is_file():
        p = adapter_base(p, None)  # an adapter: its base model is what runs
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file() or file.name != "config.json":
        raise TsopsdError(f"{path}: no config.json there (give a checkpoint folder, an adapter folder or a config.json)")
    return read_model_config(file.parent)


def meta_model(model_config, dtype: torch.dtype) -> torch.nn.Module:
    """The causal LM of `model_config` on the meta device (no memory, no initialisation)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    return model.eval()


def _make_fake(module: torch.nn.Module, fake_mode) -> None:
    """Give a meta module fake tensors of the same shapes (parameters keep their identity)."""
    with fake_mode:
        module.to_empty(device="cpu")


class _Tokenizer:
    """What sampling reads of a tokenizer, from the model config (the plan has no tokenizer)."""

    def __init__(self, model_config):
        eos = getattr(model_config, "eos_token_id", None)
        self.eos_token_id = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
        pad = getattr(model_config, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else self.eos_token_id




def _shape_facts(model_config) -> tuple[int, int, int]:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 1)
    kv = getattr(text, "num_key_value_heads", None) or heads
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", 0)
    head_dim = getattr(text, "head_dim", None) or hidden // max(heads, 1)
    return text.vocab_size, kv, head_dim


def _hidden_size(model_config) -> int:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return getattr(text, "hidden_size", None) or getattr(text, "n_embd", 0)


def worst_case_rollout(rows: int, prompt_tokens: int, new_tokens: int) -> Rollout:
    """`rows` sequences of a `prompt_tokens` prompt and a `new_tokens` completion: no row ends early."""
    T = prompt_tokens + new_tokens
    completion = torch.zeros((rows, T), dtype=torch.bool)
    completion[:, prompt_tokens:] = True
    return Rollout(input_ids=torch.zeros((rows, T), dtype=torch.long), attention_mask=torch.ones((rows, T), dtype=torch.long),
                   completion_mask=completion, prompt_lengths=torch.full((rows,), prompt_tokens, dtype=torch.long),
                   prompt_index=torch.arange(rows), sample_logprobs=torch.zeros((rows, T)), prompt_width=prompt_tokens)


@contextlib.contextmanager
def _fake_group(world_size: int, wanted: bool):
    """A fake process group of `world_size` ranks (this process is rank 0): collectives cost nothing."""
    import torch.distributed as tdist

    if not wanted or tdist.is_initialized():
        yield
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    tdist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        tdist.destroy_process_group()


@dataclasses.dataclass
class _Replay:
    """One step being replayed: the run's config with its lengths fitted, the fake policy and backend, and what
    each phase adds to the tracker (`scale`: how many times the part replayed stands for)."""

    cfg: Config
    model_config: object
    hardware: Hardware
    tracker: Tracker
    policy: object
    backend: object = None
    optimizer: object = None
    dtype: torch.dtype = torch.float32
    save_dtype: torch.dtype = torch.float32
    P: int = 0  # prompt tokens
    L: int = 0  # new tokens
    rows: int = 0  # sequences a rank takes a step
    tau: float = 1.5
    tracking: float | None = None  # a target entropy, solved for on the step's teacher states
    snapshot: dict | None = None  # the rollback copy
    scale: dict = dataclasses.field(default_factory=dict)


def _plan_once(cfg: Config, model_config, hardware: Hardware, prompt_tokens: int | None, *, checkpointing: bool,
               phases: tuple[str, ...] = PHASES, on_phase: Callable[[str], None] | None = None) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tsopsd.decode import forget
    from tsopsd.parallel import Launch, make_backend

    r = _setup(cfg, model_config, hardware, prompt_tokens, checkpointing=checkpointing, on_phase=on_phase)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    _make_fake(r.policy.student, fake_mode)
    if r.policy.teacher.model is not r.policy.student:
        _make_fake(r.policy.teacher.model, fake_mode)
    r.policy.trainable = [p for p in r.policy.student.parameters() if p.requires_grad]
    if checkpointing:
        from tsopsd.policy import enable_checkpointing

        enable_checkpointing(r.policy)
    group = hardware.gpus > 1 or r.cfg.train.parallel == "fsdp"
    with _fake_group(hardware.gpus, group), fake_mode, r.tracker, r.tracker.resizes():
        r.backend = make_backend(r.cfg.train.parallel, Launch(0, hardware.gpus, "cpu"), torch.device("cpu"))
        _load(r)
        if "rollout" in phases:
            _rollout(r)
        rollout = worst_case_rollout(r.rows, r.P, r.L)
        if "check" in phases:  # row by row: one row shows the memory; the cost is counted for all
            from tsopsd.teacher import check_teacher

            with r.tracker.in_phase("check"):
                check_teacher(r.policy.teacher, rollout.rows(0, 1), r.tau, dtype=r.dtype, chunk_size=r.cfg.loss.chunk_size)
            r.scale["check"] = r.rows
        _train(r, rollout)
        if "update" in phases:
            _update(r)
        forget(r.policy.student)  # as the loop does after its last step: the rollouts' kept decoder goes
        if "report" in phases and _held_out(r.cfg):
            _report(r)
        if "save" in phases:
            _save(r)
    out = _summary(r.cfg, hardware, r.tracker, r.scale, model_config=model_config, dtype=r.dtype, P=r.P,
                   backend=type(r.backend).__name__, params=_count(r.policy))
    if r.backend.lockstep and "save" in phases:  # the gathered float32 state and the rebuilt model on rank 0
        out["phases"]["save"]["host_bytes"] = out["parameters"] * (4 + 4)
    return out


def _setup(cfg: Config, model_config, hardware: Hardware, prompt_tokens: int | None, *, checkpointing: bool,
           on_phase: Callable[[str], None] | None) -> _Replay:
    """The step's sizes as the run fits them, and its policy on meta tensors (PEFT and a deep copy cannot convert
    fake ones; the caller makes them fake)."""
    from tsopsd.checkpoint import resolve_dtype
    from tsopsd.policy import prepare_policy

    dtype = resolve_dtype(cfg.model.dtype, torch.device(hardware.device)) if cfg.model.dtype != "auto" \
        else torch.bfloat16 if hardware.device == "cuda" else torch.float32
    save_dtype = getattr(model_config, "dtype", None) or dtype  # transformers 5: `torch_dtype` is its deprecated alias
    save_dtype = getattr(torch, save_dtype) if isinstance(save_dtype, str) else save_dtype
    vocab, kv_heads, head_dim = _shape_facts(model_config)
    P = prompt_tokens or cfg.data.max_prompt_tokens or 512
    # as the run fits them to the model's context (`prompts.fit_context`), taking P as the longest prompt
    L, room, _ = fit_context(config_positions(model_config), cfg.rollout.max_new_tokens, P)
    P = min(P, room) if room is not None else P
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_new_tokens=L))
    tracker = Tracker(vocab=vocab, kv_heads=kv_heads, head_dim=head_dim, flops=hardware.flops,
                      bandwidth=hardware.bandwidth, on_phase=on_phase)
    policy = prepare_policy(meta_model(model_config, dtype), cfg.train)
    # A target entropy (from a number or a checkpoint; any positive value plans the same) is tracked.
    tracking = None if cfg.teacher.temperature is not None else (cfg.teacher.target_entropy or 1.0)
    return _Replay(cfg=cfg, model_config=model_config, hardware=hardware, tracker=tracker, policy=policy, dtype=dtype,
                   save_dtype=save_dtype, P=P, L=L, rows=cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt,
                   tau=cfg.teacher.temperature or 1.5, tracking=tracking)


def _load(r: _Replay) -> None:
    """The weights placed (replicated or sharded), the optimizer made; gradients labelled as they land."""
    from tsopsd.policy import make_optimizer

    cfg, tracker, policy = r.cfg, r.tracker, r.policy
    with tracker.in_phase("load"):
        _label_weights(tracker, policy)
        r.backend = r.backend.for_model(causal_lm(policy.teacher.model), cfg.train.parallel, mode=cfg.train.mode,
                                        adapter_input=False, device_memory=r.hardware.memory)
        r.backend.prepare(policy)
        _label_weights(tracker, policy)
        r.optimizer = make_optimizer(policy.trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    for p in policy.trainable:
        if hasattr(p, "register_post_accumulate_grad_hook"):
            p.register_post_accumulate_grad_hook(lambda q: tracker.label([q.grad], "gradients"))


def _rollout(r: _Replay) -> None:
    """One rollout batch, every row to L: DECODE_PROBE decode steps run, the rest extrapolated from them."""
    from tsopsd.prompts import Prompt
    from tsopsd.rollout import sample_rollouts

    cfg, tracker, policy = r.cfg, r.tracker, r.policy
    batch = min(cfg.rollout.batch_size, r.rows)
    with tracker.in_phase("rollout") as record, r.backend.generating(policy), policy.compute():
        tracker.done_reads.clear()
        tracker.stop_decoding_after = DECODE_PROBE
        prompts = [Prompt(ids=[0] * r.P, text="") for _ in range(batch)]
        sample_rollouts(policy.student, _Tokenizer(r.model_config), prompts, samples_per_prompt=1,
                        max_new_tokens=r.L, temperature=1.0, batch_size=batch, seed=0,
                        done_everywhere=r.backend.done_everywhere, engine=cfg.rollout.engine,
                        continuous=False,  # worst case: all rows to L,
                        share_prompts=False,  # each row's own prefill (the rows' prompts are alike here)
                        check_every=1,  # the plan answers each "done?" and probes DECODE_PROBE steps
                        # a GPU run compiles unless told not to ("auto" is on there): its cache is
                        # sized for that (nothing is compiled on fake tensors)
                        compile="false" if cfg.rollout.compile == "false" else "true")
        tracker.stop_decoding_after = None
    # Steps after the probed ones are alike: each adds what the probed ones added on average (to
    # the memory that grows, e.g. a KV cache extended by concatenation, and to the cost).
    reads = tracker.done_reads
    probed, rest = len(reads), max(r.L - len(reads), 0)
    per_step = [(b - a) / (probed - 1) if probed > 1 else 0.0 for a, b in zip(reads[0], reads[-1])]
    record.extra = int(max(per_step[0], 0.0) * rest)
    record.flops += per_step[1] * rest
    record.bytes += per_step[2] * rest
    record.roofline_s += per_step[3] * rest
    r.scale["rollout"] = math.ceil(r.rows / batch)  # rollout batches are alike


def _train(r: _Replay, rollout: Rollout) -> None:
    """Two micro-batches (the second accumulating: the steady state), the tracked tau solved first."""
    from tsopsd.step import teacher_states, train_step
    from tsopsd.teacher import solve_temperature

    cfg, tracker, policy, backend = r.cfg, r.tracker, r.policy, r.backend
    mb = cfg.train.micro_batch
    n_mb = math.ceil(r.rows / mb)
    run_mb = min(2, n_mb)
    with tracker.in_phase("train") as record, torch.autograd.graph.saved_tensors_hooks(
            lambda t: _saved(tracker, t), lambda t: t):
        n_tokens = r.rows * r.L * r.hardware.gpus
        part, hidden = rollout.rows(0, run_mb * mb), None
        if r.tracking:  # the teacher's hidden states of the whole step are kept while tau is solved on them
            hidden = teacher_states(policy, part, micro_batch=mb, skip_empty=not backend.lockstep, share_prompts=False)
            solve_temperature(policy.teacher, hidden, r.tracking, start=r.tau, chunk_size=cfg.loss.chunk_size,
                              max_iter=SOLVE_EVALUATIONS)
            record.extra = (n_mb - run_mb) * mb * r.L * _hidden_size(r.model_config) * r.dtype.itemsize
        unshared = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, share_prompts=False))
        train_step(policy, part, tau=r.tau, cfg=unshared, skip_empty=not backend.lockstep,
                   normalizer=backend.loss_normalizer(n_tokens), teacher_hidden=hidden)
        del hidden
        tracker.label([p.grad for p in policy.trainable], "gradients")
    r.scale["train"] = n_mb / run_mb


def _update(r: _Replay) -> None:
    """Gradients reduced and clipped, the rollback copy, the optimizer step and its state."""
    cfg, tracker, policy, backend, optimizer = r.cfg, r.tracker, r.policy, r.backend, r.optimizer
    with tracker.in_phase("update"):
        backend.reduce_gradients(policy.trainable)
        if cfg.train.max_grad_norm > 0:
            backend.clip_grad_norm(policy.trainable, cfg.train.max_grad_norm)
        if cfg.stop.rollback:
            host = policy.mode == "full" and not backend.lockstep
            with tracker.host() if host else contextlib.nullcontext():
                r.snapshot = backend.snapshot(policy)  # held to the end, as the stop rules hold the last good state
            tracker.label(list(r.snapshot.values()), "weights", host=host)
        optimizer.step()
        tracker.label([v for st in optimizer.state.values() for v in st.values()
                       if isinstance(v, torch.Tensor)], "optimizer state")
        optimizer.zero_grad(set_to_none=True)


def _report(r: _Replay) -> None:
    """The held-out report, scored in training micro-batches; two of them are run, the others add only their
    hidden states (N x D for the model and the reference), which are counted."""
    from tsopsd.metrics import score_rollout

    cfg, policy = r.cfg, r.policy
    eval_rows = min(cfg.rollout.batch_size, _held_out(cfg) * cfg.output.eval_samples_per_prompt)
    run_rows = min(eval_rows, 2 * cfg.train.micro_batch)
    with r.tracker.in_phase("report") as record, r.backend.generating(policy), policy.compute():
        score_rollout(policy.student, worst_case_rollout(run_rows, r.P, r.L), reference=policy.teacher,
                      micro_batch=cfg.train.micro_batch, chunk_size=1024, intervals=False)
        record.extra = (eval_rows - run_rows) * r.L * 2 * _hidden_size(r.model_config) * r.dtype.itemsize
    r.scale["report"] = eval_rows / run_rows


def _save(r: _Replay) -> None:
    """The output as the loop writes it: rounded and gathered (sharded), merged into a copy (LoRA), or cast."""
    from tsopsd.output import written_model

    cfg, policy, save_dtype = r.cfg, r.policy, r.save_dtype
    with r.tracker.in_phase("save"):
        if r.backend.lockstep:  # rounded in place, gathered onto rank 0's host memory and rebuilt there
            r.backend.round_to(policy, save_dtype)
        elif policy.mode == "lora" and cfg.output.save == "merged":
            # `written_model` merges into a copy of the model; PEFT's merge cannot run on fake
            # tensors (it swaps tensors), so the copy it makes is allocated here as it would be.
            copies = [torch.empty_like(p, dtype=save_dtype) for p in policy.student.parameters() if not p.requires_grad]
            del copies
        else:
            written = written_model(policy.student, mode=policy.mode, save=cfg.output.save, save_dtype=save_dtype)
            del written


def _label_weights(tracker: Tracker, policy) -> None:
    params = list(policy.student.parameters()) + list(policy.student.buffers())
    teacher = policy.teacher.model
    if teacher is not policy.student:
        params += list(teacher.parameters()) + list(teacher.buffers())
    tracker.label(params, "weights")


def _saved(tracker: Tracker, t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, torch.Tensor) and is_fake(t):
        entry = tracker.live.get(id(t.untyped_storage()))
        if entry is None or entry[1] not in ("weights", "gradients"):
            tracker.label([t], "activations")
    return t


def _count(policy) -> dict[str, int]:
    def n(ps):
        return sum(p.numel() if not hasattr(p, "full_tensor") else math.prod(p.shape) for p in ps)
    return {"model": n(causal_lm(policy.teacher.model).parameters()) if policy.mode == "full" else
            n(p for p in policy.student.parameters() if not p.requires_grad),
            "trainable": n(policy.trainable)}


def _summary(cfg: Config, hw: Hardware, tracker: Tracker, scale: dict, *, model_config, dtype, P: int,
             backend: str, params: dict) -> dict:
    phases = {}
    for name in PHASES:
        r = tracker.records.get(name)
        if r is None:
            continue
        s = scale.get(name, 1.0)
        grown = "kv cache" if name == "rollout" else "temporaries"  # what the extrapolated steps add to
        phases[name] = {
            "peak_bytes": r.peak + r.extra, "breakdown": {**r.breakdown, grown: r.breakdown.get(grown, 0) + r.extra},
            "most": {**r.most, grown: r.most.get(grown, 0) + r.extra},
            "host_bytes": r.host_peak, "planning_s": r.planning_s, "collectives": dict(r.collectives),
            "flops": r.flops * s, "bytes": r.bytes * s,
            "roofline_s": r.roofline_s * s,
        }
    return {
        "architecture": getattr(model_config, "model_type", "?"),
        "parameters": params["model"], "trainable_parameters": params["trainable"], "dtype": str(dtype).removeprefix("torch."),
        "mode": cfg.train.mode, "backend": backend, "gpus": hw.gpus, "gpu_memory_bytes": hw.memory,
        "gpu_flops": hw.flops, "gpu_bandwidth": hw.bandwidth, "device": hw.device, "figures": hw.figures,
        "prompt_tokens": P, "max_new_tokens": cfg.rollout.max_new_tokens,
        "sequences_per_rank": cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt,
        "phases": phases, **_verdict(phases, hw, heldout_s=_heldout_s(cfg, phases, scale)),
    }


def _held_out(cfg: Config) -> int:
    """Held-out prompts, at most: `output.eval_prompts`, or the default's cap of 16 (min(16, 20%))."""
    return 16 if cfg.output.eval_prompts is None else cfg.output.eval_prompts


def _heldout_s(cfg: Config, phases: dict, scale: dict) -> float:
    """A steered target run's held-out sampling, per step on average: its rollout batches every
    `stop.heldout_every` steps, each costing a step's rollout batch (decoding reads the weights per token,
    whatever the rows)."""
    steered = cfg.teacher.temperature is None and cfg.stop.heldout_every > 0 and _held_out(cfg) > 0
    if not steered or "rollout" not in phases:
        return 0.0
    rows = _held_out(cfg) * cfg.stop.heldout_samples_per_prompt
    batches = math.ceil(rows / cfg.rollout.batch_size)
    return phases["rollout"]["roofline_s"] / scale.get("rollout", 1) * batches / cfg.stop.heldout_every


def _verdict(phases: dict, hw: Hardware, *, heldout_s: float = 0.0) -> dict:
    """The step's peak (which phase), whether it fits with the reserve, and its totals over a step (with a
    steered run's held-out sampling, `heldout_s` a step on average)."""
    peak_phase = max(phases, key=lambda p: phases[p]["peak_bytes"])
    peak = phases[peak_phase]["peak_bytes"]
    reserved = RESERVED_BYTES + int((RESERVED_RATIO - 1) * peak)  # CUDA context and buffers, allocator slack
    usable = hw.memory - reserved
    step_phases = ("rollout", "train", "update")  # what every step runs (check: step 0; report, save: once)
    roofline = sum(phases[p]["roofline_s"] for p in step_phases if p in phases) + heldout_s
    return {
        "peak_bytes": peak, "peak_phase": peak_phase, "reserved_bytes": reserved, "fits": peak <= usable,
        "margin_bytes": usable - peak,
        "step_flops": sum(phases[p]["flops"] for p in step_phases if p in phases),
        "step_bytes": sum(phases[p]["bytes"] for p in step_phases if p in phases),
        "step_roofline_s": roofline, "step_estimate_s": roofline / STEP_EFFICIENCY, "heldout_roofline_s": heldout_s,
        "estimate_calibrated_on": CALIBRATED_ON,
    }


