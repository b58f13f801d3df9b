"""The student and its frozen teacher, in LoRA or full fine-tuning mode.

    policy = prepare_policy(model, train_cfg)
    policy.student, policy.teacher (a Scorer), policy.trainable

- LoRA: the student is a PEFT model over the checkpoint; the teacher is the *same module* with the
  adapter disabled, so there is no second copy of the weights, and the base weights are frozen.
- Full: the student is the checkpoint with every parameter trainable; the teacher is one frozen
  copy in eval mode.

Both stay in eval mode throughout: dropout would make the student disagree with its own rollouts
and the teacher disagree with itself.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from tsopsd.config import TrainConfig
from tsopsd.scoring import Scorer


@dataclass
class Policy:
    student: torch.nn.Module
    teacher: Scorer  # the checkpoint as loaded, frozen; tau divides its logits in the loss only, so
    # the same Scorer at T=1 is the "original" that drift metrics compare against
    trainable: list[torch.nn.Parameter]
    mode: str

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Names and values of the trainable parameters (what a resume or a rollback needs)."""
        names = {id(p): n for n, p in self.student.named_parameters()}
        return {names[id(p)]: p.detach() for p in self.trainable}

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.student.named_parameters())
        for name, value in state.items():
            params[name].copy_(value if value.device == params[name].device else value.to(params[name].device))


def make_optimizer(params: list[torch.nn.Parameter], *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused into one kernel where torch has one (plain CPU/CUDA tensors): 4x faster than the
    default per-tensor loop on CPU. Sharded (DTensor) parameters get the default implementation."""
    fused = bool(params) and all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda")
                                 and p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def lora_target_modules(spec: str) -> str | list[str]:
    return spec if spec == "all-linear" else [m.strip() for m in spec.split(",") if m.strip()]


def prepare_policy(model: torch.nn.Module, cfg: TrainConfig) -> Policy:
    """Wrap a loaded causal LM as a trainable student with a frozen teacher."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=lora_target_modules(cfg.lora_target_modules), task_type="CAUSAL_LM")
        student = get_peft_model(model, lora)
        student.eval()
        trainable = [p for p in student.parameters() if p.requires_grad]
        frozen = Scorer(student, adapter_disabled=True)
        return Policy(student=student, teacher=frozen, trainable=trainable, mode="lora")
    teacher_model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    frozen = Scorer(teacher_model)
    return Policy(student=model, teacher=frozen, trainable=list(model.parameters()), mode="full")
