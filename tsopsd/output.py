"""The output folder of `tsopsd reheat`: weights or adapter, tokenizer, config, metrics, report, card.

    model = written_model(trained_student, mode="lora", save="merged", save_dtype=torch.bfloat16)
    write_output(cfg, model, tokenizer=tok, report=report, metrics=run_dir / "metrics.jsonl")

Written into a temporary folder beside OUT and renamed into place (`checkpoint.atomic_output`), so a
folder at OUT is always complete. Plain `transformers`/`peft` load what is written, without tsopsd.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from tsopsd import __version__
from tsopsd.checkpoint import atomic_output, loadable_folder
from tsopsd.config import Config, save_config


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


def model_card(report: dict) -> str:
    """The output's README.md: what was done, and entropy before and after."""
    b, a = report.get("before") or {}, report.get("after") or {}
    ent = lambda r: f"{r['entropy']['mean']:.4f}" if r else "n/a"  # noqa: E731
    agree = a.get("reference", {}).get("top1_agreement") if a else None
    return (
        "---\nlibrary_name: transformers\ntags: [tsopsd, reheated]\n---\n\n"
        f"# Reheated with tsopsd {__version__}\n\n"
        f"Input checkpoint: `{report['input']}`. Method: TS-OPSD (temperature-scaled on-policy self-distillation), "
        f"{teacher_line(report)}, divergence `{report['divergence']}`, "
        f"mode `{report['mode']}`, {report['steps_run']} steps (stopped: {report['stop_reason']}).\n\n"
        f"| | before | after |\n|---|---|---|\n| mean token entropy (nats, held-out prompts) | {ent(b)} | {ent(a)} |\n"
        f"| top-1 agreement with input | 1.000 | {agree if agree is None else f'{agree:.3f}'} |\n\n"
        "Files: `config.yaml` (the resolved run config), `metrics.jsonl` (one line per step), "
        "`reheat_report.json` (before/after metrics).\n"
    )


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
        return _cast(merged, save_dtype)
    return _cast(student, save_dtype)


@torch.no_grad()
def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
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


def write_output(cfg: Config, model, *, tokenizer, report: dict, metrics: Path) -> None:
    """Write the output folder `cfg.output.out` atomically (replacing one only with overwrite or resume).

    `model` is what `written_model` gave: a PEFT adapter, or the merged and cast checkpoint.
    """
    out = Path(cfg.output.out)
    with atomic_output(out, overwrite=cfg.output.overwrite or cfg.output.resume) as tmp:
        if cfg.output.save == "adapter":
            base = loadable_folder(cfg.model.path) or Path(cfg.model.path)  # a verl actor: its huggingface/
            model.peft_config["default"].base_model_name_or_path = str(base.resolve())
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        save_config(cfg, tmp / "config.yaml")
        shutil.copy(metrics, tmp / "metrics.jsonl")
        (tmp / "reheat_report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(report))
