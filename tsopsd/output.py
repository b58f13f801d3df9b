"""The output folder of `tsopsd reheat`: weights or adapter, tokenizer, config, metrics, report, card.

    model = written_model(trained_student, mode="lora", save="merged", save_dtype=torch.bfloat16)
    write_output(cfg, model, tokenizer=tok, report=report, metrics=run_dir / "metrics.jsonl")

Written into a temporary folder beside OUT and renamed into place (`writing.atomic_output`), so a
folder at OUT is always complete. Plain `transformers`/`peft` load what is written, without tsopsd.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
import yaml

from tsopsd import __version__
from tsopsd.config import Config, save_config
from tsopsd.errors import TsopsdError
from tsopsd.folders import loadable_folder
from tsopsd.writing import atomic_output


def versions() -> dict[str, str]:
    import peft
    import transformers

    return {"tsopsd": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def teacher_line(report: dict, digits: int = 4) -> str:
    """How the report's teacher was heated: its fixed tau, or the target and the range tau moved in."""
    taus, target = report.get("teacher_temperature_over_run") or [], report.get("target_entropy")
    if target is None:
        return f"teacher temperature tau = {report['teacher_temperature']:.{digits}f}"
    moved = f" (tau re-solved every step: {min(taus):.{digits}f} to {max(taus):.{digits}f})" if taus else ""
    return f"target entropy {target:.4f} nats{moved}"


def _outcome(report: dict) -> str:
    """The card's word on the outcome: nothing when the goal was met, else what was missed."""
    status, goal = report.get("status", "met"), report.get("goal") or {}
    if status == "met":
        return ""
    what = "A guard stopped training; these are the last weights that passed it" if status == "guard_stop" else \
        f"**The goal was not met**: {goal.get('evidence', '')}"
    return f"{what}. Check `reheat_report.json` before continuing RL from it.\n\n"


def model_card(report: dict) -> str:
    """The output's README.md: Hub metadata (base model, library, tags), what was done, and the before/after
    on held-out prompts, each entropy with its 95% interval, against the target when there was one."""
    b, a = report.get("before") or {}, report.get("after") or {}
    target = report.get("target") or {}

    def ent(r):
        if not r:
            return "n/a"
        ci = (r.get("intervals") or {}).get("entropy")
        return f"{r['entropy']['mean']:.4f}" + (f" ({ci[0]:.4f}-{ci[1]:.4f})" if ci else "")

    agree = a.get("reference", {}).get("top1_agreement") if a else None
    adapter = report.get("save") == "adapter"
    base = report.get("base_model") or report.get("input_resolved") or report["input"]
    meta = {"base_model": base, "library_name": "peft" if adapter else "transformers",
            "tags": ["tsopsd", "reheated", "ts-opsd"] + (["lora"] if adapter else []),
            "pipeline_tag": "text-generation"}
    rows = [f"| mean token entropy (nats, held-out prompts, 95% CI) | {ent(b)} | {ent(a)} |",
            f"| top-1 agreement with input | 1.000 | {agree if agree is None else f'{agree:.3f}'} |"]
    if target:
        rows.append(f"| vs target {target['entropy']:.4f} nats | "
                    + " | ".join(f"{target[k]['relative_error']:+.1%}" if target.get(k) else "n/a"
                                 for k in ("before", "after")) + " |")
        if target.get("after_training_prompts"):
            rows.append(f"| on training prompts, after | | {target['after_training_prompts']['entropy']:.4f} "
                        f"({target['after_training_prompts']['relative_error']:+.1%}) |")
    return (
        "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n"
        f"# Reheated with tsopsd {__version__}\n\n"
        f"Input checkpoint: `{report.get('input_resolved') or report['input']}`. " + _method(report) + "\n\n"
        + _outcome(report) +
        "| | before | after |\n|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "Sample it at temperature 1.0: the entropy is in the weights.\n\n"
        "Files: `config.yaml` (the resolved run config), `metrics.jsonl` (one line per step), "
        "`reheat_report.json` (before/after metrics, input fingerprints).\n"
    )


