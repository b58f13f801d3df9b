"""The output folder of `tsopsd reheat`: weights or adapter, tokenizer, config, metrics, report, card.

    write_output(cfg, trained_student, mode="lora", tokenizer=tok, save_dtype=torch.bfloat16,
                 report=report, metrics=run_dir / "metrics.jsonl")

Written into a temporary folder beside OUT and renamed into place (`checkpoint.atomic_output`), so a
folder at OUT is always complete. Plain `transformers`/`peft` load what is written, without tsopsd.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tsopsd import __version__
from tsopsd.checkpoint import atomic_output
from tsopsd.config import Config, save_config


def versions() -> dict[str, str]:
    import peft
    import transformers

    return {"tsopsd": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def model_card(report: dict) -> str:
    """The output's README.md: what was done, and entropy before and after."""
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


def write_output(cfg: Config, student, *, mode: str, tokenizer, save_dtype: torch.dtype, report: dict,
                 metrics: Path) -> None:
    """Write the output folder `cfg.output.out` atomically (replacing one only with overwrite or resume)."""
    out = Path(cfg.output.out)
    with atomic_output(out, overwrite=cfg.output.overwrite or cfg.output.resume) as tmp:
        if cfg.output.save == "adapter":
            student.peft_config["default"].base_model_name_or_path = str(Path(cfg.model.path).resolve())
            student.save_pretrained(str(tmp))
        else:
            merged = student.merge_and_unload() if mode == "lora" else student
            merged.to(save_dtype).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        save_config(cfg, tmp / "config.yaml")
        shutil.copy(metrics, tmp / "metrics.jsonl")
        (tmp / "reheat_report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(report))
