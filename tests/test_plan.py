"""`tsopsd plan`: its peaks against a real step's, the shipped configs at their real sizes, bad input.

The measured side (`tests/memory_probe.py`) runs the same functions on real tensors of a random
model in a subprocess and reads its resident memory per phase (glibc's mmap threshold pinned so that
freed tensors leave RSS). On a CPU the plan's device and host bytes are the same memory, so the
comparison is against their sum.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tsopsd.cli import app
from tsopsd.config import load_config
from tsopsd.decode import COMPILED_WIDTHS
from tsopsd.errors import TsopsdError
from tsopsd.plan import PHASES, RESERVED_BYTES, Hardware, load_model_config, parse_bytes, plan

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30

# (hidden, intermediate, layers, vocab): ~30M, ~50M and ~110M parameters. The probe takes out of each
# phase what RSS held at its start that is not tensors (Python objects, allocator and library state:
# ~20 MiB after a training step, which at 30M parameters was 15% of the LoRA update phase).
SIZES = {"30M": (384, 1152, 6, 24000), "50M": (512, 1536, 6, 32000), "110M": (768, 2304, 8, 32000)}
PROBE = {"model.dtype": "float32", "rollout.engine": "model", "rollout.prompts_per_step": "2",
         "rollout.samples_per_prompt": "2", "rollout.batch_size": "4", "rollout.max_new_tokens": "96",
         "data.max_prompt_tokens": "64", "train.micro_batch": "2", "loss.chunk_size": "128",
         "teacher.temperature": "1.5"}


def _qwen3(folder: Path, hidden: int, intermediate: int, layers: int, vocab: int, **extra) -> Path:
    from transformers import Qwen3Config

    Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 128, 1), head_dim=64,
                tie_word_embeddings=False, eos_token_id=1, pad_token_id=0, **extra).save_pretrained(folder)
    return folder


def _measure(folder: Path, mode: str, **extra: str) -> tuple[Path, dict, dict[str, int]]:
    sets = {**PROBE, "train.mode": mode, **extra}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    probe = subprocess.run([sys.executable, str(ROOT / "tests" / "memory_probe.py"), str(ROOT / "configs/default.yaml"),
                            str(folder), *[f"{k}={v}" for k, v in sets.items()]],
                           capture_output=True, text=True, env=env, timeout=600)
    assert probe.returncode == 0, probe.stderr[-2000:]
    return folder, sets, json.loads(probe.stdout.strip().splitlines()[-1])


def _compare(folder: Path, sets: dict, measured: dict[str, int], label: str) -> dict[str, tuple[float, float]]:
    """Plan (in this process: `plan` is not thread-safe) and hold it against the measured peaks: on a CPU
    device and host bytes are the same memory (their sum), on a GPU the device's alone."""
    cfg = load_config(ROOT / "configs/default.yaml", sets, inputs=False)
    planned = plan(cfg, folder, Hardware(memory=64 * GiB))["phases"]
    out = {}
    for phase, real in measured.items():
        p = planned[phase]["peak_bytes"] + (planned[phase]["host_bytes"] if cfg.model.device != "cuda" else 0)
        out[phase] = (p, real)
        print(f"{label} {phase:8s} plan {p / 2**20:8.1f} MiB  measured {real / 2**20:8.1f} MiB  ratio {p / real:.3f}")
    return out


def _check(result: dict[str, tuple[float, float]]) -> None:
    off = {ph: round(p / real, 3) for ph, (p, real) in result.items() if abs(p / real - 1) > 0.15}
    assert not off, f"plan / measured outside 15%: {off}"


def _agrees(tmp_path: Path, size: str) -> None:
    folder = _qwen3(tmp_path / size, *SIZES[size])  # here: transformers' lazy imports are not thread-safe
    with ThreadPoolExecutor(2) as pool:  # the two measuring subprocesses at once: two cores
        measured = list(pool.map(lambda mode: _measure(folder, mode), ["lora", "full"]))
    for mode, (folder, sets, peaks) in zip(["lora", "full"], measured):
        _check(_compare(folder, sets, peaks, f"{size} {mode}"))


@pytest.mark.slow  # a real step measured beside its plan: make test-slow (the shipped configs' plans stay in make test)
def test_plan_agrees_with_a_measured_step(tmp_path):
    """~50M parameters, LoRA and full."""
    _agrees(tmp_path, "50M")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu.sh on a lent GPU)")
