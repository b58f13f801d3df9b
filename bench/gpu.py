"""The GPU check in one run, one folder, one table: `bash bench/gpu.sh` on a lent H100/H200.

    python bench/gpu.py                 # CUDA: random Qwen3-4B and Qwen3-0.6B shapes, under 10 minutes
    python bench/gpu.py --tiny          # CPU, seconds: the same steps on tiny models (make test runs it)

Builds its models offline (random weights of the Qwen3 shapes, the final norm x8 so they are not near
uniform, a small trained tokenizer), then:
1. `tsopsd plan` of the shipped 4B config (`configs/qwen3-4b-1gpu.yaml`) for this device;
2. `tsopsd reheat` of that config for 2 steps (fixed tau 1.5; no held-out report, to save the time): step
   time, its phases, peak allocated and reserved bytes, against the plan's roofline, estimate and peak;
3. decode of the 0.6B shape at batch 64, eager and compiled (CUDA graphs), against the bandwidth bound, and
   two rollouts of it: per decode step the reads back and bytes each way, the CUDA graphs each recorded
   (`bench/decode.py`);
4. training MFU of the 4B run (the plan's training FLOPs per token x trained tokens/s over the peak);
5. TRL's step (`bench/peer_trl.py`, `USE_HUB_KERNELS=NO`) beside tsopsd's (`bench/step.py`) on the 0.6B
   job, where TRL is installed;
6. torch.profiler's top kernels for one decode step and one training micro-batch.
Everything lands in --out (default bench/out/gpu/): the models, each command's output, `summary.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name: (vocab, hidden, layers, heads, kv heads, intermediate): the public Qwen3 shapes, and tiny stand-ins
SHAPES = {"qwen3-4b": (151936, 2560, 36, 32, 8, 9728), "qwen3-0.6b": (151936, 1024, 28, 16, 8, 3072),
          "tiny-a": (512, 64, 2, 4, 2, 128), "tiny-b": (512, 64, 2, 4, 2, 128)}
PEAKS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12)}  # bf16 dense, bytes/s


def build(out: Path, shape: str, device: str) -> Path:
    """A random, sharpened model of `shape` in bf16 (fp32 on a CPU) with a small trained tokenizer."""
    from transformers import AutoModelForCausalLM

    from tsopsd.lab.tiny import build_tokenizer, model_config, sharpen_

    if (out / "config.json").is_file():
        return out
    vocab, hidden, layers, heads, kv, inter = SHAPES[shape]
    tok = build_tokenizer(vocab_size=384)
    cfg = model_config("qwen3", vocab, hidden=hidden, layers=layers, heads=heads, eos_id=tok.eos_token_id,
                       max_positions=8192)
    cfg.num_key_value_heads, cfg.intermediate_size, cfg.head_dim = kv, inter, 128 if hidden >= 1024 else hidden // heads
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # built where it will run: a 4B model initialises in seconds on a GPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    sharpen_(model, 8.0)
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tok.eos_token_id
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    del model
    return out


def run(cmd: list[str], log: Path, env: dict | None = None, timeout: int = 900) -> tuple[int, str]:
    """Run a command, its output to `log` (and the last lines echoed); returns (exit code, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env={**os.environ, **(env or {})},
                       timeout=timeout, cwd=ROOT)
    log.write_text(f"$ {' '.join(map(str, cmd))}\n{p.stdout}\n--- stderr ---\n{p.stderr}")
    tail = (p.stderr.strip().splitlines() or [""])[-1]
    print(f"[{time.perf_counter() - t0:6.1f} s] exit {p.returncode}: {' '.join(map(str, cmd[1:4]))} ... {tail[:150]}",
          flush=True)
    return p.returncode, p.stdout


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def profile_top(model_dir: Path, device: str, n: int = 5) -> dict[str, list[str]]:
    """torch.profiler's top kernels (self device time on a GPU, self CPU time elsewhere) of one lean decode step
    and one training micro-batch of the model in `model_dir`."""
    from torch.profiler import ProfilerActivity, profile

    from tsopsd import decode
    from tsopsd.checkpoint import load_checkpoint
    from tsopsd.config import load_config
    from tsopsd.policy import prepare_policy
    from tsopsd.prompts import Prompt
    from tsopsd.rollout import _prefill, _state, sample_rollouts
    from tsopsd.sampling import Draw
    from tsopsd.step import train_step

    ck = load_checkpoint(model_dir, device=device, dtype="bfloat16" if device == "cuda" else "float32")
    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = {}
    prompts = [[5 + i, 6, 7, 8] * 8 for i in range(8)]
    with torch.inference_mode():
        ids, mask, pos, logits, cache = _prefill(ck.model, prompts, 0, ck.model.device, share=False)
        lean = decode.LeanDecoder.build(ck.model, batch_size=len(prompts), max_length=ids.shape[1] + 8)
        session = lean.session(cache, mask, capacity=ids.shape[1] + 8)
        draw = Draw.make(0, [0], ck.model.device, pad_id=0, max_new_tokens=8, suppress_eos=True)
        rows = torch.arange(len(prompts), device=ck.model.device)
        state, made = _state(lean, logits, rows, rows, pos, len(prompts), draw)
        session.step(state, made, draw, lockstep=True)  # warm-up
        sync()
        with profile(activities=activities) as prof:  # the whole step: draw, record, forward
            session.step(state, made, draw, lockstep=True)
            sync()
    out["decode step"] = [f"{e.key} {getattr(e, key) / 1e3:.3f} ms x{e.count}"
                          for e in sorted(prof.key_averages(), key=lambda e: -getattr(e, key))[:n]]
    cfg = load_config(ROOT / "configs/qwen3-4b-1gpu.yaml", {"teacher.temperature": 1.5, "teacher.target_entropy_from": None,
                                                            "train.micro_batch": 2}, inputs=False)
    policy = prepare_policy(ck.model, cfg.train)
    tok = ck.tokenizer
    rollout = sample_rollouts(policy.student, tok, [Prompt("p", tuple(p)) for p in prompts[:2]], samples_per_prompt=1,
                              max_new_tokens=16, seed=0)
    train_step(policy, rollout, tau=1.5, cfg=cfg)  # warm-up
    sync()
    with profile(activities=activities) as prof:
        train_step(policy, rollout, tau=1.5, cfg=cfg)
        sync()
    out["training micro-batch"] = [f"{e.key} {getattr(e, key) / 1e3:.3f} ms x{e.count}"
                                   for e in sorted(prof.key_averages(), key=lambda e: -getattr(e, key))[:n]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU: the script's own test")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/gpu")
    args = ap.parse_args()
    tiny = args.tiny
    device = "cpu" if tiny else "cuda"
    if not tiny and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs CUDA (or --tiny)")
    out = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    py = [sys.executable]
    big, small = ("tiny-a", "tiny-b") if tiny else ("qwen3-4b", "qwen3-0.6b")
    name = "cpu" if tiny else torch.cuda.get_device_name(0)
    flops, bw = next((v for k, v in PEAKS.items() if k in name), (None, None))
    memory = f"{torch.cuda.get_device_properties(0).total_memory}" if not tiny else "8GiB"
    t0 = time.perf_counter()
    m4, m06 = build(out / "models" / big, big, device), build(out / "models" / small, small, device)
    print(f"models built in {time.perf_counter() - t0:.0f} s", flush=True)

    # the shipped 4B config: fixed tau 1.5 (its target checkpoint is the user's), no held-out report
    sets = ["--set", "teacher.target_entropy_from=null", "--temperature", "1.5", "--set", "output.eval_prompts=0"]
    if tiny:
        sets += ["--set", "model.device=cpu", "--set", "model.dtype=float32", "--set", "rollout.prompts_per_step=2",
                 "--set", "rollout.samples_per_prompt=2", "--set", "rollout.max_new_tokens=8",
                 "--set", "rollout.batch_size=4", "--set", "data.max_prompt_tokens=32", "--set", "train.micro_batch=2",
                 "--set", "train.lora_r=4", "--set", "loss.chunk_size=64"]
    config = ROOT / "configs/qwen3-4b-1gpu.yaml"
    hw = ["--gpu-memory", memory] + (["--gpu-flops", str(flops), "--gpu-bandwidth", str(bw)] if flops else [])
    code, text = run(py + ["-m", "tsopsd", "plan", m4, "--config", config, *sets, *hw, "--json"], out / "logs/plan.log")
    planned = json.loads(text) if code == 0 else {}

    from bench.common import bench_prompts
    from tsopsd.checkpoint import load_tokenizer

    tok = load_tokenizer(m4)
    prompts = out / "prompts.jsonl"
    n_prompts = 32 if not tiny else 4
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n"
                               for t in bench_prompts(tok, n_prompts, 16 if tiny else 1024)))
    reheated = out / "reheated"
    code, text = run(py + ["-m", "tsopsd", "reheat", m4, "--prompts", prompts, "--out", reheated, "--config", config,
                           *sets, "--steps", "2", "--overwrite", "--json", "--quiet"], out / "logs/reheat.log")
    written = code in (0, 4)  # 2 steps: OUT written, converged (0) or not (4)
    report = json.loads(text) if written else {}
    steps = [json.loads(x) for x in (reheated / "metrics.jsonl").read_text().splitlines()] if written else []

    decode_args = ["--model", m06, "--device", device, "--tokens", "8" if tiny else "128", "--repeats", "1" if tiny else "2",
                   "--batch", "2" if tiny else "64"] + (["--eager-only"] if tiny else ["--dtype", "bfloat16"])
    code, text = run(py + [ROOT / "bench/decode.py", *decode_args], out / "logs/decode.log")
    dec = last_json(text) if code == 0 else None

    job = ["--model", m06, "--prompts-per-step", "2" if tiny else "16", "--samples-per-prompt", "2" if tiny else "4",
           "--length", "8" if tiny else "256", "--steps", "1" if tiny else "2", "--device", device]
    code, text = run(py + [ROOT / "bench/step.py", *job, "--mode", "lora"], out / "logs/step.log")
    ours = last_json(text) if code == 0 else None
    try:
        import trl  # noqa: F401
        code, text = run(py + [ROOT / "bench/peer_trl.py", *job, "--mode", "lora"], out / "logs/trl.log",
                         env={"USE_HUB_KERNELS": "NO"})
        peer = last_json(text) if code == 0 else None
        trl_note = "" if peer else "failed (logs/trl.log)"
    except ImportError:
        peer, trl_note = None, "not installed (pip install '.[bench]')"

    kernels = profile_top(m06 if not tiny else m4, device)

    rows = []
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else None  # noqa: E731
    measured = report.get("measured", {})
    step_s = [s["train/seconds"] for s in steps]
    phases = measured.get("phase_seconds_median", {})
    rows.append((f"{big} step (2 steps, s)", " / ".join(f"{s:.1f}" for s in step_s) or "failed (logs/reheat.log)"))
    rows.append(("  rollout / teacher / student / optimizer (median s)",
                 " / ".join(f"{phases.get(p, 0):.1f}" for p in ("rollout", "teacher", "student", "optimizer"))))
    if planned:
        rows.append(("  plan: roofline / estimate (s)", f"{planned['step_roofline_s']:.1f} / {planned['step_estimate_s']:.0f}"))
        if step_s:
            rows.append(("  last step over roofline", f"{step_s[-1] / planned['step_roofline_s']:.2f}x (goal <= 1.5x)"))
        gib = 2**30
        rows.append(("  memory: plan peak + reserve (GiB)", f"{planned['peak_bytes'] / gib:.1f} + {planned['reserved_bytes'] / gib:.1f}"))
    if measured.get("peak_allocated_bytes"):
        rows.append(("  memory: measured allocated / reserved (GiB)",
                     f"{measured['peak_allocated_bytes'] / 2**30:.1f} / {measured['peak_reserved_bytes'] / 2**30:.1f}"))
    if planned and steps:
        train_flops = planned["phases"]["train"]["flops"] + planned["phases"].get("update", {}).get("flops", 0)
        planned_tokens = planned["sequences_per_rank"] * planned["max_new_tokens"]
        tok_s = med([s["train/trained_tokens_per_s"] for s in steps])
        peak = flops or planned["gpu_flops"]
        rows.append((f"{big} training MFU", f"{train_flops / planned_tokens * tok_s / peak:.1%} of {peak / 1e12:.0f} "
                                        "TFLOP/s (goal >= 40%)"))
    if dec:
        rows.append((f"{small} decode, batch {dec['batch']}: eager / compiled (ms/step)",
                     f"{dec['eager_ms']:.2f} / {dec['compiled_ms']:.2f}" if dec.get("compiled_ms") else f"{dec['eager_ms']:.2f} / -"))
        bound = dec["bandwidth_bound_ms"]
        best = dec.get("compiled_ms") or dec["eager_ms"]
        rows.append(("  bandwidth bound (ms) / share reached", f"{bound:.2f} / {bound / best:.0%} (goal >= 60% compiled)"))
        for mode, t in dec.get("traffic", {}).items():
            rows.append((f"  {mode} rollout, per step: reads / H2D B / D2H B",
                         f"{t['reads_per_step']:.2f} / {t['h2d_bytes_per_step']:.0f} / {t['d2h_bytes_per_step']:.0f} "
                         "(goal: 1 read of a few bytes)"))
            rows.append((f"  {mode} rollout: CUDA graphs recorded, 1st / 2nd rollout",
                         " / ".join(map(str, t["graphs_recorded"])) + " (goal: 0 in the 2nd)"))
    rows.append((f"{small} job, tsopsd step (s)", f"{ours['median_step_s']:.2f}" if ours and "median_step_s" in ours else
                 (json.dumps(ours)[:80] if ours else "failed (logs/step.log)")))
    rows.append((f"{small} job, TRL step (s)", f"{peer['median_step_s']:.2f}" if peer else trl_note))
    for what, top in kernels.items():
        rows.append((f"top kernels, {what}", top[0] if top else "-"))
        rows.extend(("", k) for k in top[1:])
    width = max(len(r[0]) for r in rows)
    print(f"\nbench/gpu.py on {name} (torch {torch.__version__}){' --tiny' if tiny else ''}")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    (out / "summary.json").write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows,
                                                  "planned": planned, "measured": measured, "decode": dec,
                                                  "tsopsd_step": ours, "trl_step": peer, "kernels": kernels}, indent=2))
    print(f"\nwrote {out}/ (logs/, summary.json); {time.perf_counter() - t0:.0f} s in all")
    if not steps or not planned:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
