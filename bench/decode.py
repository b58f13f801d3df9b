"""One decode step of the lean decoder at batch 8: eager against compiled, each against its bounds, and what a
rollout's decode step moves between host and device.

    python bench/decode.py [--batch 8] [--prompt-tokens 0] [--tokens 64] [--repeats 5] [--threads 2]
    python bench/decode.py --model bench/out/models/q05b --device cuda --dtype bfloat16   # bench/gpu.sh

The model: the compare bench's random Qwen3 (8 layers x 512 hidden, vocab 8192, fp32), or --model. A batch of
`--batch` prompts is prefilled, then `--tokens` greedy decode steps run through `decode.LeanDecoder`
sessions, eager (`rollout.compile: false`) and compiled (`true`: torch.compile),
(inductor on CPU, CUDA graphs on a GPU), alternating `--repeats` times in this one process; a step's
time is the median over its session.

Beside them:
- the bandwidth bound: the bytes a step must read (every decoder and LM-head weight, and the KV cache
  at the session's mean length) at this machine's measured bandwidth (`bench.common.bandwidth`);
- the compute bound: the step's FLOPs (2 per weight per row) at the measured fp32 matmul peak;
- the compile time (the first compiled session, cold unless torch's on-disk cache has the graph) and
  the break-even: decode steps a run must take before compiling has paid for itself (none where the
  compiled step is not faster);
- two rollouts as `reheat` samples them, eager and compiled: per decode step of the second, the reads back
  (host synchronisations), tensors made from host data and bytes each way; the CUDA graphs each recorded.
Prints one line per session, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import bandwidth, bench_prompts, build_bench_model, matmul_peak, set_threads  # noqa: E402


def session_times(model, prompt_ids: list[list[int]], tokens: int, compile: str) -> list[float]:
    """Seconds of each of `tokens` whole decode steps (draw, record, forward: what a rollout runs) of one
    session at T=1, EOS suppressed so that every row stays alive."""
    from tsopsd import decode
    from tsopsd.rollout import _prefill, _state
    from tsopsd.sampling import Draw

    device = next(model.parameters()).device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        ids, mask, pos, logits, cache = _prefill(model, prompt_ids, 0, device, share=False)
        lean = decode.LeanDecoder.build(model, batch_size=len(prompt_ids), max_length=ids.shape[1] + tokens,
                                        compile=compile)
        session = lean.session(cache, mask, capacity=ids.shape[1] + tokens + 1)
        draw = Draw.make(0, [0], device, pad_id=0, max_new_tokens=tokens + 1, suppress_eos=True)
        rows = torch.arange(len(prompt_ids), device=device)
        state, made = _state(lean, logits, rows, rows, pos, len(prompt_ids), draw)
        times = []
        for _ in range(tokens):
            sync()
            t0 = time.perf_counter()
            session.step(state, made, draw, lockstep=True)
            sync()
            times.append(time.perf_counter() - t0)
        if compile == "true" and lean.compiled is None:
            raise SystemExit(f"the compiled step was turned off: {decode.COMPILE['why']}")
        lean.release()
    return times


def rollout_traffic(model, tokenizer, prompt_ids: list[list[int]], tokens: int, compile: str) -> dict:
    """Two rollouts as `reheat` samples them (continuous batching, T=1): per decode step of the second, what
    crosses between host and device (`tsopsd.lab.traffic`), and the CUDA graphs each rollout recorded."""
    from tsopsd import decode
    from tsopsd.lab.traffic import HostTraffic
    from tsopsd.prompts import Prompt
    from tsopsd.rollout import sample_rollouts

    captures = []
    graph = getattr(torch.cuda, "CUDAGraph", None)
    real_capture = graph.capture_begin if graph is not None else None
    if graph is not None:
        def capture_begin(self, *args, **kwargs):
            captures.append(1)
            return real_capture(self, *args, **kwargs)
        graph.capture_begin = capture_begin
    real_step = decode._Session.step
    prompts = [Prompt("", tuple(p)) for p in prompt_ids]
    recorded = []
    try:
        for _ in range(2):
            before = len(captures)
            traffic = HostTraffic()

            def step(self, *args, _traffic=traffic, **kwargs):
                out = real_step(self, *args, **kwargs)
                _traffic.mark("step")
                return out

            decode._Session.step = step
            with traffic:
                sample_rollouts(model, tokenizer, prompts, max_new_tokens=tokens, batch_size=len(prompts), seed=1,
                                compile=compile)
            recorded.append(len(captures) - before)
    finally:
        decode._Session.step = real_step
        if graph is not None:
            graph.capture_begin = real_capture
    steps = traffic.between("step")[:-1]  # the last: the rollout's assembly
    per = lambda kinds, key: sum(key(e) for ev in steps for e in ev if e.kind in kinds) / max(len(steps), 1)  # noqa: E731
    return {"steps": len(steps), "reads_per_step": per(("read",), lambda e: 1),
            "from_host_per_step": per(("from host",), lambda e: 1),
            "h2d_bytes_per_step": per(("h2d", "from host"), lambda e: e.nbytes),
            "d2h_bytes_per_step": per(("d2h", "read"), lambda e: e.nbytes),
            "graphs_recorded": recorded}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=0, help="grow each prompt to this many tokens (0: short)")
    ap.add_argument("--tokens", type=int, default=64, help="decode steps per session")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", type=Path, default=None, help="a model folder (default: the bench's q8x512)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--eager-only", action="store_true", help="skip the compiled step (bench/gpu.py --tiny: seconds)")
    args = ap.parse_args()
    set_threads(args.threads)
    from tsopsd import decode
    from tsopsd.checkpoint import load_checkpoint

    path = args.model or build_bench_model(ROOT / "bench/out/models/q8x512", vocab=8192, hidden=512, layers=8)
    ck = load_checkpoint(path, device=args.device, dtype=args.dtype)
    model, cfg = ck.model.eval(), ck.model.config
    prompt_ids = [ck.tokenizer(t)["input_ids"] for t in bench_prompts(ck.tokenizer, args.batch, args.prompt_tokens)]
    device = next(model.parameters()).device
    peak, bw = matmul_peak(device, ck.dtype), bandwidth(device)  # the device's own, the model's dtype
    width = torch.finfo(ck.dtype).bits // 8

    weights = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "norm" not in n)
    kv_width = cfg.num_key_value_heads * cfg.head_dim
    mean_length = statistics.mean(len(p) for p in prompt_ids) + args.tokens / 2
    step_bytes = width * (weights + 2 * cfg.num_hidden_layers * kv_width * mean_length * args.batch)
    bandwidth_bound = step_bytes / bw
    compute_bound = 2 * weights * args.batch / peak

    t0 = time.perf_counter()
    compile_s = 0.0
    if not args.eager_only:
        session_times(model, prompt_ids, args.tokens, "true")
        compile_s = decode.COMPILE["compile_s"]
        print(f"first compiled session: {time.perf_counter() - t0:.1f} s, of which compiling {compile_s:.1f} s", flush=True)
    eager, compiled = [], []
    for rep in range(args.repeats):
        for name, out in (("eager", eager), ("compiled", compiled))[:1 if args.eager_only else 2]:
            ms = statistics.median(session_times(model, prompt_ids, args.tokens,
                                                 "true" if name == "compiled" else "false")) * 1e3
            out.append(ms)
            print(f"repeat {rep} {name}: {ms:.2f} ms/step ({ms / 1e3 / bandwidth_bound:.2f}x the bandwidth bound)",
                  flush=True)
    traffic = {name: rollout_traffic(model, ck.tokenizer, prompt_ids, args.tokens, setting)
               for name, setting in (("eager", "false"), ("compiled", "true"))[:1 if args.eager_only else 2]}
    for name, t in traffic.items():
        print(f"{name} rollout, per decode step: {t['reads_per_step']:.2f} reads back, {t['from_host_per_step']:.2f} "
              f"tensors from host data, {t['h2d_bytes_per_step']:.0f} B to / {t['d2h_bytes_per_step']:.0f} B from the "
              f"device; CUDA graphs recorded by each of two rollouts: {t['graphs_recorded']}", flush=True)
    e = statistics.median(eager)
    c = statistics.median(compiled) if compiled else None
    saving = (e - c) / 1e3 if c is not None else 0.0
    print(json.dumps({
        "bench": "decode", "device": str(device), "dtype": str(ck.dtype), "batch": args.batch,
        "prompt_tokens": round(statistics.mean(len(p) for p in prompt_ids)),
        "tokens": args.tokens, "threads": torch.get_num_threads(), "matmul_peak_gflops": peak / 1e9,
        "bandwidth_gbs": bw / 1e9, "step_mb": step_bytes / 1e6, "bandwidth_bound_ms": bandwidth_bound * 1e3,
        "compute_bound_ms": compute_bound * 1e3, "eager_ms": e, "compiled_ms": c,
        "compiled_over_eager": c / e if c else None, "eager_over_bandwidth_bound": e / 1e3 / bandwidth_bound,
        "compiled_over_bandwidth_bound": c / 1e3 / bandwidth_bound if c else None,
        "compile_s": compile_s, "break_even_decode_steps": round(compile_s / saving) if saving > 0 else None,
        "traffic": traffic,
    }))


if __name__ == "__main__":
    main()
