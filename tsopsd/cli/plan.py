"""`tsopsd plan`: will a reheat run fit? (`reheat --dry-run` prints the same.)

    tsopsd plan ckpt/config.json --config configs/qwen3-4b-1gpu.yaml --gpus 1 --gpu-memory 80GB
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from tsopsd.cli.frame import Debug, Json, emit, run_body
from tsopsd.cli.options import (
    Beta,
    ConfigFile,
    DivergenceOpt,
    DtypeOpt,
    Lr,
    ModeOpt,
    NewTokens,
    ParallelOpt,
    PerStep,
    Samples,
    SaveOpt,
    SetOpt,
    Steps,
    TargetEntropy,
    TargetFrom,
    Temperature,
    overrides_from,
)
from tsopsd.errors import TsopsdError


def _given_hardware(gpus: int, memory: Optional[str], flops: Optional[float], bandwidth: Optional[float],
                    prompt_tokens: Optional[int]):
    """`tsopsd plan`'s --gpus, --gpu-memory, --gpu-flops, --gpu-bandwidth (checked, with --prompt-tokens) as a
    `plan.Hardware`; what is not given is the default's (an 80 GiB H100)."""
    from tsopsd.plan import Hardware, parse_bytes

    if not 1 <= gpus <= 2**16:
        raise TsopsdError(f"--gpus must be in 1..65536, got {gpus}")
    for name, v in (("--gpu-flops", flops), ("--gpu-bandwidth", bandwidth), ("--prompt-tokens", prompt_tokens)):
        if v is not None and not 0 < v < math.inf:
            raise TsopsdError(f"{name} must be a finite number > 0, got {v}")
    if prompt_tokens is not None and prompt_tokens > 2**24:
        raise TsopsdError(f"--prompt-tokens must be <= {2**24} (16M tokens), got {prompt_tokens}")
    default = Hardware()
    size = parse_bytes(memory) if memory is not None else default.memory
    if not 0 < size < 2**60:
        raise TsopsdError(f"--gpu-memory must be a finite size under 1 EiB, got {memory}")
    return Hardware(gpus=gpus, memory=size, flops=flops or default.flops, bandwidth=bandwidth or default.bandwidth)


def plan_and_print(cfg, source: Path, hardware, *, as_json: bool, prompt_tokens: Optional[int] = None) -> dict:
    import warnings

    from tsopsd.console import planning_status
    from tsopsd.plan import plan
    from tsopsd.tables import plan_table

    with warnings.catch_warnings(), planning_status() as on_phase:
        warnings.simplefilter("ignore")  # transformers' deprecation notes about its checkpointing flags
        result = plan(cfg, source, hardware, prompt_tokens=prompt_tokens, on_phase=on_phase)

    def table():
        from rich.console import Group
        from rich.text import Text

        lines = [Text(f"to fit: {tip}") for tip in result["advice"]]
        return Group(plan_table(result), *lines)

    emit(result, as_json=as_json, out=None, table=table)
    if not result["fits"]:  # the plan was printed; a script's `tsopsd plan ... && sbatch ...` must stop here
        gib = 2**30
        raise TsopsdError(f"does not fit: peak {result['peak_bytes'] / gib:.1f} GiB in {result['peak_phase']} + "
                          f"{result['reserved_bytes'] / gib:.1f} GiB reserve > {result['gpu_memory_bytes'] / gib:.0f} GiB "
                          f"per device" + (f"; try {result['advice'][0]}" if result["advice"] else ""))
    return result


def plan(
    source: Annotated[Path, typer.Argument(help="Checkpoint folder or its config.json (only the config is read).")],
    config: ConfigFile = None,
    gpus: Annotated[int, typer.Option(help="Devices (ranks) the run will use.")] = 1,
    gpu_memory: Annotated[Optional[str], typer.Option(help="Memory per device, e.g. 80GB (default 80 GiB).")] = None,
    gpu_flops: Annotated[Optional[float], typer.Option(help="Peak dense FLOP/s per device (default 989e12, H100 bf16).")] = None,
    gpu_bandwidth: Annotated[Optional[float], typer.Option(help="Memory bytes/s per device (default 3.35e12, H100).")] = None,
    prompt_tokens: Annotated[Optional[int], typer.Option(help="Prompt length to plan (default data.max_prompt_tokens, else 512).")] = None,
    temperature: Temperature = None,
    target_entropy: TargetEntropy = None,
    target_entropy_from: TargetFrom = None,
    mode: ModeOpt = None,
    save: SaveOpt = None,
    parallel: ParallelOpt = None,
    divergence: DivergenceOpt = None,
    beta: Beta = None,
    steps: Steps = None,
    prompts_per_step: PerStep = None,
    samples_per_prompt: Samples = None,
    max_new_tokens: NewTokens = None,
    lr: Lr = None,
    dtype: DtypeOpt = None,
    set_: SetOpt = None,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Will a reheat run fit? One worst-case step on fake tensors: peak memory per phase, roofline time."""
    def body() -> None:
        from tsopsd.config import load_config

        overrides = overrides_from(source, dict(
            dtype=dtype, mode=mode, save=save, parallel=parallel, divergence=divergence, beta=beta, steps=steps,
            prompts_per_step=prompts_per_step, samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
            lr=lr, temperature=temperature, target_entropy=target_entropy, target_entropy_from=target_entropy_from),
            set_)
        cfg = load_config(config, overrides, inputs=False)
        plan_and_print(cfg, source, _given_hardware(gpus, gpu_memory, gpu_flops, gpu_bandwidth, prompt_tokens),
                        prompt_tokens=prompt_tokens, as_json=as_json)

    run_body(body, debug=debug)