def test_plan_agrees_with_max_memory_allocated_on_a_gpu(tmp_path):
    """A ~0.6B Qwen3 shape (28 x 1024, vocab 151,936) in bf16, LoRA and full: the plan's device peak per phase against
    `torch.cuda.max_memory_allocated` of the same functions on real tensors (`memory_probe.py` on cuda)."""
    folder = _qwen3(tmp_path / "q06b", 1024, 3072, 28, 151936)
    for mode in ("lora", "full"):
        # compile off: CUDA graphs' private pool is not the plan's (docs/performance.md)
        _check(_compare(*_measure(folder, mode, **{"model.device": "cuda", "model.dtype": "bfloat16",
                                                   "rollout.compile": "false"}), f"gpu 0.6B {mode}"))


@pytest.mark.slow
@pytest.mark.parametrize("size", ["30M", "110M"])
def test_plan_agrees_with_a_measured_step_at_more_sizes(tmp_path, size):
    _agrees(tmp_path, size)


# ---- the shipped configs at the sizes they name --------------------------------------------------
QWEN3 = {  # the published architectures: layers, hidden, intermediate, heads, KV heads, head dim, tied
    "Qwen3-4B": dict(num_hidden_layers=36, hidden_size=2560, intermediate_size=9728, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen3-8B": dict(num_hidden_layers=36, hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
SHIPPED = [  # config, the model it names, GPUs (80 GB each) it names
    ("qwen3-4b-1gpu.yaml", "Qwen3-4B", 1),
    ("qwen3-8b-full-8gpu.yaml", "Qwen3-8B", 8),
]


def _real_config(folder: Path, name: str) -> Path:
    from transformers import Qwen3Config

    Qwen3Config(vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000, rms_norm_eps=1e-6,
                eos_token_id=151645, pad_token_id=151643, dtype="bfloat16", **QWEN3[name]).save_pretrained(folder)
    return folder


def test_every_gpu_config_is_planned_here():
    named = sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if "gpu" in p.name)
    assert named == sorted(c for c, _, _ in SHIPPED), "a new GPU config needs a line in SHIPPED"


def test_shipped_gpu_configs_fit_their_hardware(tmp_path):
    """Each GPU config planned from a config.json of the architecture it names, through the CLI."""
    def run(entry):
        config, name, gpus = entry
        folder = _real_config(tmp_path / name, name)
        proc = subprocess.run([sys.executable, "-m", "tsopsd", "plan", str(folder), "--config",
                               str(ROOT / "configs" / config), "--gpus", str(gpus), "--gpu-memory", "80GB", "--json"],
                              capture_output=True, text=True, timeout=900, cwd=tmp_path)
        return entry, proc

    from transformers import Qwen3Config  # noqa: F401  imported once here: transformers' lazy import is not thread-safe

    with ThreadPoolExecutor(2) as pool:  # two cores: both at once
        results = list(pool.map(run, SHIPPED))
    for (config, name, gpus), proc in results:
        assert proc.returncode == 0, proc.stderr[-2000:]
        r = json.loads(proc.stdout)
        print(f"{config} ({name}, {gpus} x 80 GiB): peak {r['peak_bytes'] / GiB:.1f} GiB in {r['peak_phase']}, "
              f"margin {r['margin_bytes'] / GiB:+.1f} GiB, roofline {r['step_roofline_s']:.0f} s/step")
        assert r["parameters"] > 3.5e9 and r["gpus"] == gpus
        assert r["fits"], (config, r["peak_phase"], r["margin_bytes"] / GiB, r["advice"])


def test_the_plan_sizes_the_kv_cache_a_compiled_decode_step_rounds_up(tmp_path):
    """`rollout.compile` on (or auto: a GPU run compiles) rounds the decode cache up to a multiple of
    `decode.COMPILED_WIDTHS` columns; the plan's rollout peak holds exactly those extra keys, values and mask."""

    folder = _qwen3(tmp_path / "m", 256, 512, 2, 4000)  # 2 layers, 2 KV heads of 64
    sets = {**PROBE, "rollout.engine": "auto", "rollout.max_new_tokens": "400"}  # 64 + 400 columns: 512 compiled
    peaks = {c: plan(load_config(ROOT / "configs/default.yaml", {**sets, "rollout.compile": c}, inputs=False), folder,
                     Hardware(memory=64 * GiB))["phases"]["rollout"]["peak_bytes"] for c in ("false", "true", "auto")}
    rows, extra = 4, -(-464 // COMPILED_WIDTHS) * COMPILED_WIDTHS - 464
    assert extra > 0
    assert peaks["true"] - peaks["false"] == 2 * 2 * 2 * 64 * 4 * rows * extra + rows * extra * 4  # K, V; the mask
    assert peaks["auto"] == peaks["true"]


def test_the_plan_keeps_the_compiled_steps_cache_through_training_and_says_how_to_free_it(tmp_path):
    """A compiled decode step keeps its KV cache, decode state and weight copies between rollouts (its CUDA graphs
    read them in place): the plan holds them through check, train and update, never in the report and save after
    the last step; eager decoding (`rollout.compile: false`) holds none of it. Short of memory, the advice says so."""
    folder = _qwen3(tmp_path / "m", 256, 512, 2, 4000)
    sets = {**PROBE, "rollout.engine": "auto", "rollout.max_new_tokens": "400", "output.eval_prompts": "0"}
    runs = {c: plan(load_config(ROOT / "configs/default.yaml", {**sets, "rollout.compile": c}, inputs=False), folder,
                    Hardware(memory=64 * GiB)) for c in ("false", "true")}
    cache = {c: {ph: r["phases"][ph]["breakdown"].get("kv cache", 0) for ph in r["phases"]} for c, r in runs.items()}
    rows, columns = 4, -(-464 // COMPILED_WIDTHS) * COMPILED_WIDTHS  # the compiled step's rounded-up cache
    kv = 2 * 2 * 2 * 64 * 4 * rows * columns  # (K, V) x 2 layers x 2 heads x 64 x float32
    for phase in ("check", "train", "update"):
        assert cache["false"][phase] == 0 and cache["true"][phase] >= kv, (phase, cache)
    assert cache["true"]["save"] == 0
    train = runs["true"]["phases"]["train"]["peak_bytes"]
    short = plan(load_config(ROOT / "configs/default.yaml", {**sets, "rollout.compile": "true"}, inputs=False), folder,
                 Hardware(memory=int(train - kv / 2) + RESERVED_BYTES))
    assert not short["fits"] and short["peak_phase"] == "train"
    assert any(t.startswith("rollout.compile: false") for t in short["advice"]), short["advice"]


def test_tiny_cpu_config_plans_and_fits(tmp_path):
    folder = _qwen3(tmp_path / "tiny", 64, 128, 2, 512)
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml", inputs=False)
    begun = []  # what the CLI's spinner is told, phase by phase
    r = plan(cfg, folder / "config.json", Hardware(memory=8 * GiB), on_phase=begun.append)
    assert r["fits"] and set(r["phases"]) >= {"load", "rollout", "check", "train", "update"}
    assert begun == [p for p in PHASES if p in r["phases"]]
    from tsopsd.tables import plan_table

    title = plan_table(r).title  # says how the run is laid out, not a class name
    assert "one process a GPU on 1 x 8 GiB" in title and "Backend" not in title


# ---- what the plan shows --------------------------------------------------------------------------
def test_plan_counts_the_weights_kv_cache_and_logits_it_should(tmp_path):
    """Exact figures that follow from the shapes: bf16 weights, a full-length KV cache, chunk x V logits."""
    hidden, inter, layers, vocab = 256, 512, 2, 4096
    folder = _qwen3(tmp_path / "m", hidden, inter, layers, vocab)
    cfg = load_config(ROOT / "configs/default.yaml", {"model.dtype": "bfloat16", "train.mode": "lora",
                                                      "rollout.batch_size": 8, "rollout.prompts_per_step": 2,
                                                      "rollout.samples_per_prompt": 4, "rollout.max_new_tokens": 96,
                                                      "data.max_prompt_tokens": 32}, inputs=False)
    r = plan(cfg, folder)
    n_params = sum(p.numel() for p in _model(folder).parameters())
    assert r["parameters"] == n_params
    assert r["phases"]["load"]["breakdown"]["weights"] >= 2 * n_params
    columns = -(-(32 + 96) // COMPILED_WIDTHS) * COMPILED_WIDTHS
    kv = 8 * columns * layers * 2 * (hidden // 128) * 64 * 2  # rows x columns x layers x (k, v) x heads x dim x bf16
    one_prefill_layer = 8 * 32 * 2 * (hidden // 128) * 64 * 2  # adopted layer by layer: one is ever doubled
    assert kv <= r["phases"]["rollout"]["most"]["kv cache"] <= kv + 1.1 * one_prefill_layer
    chunk = 512 * vocab * 4  # loss.chunk_size x V float32
    assert chunk <= r["phases"]["train"]["most"]["logits chunks"] <= 8 * chunk


def _model(folder: Path):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(load_model_config(folder))


def test_activation_checkpointing_shrinks_activations_and_auto_turns_it_on_only_where_needed(tmp_path):
    folder = _qwen3(tmp_path / "m", 256, 768, 4, 4096)
    base = {"model.dtype": "bfloat16", "rollout.max_new_tokens": 384, "train.micro_batch": 8,
            "data.max_prompt_tokens": 32, "output.eval_prompts": 0}
    roomy = plan(load_config(None, base, inputs=False), folder, Hardware(memory=64 * GiB))  # auto: off
    assert not roomy["activation_checkpointing"] and roomy["fits"]
    on = plan(load_config(None, {**base, "train.activation_checkpointing": "true"}, inputs=False), folder)
    a_off = roomy["phases"]["train"]["breakdown"]["activations"]
    a_on = on["phases"]["train"]["breakdown"]["activations"]
    assert a_on < 0.5 * a_off, (a_on, a_off)
    assert on["phases"]["train"]["flops"] > roomy["phases"]["train"]["flops"]  # the recomputation is paid for
    without = roomy["phases"]["train"]["peak_bytes"]
    tight = plan(load_config(None, base, inputs=False), folder,  # 64 MiB short of fitting without it
                 Hardware(memory=int(without + 3 * GiB - 64 * 2**20)))
    assert tight["activation_checkpointing"], tight["activation_checkpointing_why"]
    assert tight["phases"]["train"]["peak_bytes"] == on["phases"]["train"]["peak_bytes"]


def test_fsdp_rollout_gathers_each_module_once_not_per_token(tmp_path):
    folder = _qwen3(tmp_path / "m", 128, 256, 3, 1024)
    cfg = load_config(None, {"model.dtype": "bfloat16", "train.mode": "full", "train.parallel": "fsdp",
                             "rollout.max_new_tokens": 32, "data.max_prompt_tokens": 16}, inputs=False)
    r = plan(cfg, folder, Hardware(gpus=4))
    assert r["backend"] == "FSDP"
    gathers = r["phases"]["rollout"]["collectives"].get("all_gather", 0)
    assert 0 < gathers <= 3 + 1, gathers  # the decoder layers and the trunk, once for the whole rollout


# ---- bad input --------------------------------------------------------------------------------------
def _cli(*args: str):
    return CliRunner().invoke(app, ["plan", *args])


def test_plan_bad_input_is_one_line_and_exit_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "not-a-model", "vocab_size": 10}))
    good = _qwen3(tmp_path / "good", 64, 128, 2, 512)
    cases = {
        "no config.json": [str(empty)],
        "unknown architecture": [str(unknown)],
        "memory in words": [str(good), "--gpu-memory", "eighty"],
        "zero gpus": [str(good), "--gpus", "0"],
        "bad config key": [str(good), "--set", "train.nope=1"],
    }
    for name, args in cases.items():
        result = _cli(*args)
        lines = [line for line in result.output.strip().splitlines() if line.strip()]
        assert result.exit_code == 2, (name, result.output)
        assert len(lines) == 1 and lines[0].startswith("tsopsd: error: "), (name, result.output)


def test_plan_json_off_a_terminal_writes_nothing_to_stderr(tmp_path):
    """A script's `tsopsd plan --json 2>log`: the result on stdout, no spinner and no library noise on stderr
    (reading the config's deprecated `torch_dtype` alias printed a transformers warning there)."""
    folder = _qwen3(tmp_path / "m", 64, 128, 2, 512)  # a config.json without a dtype, as many are
    proc = subprocess.run([sys.executable, "-m", "tsopsd", "plan", str(folder), "--config",
                           str(ROOT / "configs" / "tiny-cpu.yaml"), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and json.loads(proc.stdout)["fits"], proc.stderr[-2000:]
    assert proc.stderr == ""


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * GiB == parse_bytes("80 GiB") == parse_bytes("80g")
    assert parse_bytes("141GB") == 141 * GiB
    assert parse_bytes("1.5e9") == 1_500_000_000
    with pytest.raises(TsopsdError, match="give a unit, such as 80GB"):  # was read as 80 bytes
        parse_bytes("80")


def test_a_plan_that_does_not_fit_exits_2_after_printing_it(tmp_path):
    """`tsopsd plan ... && sbatch ...` must stop when the run does not fit: the plan on stdout, one line, exit 2."""
    folder = _qwen3(tmp_path / "tiny", 64, 128, 2, 512)
    args = ["plan", str(folder), "--config", str(ROOT / "configs/tiny-cpu.yaml"), "--json"]
    runner = CliRunner()
    res = runner.invoke(app, [*args, "--gpu-memory", "4GB"])
    assert res.exit_code == 0 and json.loads(res.stdout)["fits"], res.stderr
    res = runner.invoke(app, [*args, "--gpu-memory", "1MB"])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("tsopsd: error: does not fit: peak"), res.stderr
    assert json.loads(res.stdout)["fits"] is False


def test_reheat_dry_run_prints_the_plan_and_writes_nothing(tmp_path, ckpt, prompts_file):
    out = tmp_path / "out"
    args = ["reheat", str(ckpt), "--prompts", str(prompts_file), "--out", str(out), "--dry-run", "--json",
            "--set", "rollout.max_new_tokens=16"]
    # 3 prompts and 8 a step: the dry run refuses what the run refuses, in the same words
    refused, run = CliRunner().invoke(app, args), CliRunner().invoke(app, [a for a in args if a != "--dry-run"])
    assert refused.exit_code == run.exit_code == 2 and "3 prompts are fewer than 1 rank(s) x 8" in refused.stderr
    assert refused.stderr.splitlines()[-1] == run.stderr.splitlines()[-1] and not out.exists()
    result = CliRunner().invoke(app, [*args, "--prompts-per-step", "2"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.output.strip().splitlines()[-1])
    assert r["fits"] and r["max_new_tokens"] == 16 and "train" in r["phases"]
    assert not out.exists() and not list(tmp_path.glob("out*"))
    # on this CPU it plans the run it would do: float32 on the host's memory, at rates measured
    # here, not a bf16 80 GiB GPU
    import os

    assert r["device"] == "cpu" and r["dtype"] == "float32" and "measured" in r["figures"]
    assert r["gpu_memory_bytes"] == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 1e8 < r["gpu_flops"] < 1e14 and 1e8 < r["gpu_bandwidth"] < 1e13  # a CPU's, not an H100's 989e12
    result = CliRunner().invoke(app, ["reheat", str(ckpt), "--prompts", str(prompts_file), "--out", str(out),
                                      "--dry-run", "--set", "rollout.max_new_tokens=16", "--prompts-per-step", "2"])
    assert "on the CPU (" in " ".join(result.output.split()), result.output


def test_a_plan_that_does_not_fit_says_what_would(tmp_path):
    folder = _qwen3(tmp_path / "m", 256, 768, 4, 4096)
    sets = {"model.dtype": "bfloat16", "rollout.max_new_tokens": 256, "train.micro_batch": 8, "rollout.compile": "false",
            "data.max_prompt_tokens": 32, "output.eval_prompts": 0, "train.activation_checkpointing": "false"}
    roomy = plan(load_config(None, sets, inputs=False), folder, Hardware(memory=64 * GiB))
    assert roomy["peak_phase"] == "train" and roomy["advice"] == []
    tight = Hardware(memory=int(roomy["peak_bytes"] * 0.8) + 3 * GiB)  # 20% short, reserve aside
    short = plan(load_config(None, sets, inputs=False), folder, tight)
    assert not short["fits"] and short["margin_bytes"] < 0
    assert any(tip.startswith("train.activation_checkpointing: true") for tip in short["advice"]), short["advice"]
    smaller = [int(t.split(": ")[1]) for t in short["advice"] if t.startswith("train.micro_batch: ")]
    assert smaller and 1 <= smaller[0] < 8, short["advice"]
    assert plan(load_config(None, {**sets, "train.micro_batch": smaller[0]}, inputs=False), folder, tight)["fits"]


def test_an_in_place_index_write_counts_the_elements_written_not_the_tensor():
    """The lean decoder writes each slot's new key into its KV cache at its own length (`index_put_`):
    the roofline counts those elements, not the whole cache (which would double the 4B rollout's time)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tsopsd.plan import Tracker

    tracker = Tracker(vocab=8, kv_heads=2, head_dim=4, flops=1e12, bandwidth=1e12)
    with FakeTensorMode(), tracker, tracker.in_phase("rollout") as record:
        cache = torch.zeros(4, 2, 1000, 4)  # (slots, kv heads, capacity, head dim): 128 kB
        slots, at = torch.arange(4), torch.tensor([3, 7, 7, 9])
        before = record.bytes
        cache[slots, :, at] = torch.ones(4, 2, 4)  # 32 elements written
        moved = record.bytes - before
    assert 0 < moved <= 4 * (3 * 32 + 2 * 4 * 8), moved  # values read and written, plus the two index tensors


def test_the_plan_runs_no_data_dependent_operation(tmp_path, monkeypatch):
    """On fake tensors an op whose output depends on values (`aten.equal`, torch.quantile's checks) raises on some
    torch versions (2.11: DataDependentOutputException from `torch.quantile` in the report phase). Every op the
    plan runs is looked at: none may carry the `data_dependent_output` tag, except the reads the tracker answers
    itself (`plan.ANSWERED`: `.item()`, `nonzero`, ... from shadows or the worst case, never on a fake tensor)."""
    import tsopsd.plan as plan_mod

    seen = []
    real = plan_mod.Tracker.__torch_dispatch__

    def spy(self, func, types, args=(), kwargs=None):
        if torch.Tag.data_dependent_output in func.tags and func not in plan_mod.ANSWERED:  # would run on fakes
            seen.append(str(func))
        return real(self, func, types, args, kwargs)

    monkeypatch.setattr(plan_mod.Tracker, "__torch_dispatch__", spy)
    folder = _qwen3(tmp_path / "tiny", 64, 128, 2, 512)
    for extra in ({}, {"teacher.temperature": None, "teacher.target_entropy": 1.0}):  # a fixed and a solved tau
        cfg = load_config(ROOT / "configs/tiny-cpu.yaml", extra, inputs=False)
        r = plan(cfg, folder / "config.json", Hardware(memory=8 * GiB))
        assert "report" in r["phases"]
    assert sorted(set(seen)) == []


def test_a_steered_target_run_plans_its_held_out_sampling(tmp_path):
    """stop.heldout_every: the held-out rollout batches, spread over the steps, are in the step's roofline."""
    folder = _qwen3(tmp_path / "tiny", 64, 128, 2, 512)
    common = {"teacher.temperature": None, "teacher.target_entropy": 1.0, "output.eval_prompts": 16,
              "stop.heldout_samples_per_prompt": 2, "rollout.batch_size": 32}
    fixed = plan(load_config(ROOT / "configs/tiny-cpu.yaml", {**common, "stop.heldout_every": 0}, inputs=False), folder)
    steered = plan(load_config(ROOT / "configs/tiny-cpu.yaml", {**common, "stop.heldout_every": 4}, inputs=False), folder)
    per_batch = fixed["phases"]["rollout"]["roofline_s"] / -(-fixed["sequences_per_rank"] // 32)
    assert fixed["heldout_roofline_s"] == 0
    assert steered["heldout_roofline_s"] == pytest.approx(per_batch * 1 / 4, rel=0.05)  # 32 rows: one batch, 1 step in 4
    assert steered["step_roofline_s"] == pytest.approx(fixed["step_roofline_s"] + steered["heldout_roofline_s"], rel=0.05)


def test_a_plan_short_of_weight_memory_says_how_many_gpus_at_least(tmp_path):
    """"more GPUs" names a number: the fewest over which FSDP's shards of the weights, gradients and
    optimizer state leave room for the rest, a lower bound (FSDP's gathers come on top): one fewer does not fit."""
    folder = _qwen3(tmp_path / "m", 1024, 2048, 4, 32000)
    sets = {"model.dtype": "bfloat16", "train.mode": "full", "rollout.max_new_tokens": 32, "train.micro_batch": 2,
            "rollout.prompts_per_step": 1, "rollout.samples_per_prompt": 2, "data.max_prompt_tokens": 16,
            "output.eval_prompts": 0, "train.activation_checkpointing": "false"}
    roomy = plan(load_config(None, sets, inputs=False), folder, Hardware(memory=64 * GiB))
    tight = Hardware(memory=int(roomy["peak_bytes"] * 0.6) + 3 * GiB)
    short = plan(load_config(None, sets, inputs=False), folder, tight)
    tip = next(t for t in short["advice"] if "with train.parallel: fsdp" in t)
    gpus = int(tip.split("at least ")[1].split(" GPUs")[0])
    assert gpus >= 3, tip
    fewer = plan(load_config(None, {**sets, "train.parallel": "fsdp"}, inputs=False), folder,
                 Hardware(gpus=gpus - 1, memory=tight.memory))
    assert not fewer["fits"], (tip, fewer["margin_bytes"])
