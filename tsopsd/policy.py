"""The student and its frozen teacher, in LoRA or full fine-tuning mode.

    policy = prepare_policy(model, train_cfg)
    policy.student, policy.teacher (a Scorer), policy.trainable

- LoRA: the student is a PEFT model over the checkpoint; the teacher is the *same module* with the
  adapter disabled, so there is no second copy of the weights, and the base weights are frozen.
- Full: the student is the checkpoint with every parameter trainable; the teacher is one frozen
  copy in eval mode. A checkpoint loaded in bf16/fp16 is trained with **fp32 master weights and
  bf16/fp16 compute**: the student's parameters (and so its gradients and AdamW state) are float32,
  and its forwards run under `torch.autocast` in the loaded dtype; the teacher stays in the loaded
  dtype (exactly the input). Plain bf16 parameters would lose every update smaller than their
  resolution (2^-8 relative): at lr 2e-6 that is most of them.

Both stay in eval mode throughout: dropout would make the student disagree with its own rollouts
and the teacher disagree with itself. Activation checkpointing (`enable_checkpointing`) goes through
the model's own mechanism, which asks each decoder layer's `training` flag: only the layers' own
flags are set, their submodules (dropout) stay in eval mode.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from tsopsd.config import TrainConfig
from tsopsd.errors import TsopsdError
from tsopsd.family import plain_tensor
from tsopsd.scoring import Scorer


@dataclass
class Policy:
    student: torch.nn.Module
    teacher: Scorer  # the checkpoint as loaded, frozen; tau divides its logits in the loss only, so
    # the same Scorer at T=1 is the "original" that drift metrics compare against
    trainable: list[torch.nn.Parameter]
    mode: str
    compute_dtype: torch.dtype | None = None  # the student's forwards autocast to this (fp32 masters)

    def compute(self):
        """The context every student forward runs in: autocast to the compute dtype, or nothing."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        device = next(self.student.parameters()).device
        return torch.autocast(device.type, dtype=self.compute_dtype)

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
    """AdamW, fused into one kernel where torch has one (plain CPU/CUDA tensors): faster than the default
    per-tensor loop (docs/performance.md). Sharded (DTensor) parameters get the default implementation."""
    fused = bool(params) and all(plain_tensor(p.data) and p.device.type in ("cpu", "cuda")
                                 and p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def lora_target_modules(spec: str) -> str | list[str]:
    return spec if spec == "all-linear" else [m.strip() for m in spec.split(",") if m.strip()]


def prepare_policy(model: torch.nn.Module, cfg: TrainConfig) -> Policy:
    """Wrap a loaded causal LM as a trainable student with a frozen teacher.

    Full mode on a bf16/fp16 model: the teacher keeps the loaded model, the student is a float32 copy
    (master weights) whose forwards autocast to the loaded dtype.
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=lora_target_modules(cfg.lora_target_modules), task_type="CAUSAL_LM")
        try:
            student = get_peft_model(model, lora)
        except ValueError as e:  # peft: no module of the model matches the names (nothing was injected)
            raise TsopsdError(f"train.lora_target_modules {cfg.lora_target_modules!r}: {str(e).splitlines()[0]} "
                              "(all-linear, or names such as q_proj,v_proj)") from None
        student.eval()
        trainable = [p for p in student.parameters() if p.requires_grad]
        frozen = Scorer(student, adapter_disabled=True)
        return Policy(student=student, teacher=frozen, trainable=trainable, mode="lora")
    loaded = next(model.parameters()).dtype
    compute = loaded if loaded in (torch.bfloat16, torch.float16) else None
    teacher_model = copy.deepcopy(model).eval()
    student = model.float() if compute is not None else model
    for p in student.parameters():
        p.requires_grad_(True)
    return Policy(student=student, teacher=Scorer(teacher_model), trainable=list(student.parameters()), mode="full",
                  compute_dtype=compute)


def enable_checkpointing(policy: Policy) -> None:
    """Recompute each decoder layer of the student in backward instead of keeping its activations.

    Through transformers' own activation checkpointing (non-reentrant); the layers' own `training`
    flags are set because that is what the model checks, their submodules stay in eval mode. The
    teacher's and the rollout's forwards run without gradients, where nothing is checkpointed.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    from tsopsd.family import causal_lm

    lm = causal_lm(policy.student)
    enable = getattr(lm, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for m in lm.modules():
        if isinstance(m, GradientCheckpointingLayer):
            m.training = True  # the flag the layer checks; not `.train()`, which would reach dropout
