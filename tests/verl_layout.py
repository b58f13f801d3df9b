"""Save checkpoints the way verl's FSDP checkpoint manager lays them out, from a real 2-rank FSDP2 run (gloo, CPU).

    torchrun --standalone --nproc_per_node 2 tests/verl_layout.py HF_FOLDER OUT

writes, for the model in HF_FOLDER and for the same model with a random LoRA adapter on it:

    OUT/full/global_step_3/actor/   model_world_size_2_rank_{0,1}.pt, optim_…, extra_state_…, fsdp_config.json,
                                    huggingface/ (config and tokenizer, no weights)
    OUT/lora/global_step_3/actor/   the same, the shards holding the PEFT-wrapped model, plus lora_adapter/
    OUT/{full,lora}/reference_logits.pt   logits of the unsharded model on INPUT_IDS, taken before sharding

Each rank saves `model.state_dict()` of its FSDP2 module (DTensors) with `torch.save`, as verl does. The
shard placement is chosen per parameter: Shard(0) with an uneven split where the first dim is odd (the
odd-width MLP's gate and up projections), else the last dim the world size divides (Shard(1) for most
matrices), so a loader has to follow what the shards record.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

INPUT_IDS = [[5, 17, 42, 99, 7, 3, 250, 11], [8, 8, 1, 300, 64, 2, 19, 77]]


def placement(world: int):
    from torch.distributed.tensor import Shard

    def choose(param: torch.nn.Parameter):
        if param.shape[0] % world:
            return Shard(0)  # uneven: the first rank holds one row more
        for d in reversed(range(param.ndim)):
            if param.shape[d] % world == 0:
                return Shard(d)
        return Shard(0)

    return choose


def shard(model: torch.nn.Module, layers, world: int) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer, shard_placement_fn=placement(world))
    fully_shard(model, shard_placement_fn=placement(world))


def save_actor(model: torch.nn.Module, actor: Path, hf: Path, rank: int, world: int) -> None:
    """What verl's FSDPCheckpointManager.save_checkpoint writes, minus the trainer's own files."""
    from transformers import AutoConfig, AutoTokenizer

    actor.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), actor / f"model_world_size_{world}_rank_{rank}.pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    torch.save(optimizer.state_dict(), actor / f"optim_world_size_{world}_rank_{rank}.pt")
    torch.save({"lr_scheduler": None, "rng": {"cpu": torch.get_rng_state()}},
               actor / f"extra_state_world_size_{world}_rank_{rank}.pt")
    if rank == 0:
        AutoConfig.from_pretrained(str(hf)).save_pretrained(str(actor / "huggingface"))
        AutoTokenizer.from_pretrained(str(hf)).save_pretrained(str(actor / "huggingface"))
        (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": world}, indent=4))


def main(hf: Path, out: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    init_device_mesh("cpu", (world,))
    ids = torch.tensor(INPUT_IDS)

    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    if rank == 0:
        (out / "full").mkdir(parents=True, exist_ok=True)
        torch.save(model(ids).logits.detach(), out / "full" / "reference_logits.pt")
    shard(model, model.model.layers, world)
    save_actor(model, out / "full" / "global_step_3" / "actor", hf, rank, world)
    dist.barrier()

    torch.manual_seed(11)
    base = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config)
    peft_model.peft_config["default"].base_model_name_or_path = "Qwen/Qwen3-8B"  # verl records the hub name
    if rank == 0:
        (out / "lora").mkdir(parents=True, exist_ok=True)
        torch.save(peft_model(ids).logits.detach(), out / "lora" / "reference_logits.pt")
    shard(peft_model, peft_model.base_model.model.model.layers, world)
    actor = out / "lora" / "global_step_3" / "actor"
    save_actor(peft_model, actor, hf, rank, world)
    # verl's lora_adapter/: the LoRA tensors gathered in full, under PEFT's saved names (no adapter name)
    lora = {k.replace(".default", ""): v.full_tensor().detach().clone()
            for k, v in peft_model.state_dict().items() if "lora_" in k}
    if rank == 0:
        (actor / "lora_adapter").mkdir()
        save_file(lora, str(actor / "lora_adapter" / "adapter_model.safetensors"))
        peft_model.peft_config["default"].save_pretrained(str(actor / "lora_adapter"))
    dist.barrier()  # every rank's files are written
    # Out without tearing the group down or the interpreter's shutdown: under load a gloo thread still joinable
    # there aborts the process ("terminate called without an active exception", exit -6) after its work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
