"""One decode step of the lean decoder at batch 8: eager against compiled, each against its bounds.

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
  compiled step is not faster).
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
    """Seconds of each of `tokens` decode steps of one session (greedy, every row alive)."""
    from tsopsd import decode
    from tsopsd.rollout import _prefill

    device = next(model.parameters()).device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        ids, mask, pos, logits, cache = _prefill(model, prompt_ids, 0, device, share=False)
        lean = decode.LeanDecoder.build(model, batch_size=len(prompt_ids), max_length=ids.shape[1] + tokens,
                                        compile=compile)
        step = lean.session(cache, mask, capacity=ids.shape[1] + tokens + 1)
        alive = torch.ones(len(prompt_ids), dtype=torch.bool, device=device)
        times = []
        for _ in range(tokens):
            sync()
            t0 = time.perf_counter()
            logits = step(logits.argmax(-1), pos, alive)
            sync()
            times.append(time.perf_counter() - t0)
            pos = pos + 1
        if compile == "true" and lean.compiled is None:
            raise SystemExit(f"the compiled step was turned off: {decode.COMPILE['why']}")
    return times


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
    }))


if __name__ == "__main__":
    main()
