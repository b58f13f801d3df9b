"""What would make a plan that does not fit fit: the knobs of its peak phase, with values (`advice`)."""

from __future__ import annotations

import math

from tsopsd.config import Config
from tsopsd.plan.hardware import GiB


def advice(cfg: Config, r: dict) -> list[str]:
    """What would make a plan that does not fit fit: the knobs of its peak phase, with values."""
    if r["fits"]:
        return []
    phase, over = r["peak_phase"], -r["margin_bytes"]
    b = r["phases"][phase]["breakdown"]
    tips = []
    state = b.get("weights", 0) + b.get("optimizer state", 0) + b.get("gradients", 0)
    if phase == "update":  # the optimizer's state as it is made, and its per-parameter working copies: sharded too
        state += b.get("temporaries", 0)
    if phase in ("rollout", "report"):
        batch = min(cfg.rollout.batch_size, r["sequences_per_rank"])
        per_row = (b.get("kv cache", 0) + b.get("temporaries", 0) + b.get("logits chunks", 0)) / max(batch, 1)
        fitting = int(batch - math.ceil(over / per_row)) if per_row else 0
        if fitting >= 1:
            tips.append(f"rollout.batch_size: {fitting} (each sequence sampled at once holds {per_row / GiB:.2f} GiB "
                        f"of KV cache and temporaries)")
    kept = b.get("kv cache", 0) if phase in ("check", "train", "update") else 0
    if kept and cfg.rollout.compile != "false":
        tips.append(f"rollout.compile: false (the compiled decode step keeps {kept / GiB:.1f} GiB of KV cache, and "
                    "its weight copies, between rollouts, where its CUDA graphs read them; eager decoding frees them)")
    if phase == "train":
        if not r["activation_checkpointing"]:
            tips.append("train.activation_checkpointing: true (recompute layers in backward instead of keeping "
                        f"{b.get('activations', 0) / GiB:.1f} GiB of activations)")
        act = b.get("activations", 0)
        if act:
            per_seq = act / min(cfg.train.micro_batch, r["sequences_per_rank"])
            fitting = int(cfg.train.micro_batch - math.ceil(over / per_seq))
            if fitting >= 1:
                tips.append(f"train.micro_batch: {fitting}")
    if phase in ("train", "check", "report") and b.get("logits chunks", 0) > over:
        tips.append(f"loss.chunk_size: {max(cfg.loss.chunk_size // 2, 64)} (logits chunks hold "
                    f"{b['logits chunks'] / GiB:.1f} GiB)")
    if state > over:
        usable = r["peak_bytes"] + r["margin_bytes"]  # what a device has for the step
        room = usable - (r["peak_bytes"] - state)  # ... for the part FSDP shards
        gpus = r["gpus"] * math.ceil(state / room) if room > 0 else None
        many = f"at least {gpus} GPUs (plan that many: FSDP's gathers add to it)" if gpus else "more GPUs"
        if cfg.train.mode == "full":
            tips.append(f"{many} with train.parallel: fsdp (weights, gradients and optimizer state, "
                        f"{state / GiB:.1f} GiB here, are sharded over them), or train.mode: lora")
        else:
            tips.append(f"{many} with train.parallel: fsdp (the frozen weights are sharded over them)")
    return tips or [f"the {phase} phase needs {over / GiB:.1f} GiB more than there is: a smaller model or a "
                    "larger device"]