def _method(report: dict) -> str:
    if report.get("method") == "scale":
        return (f"Method: the closed form of TS-OPSD, its loss's exact optimum by a weight edit (no training): "
                f"{report['stop_reason']}.")
    return (f"Method: TS-OPSD (temperature-scaled on-policy self-distillation), {teacher_line(report)}, divergence "
            f"`{report['divergence']}`, mode `{report['mode']}`, {report['steps_run']} steps (stopped: "
            f"{report['stop_reason']}).")


def adapter_record(adapter: Path) -> dict | None:
    """The reheat's report beside an adapter (None: an adapter tsopsd did not write), checked before a merge starts.

    Raises:
        TsopsdError: a report that is not a JSON object of a reheat (edited or damaged).
    """
    path = Path(adapter) / "reheat_report.json"
    if not os.path.lexists(path):
        return None
    try:
        report = json.loads(path.read_bytes().decode("utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError):
        report = None
    if not isinstance(report, dict) or not isinstance(report.get("input"), str) or not isinstance(
            report.get("steps_run"), int):
        raise TsopsdError(f"{path} is damaged (not a reheat's report): move it away to merge without the record")
    return report


def carry_record(adapter: Path, folder: Path, base: str | os.PathLike | None = None) -> None:
    """`tsopsd merge` of a reheat's adapter: the merged folder keeps the reheat's record (report, metrics, config)
    and gets a card of its own (`library_name: transformers`); the report says what was merged, and onto which
    base when it was not the adapter's own. An adapter that tsopsd did not write has no record: nothing to carry."""
    adapter = Path(adapter)
    report = adapter_record(adapter)
    if report is None:
        return
    report |= {"save": "merged", "merged_from": str(adapter.resolve())}
    if base is not None:
        report |= {"base_model": str(Path(base).resolve()), "merged_onto": str(Path(base).resolve())}
    for name in ("metrics.jsonl", "config.yaml"):
        if (adapter / name).is_file():
            shutil.copy(adapter / name, folder / name)
    (folder / "reheat_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "README.md").write_text(model_card(report))


def written_model(student, *, mode: str, save: str, save_dtype: torch.dtype, keep_student: bool = True):
    """The model the output folder will hold, so that the after-report measures exactly that.

    adapter: the PEFT student as trained. merged LoRA: a copy with the adapter merged into the base and
    cast to `save_dtype` (the student stays intact with `keep_student`: its base is the teacher).
    full: the student cast to `save_dtype`, in place (training is over).
    """
    if save == "adapter":
        return student
    if mode == "lora":
        merged = (copy.deepcopy(student) if keep_student else student).merge_and_unload()
        return cast_model(merged, save_dtype)
    return cast_model(student, save_dtype)


@torch.no_grad()
def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model.to(dtype)` for what is saved (parameters, persistent buffers), one tensor at a time.

    New parameter objects are put in place rather than their data swapped, which `tsopsd plan`'s fake
    tensors do not support.
    """
    done: dict[int, torch.nn.Parameter] = {}  # tied weights stay one tensor
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                if id(p) not in done:
                    done[id(p)] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
                module._parameters[name] = done[id(p)]
        for name, b in list(module._buffers.items()):  # only what is saved: a rotary table is rebuilt at load
            if b is not None and b.is_floating_point() and b.dtype != dtype \
                    and name not in module._non_persistent_buffers_set:
                module._buffers[name] = b.to(dtype)
    return model


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # instant, and no second copy of the weights on disk
    except OSError:
        shutil.copy2(src, dst)


def provenance(cfg: Config) -> Config:
    """The config as the output records it: every path resolved (where it was, not as typed), and the
    one-off switches of the command that wrote it (overwrite, resume) off, so it reruns as a fresh run."""
    import dataclasses

    def real(p):
        return str(Path(p).resolve()) if p else p

    t = cfg.teacher
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, path=real(cfg.model.path), base=real(cfg.model.base)),
        data=dataclasses.replace(cfg.data, prompts=real(cfg.data.prompts), eval_prompts=real(cfg.data.eval_prompts)),
        teacher=dataclasses.replace(t, target_entropy_from=real(t.target_entropy_from)),
        output=dataclasses.replace(cfg.output, out=real(cfg.output.out), overwrite=False, resume=False))




@torch.no_grad()
def plain_weights(student, state: dict[str, torch.Tensor], *, mode: str,
                  save_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights a merged checkpoint holds, from the student's `state` dict, by their plain names, cast to
    `save_dtype`, on the CPU, one tensor at a time; the student is not touched (training goes on). A LoRA layer's
    weight is its base weight plus scaling x B @ A, added in float32 (peft's merge adds in the weights' dtype)."""
    if mode == "full":
        return {k: v.detach().to("cpu", save_dtype) for k, v in state.items()}
    layers = {name: m for name, m in student.named_modules() if "default" in getattr(m, "lora_A", {})}
    out = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        owner, base, leaf = key.rpartition(".base_layer.")
        if base:
            if leaf == "weight" and owner in layers:
                m = layers[owner]
                delta = state[f"{owner}.lora_B.default.weight"].float() @ state[f"{owner}.lora_A.default.weight"].float()
                value = value.float() + (delta.T if m.fan_in_fan_out else delta) * m.scaling["default"]
            key = f"{owner}.{leaf}"
        out[key.removeprefix("base_model.model.")] = value.detach().to("cpu", save_dtype)
    return out


def write_checkpoint(folder: Path, student, state: dict[str, torch.Tensor], *, mode: str, save: str,
                     save_dtype: torch.dtype, base: str, tokenizer) -> None:
    """A loadable checkpoint of the training so far (`output.checkpoint_every`) at `folder` (`checkpoint-N` in the
    run folder; `write_output` links them into OUT), from the student's whole `state` dict (gathered, when
    sharded): an adapter, or the merged weights, with the tokenizer. Written beside and renamed into place; one
    left by a killed write is replaced."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from tsopsd.writing import follow_umask

    tmp = folder.with_name(f".{folder.name}.tmp")
    for old in (tmp, folder):
        shutil.rmtree(old, ignore_errors=True)
    tmp.mkdir(parents=True)
    if save == "adapter":  # what peft's save_pretrained writes, from the given state
        adapter = get_peft_model_state_dict(student, state_dict=state)
        save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()}, tmp / "adapter_model.safetensors",
                  metadata={"format": "pt"})
        config = copy.copy(student.peft_config["default"])
        config.base_model_name_or_path = adapter_base(base)
        config.save_pretrained(str(tmp))
    else:
        lm = student.get_base_model() if mode == "lora" else student
        lm.save_pretrained(str(tmp), state_dict=plain_weights(student, state, mode=mode, save_dtype=save_dtype))
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = str(save_dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(str(tmp))
    follow_umask(tmp)
    tmp.rename(folder)


def adapter_base(model_path: str) -> str:
    """What an adapter's adapter_config.json names as its base: the input's resolved folder (a verl actor: its
    huggingface/)."""
    return str((loadable_folder(model_path) or Path(model_path)).resolve())


def write_output(cfg: Config, model, *, tokenizer, report: dict, metrics: Path) -> None:
    """Write the output folder `cfg.output.out` atomically (replacing one only with overwrite or resume).

    `model` is what `written_model` gave: a PEFT adapter, or the merged and cast checkpoint.
    """
    out = Path(cfg.output.out)
    with atomic_output(out, overwrite=cfg.output.overwrite or cfg.output.resume) as tmp:
        if cfg.output.save == "adapter":
            model.peft_config["default"].base_model_name_or_path = adapter_base(cfg.model.path)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        save_config(provenance(cfg), tmp / "config.yaml")
        shutil.copy(metrics, tmp / "metrics.jsonl")
        for name in report["checkpoints"]:  # the run's checkpoint-N folders, linked (the run folder keeps them
            shutil.copytree(metrics.parent / name, tmp / name, copy_function=_link)  # until OUT is in place)
        (tmp / "reheat_report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(report))
