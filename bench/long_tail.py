"""Rollouts on a long-tailed workload: continuous batching against static batches and Hugging Face `generate`.

    python bench/long_tail.py [--rows 64] [--batch 16] [--mean 48] [--cap 512] [--threads 2]

The workload: RL completions stop by a natural EOS with a wide spread of lengths. The model is the
compare bench's random Qwen3 (8 layers x 512 hidden, vocab 8192, fp32). Its next-token distribution is
near-uniform (random init, logits ~0), and `generation_config.eos_token_id` lists V/mean token ids.
Each step therefore ends a row with probability ~1/mean, so lengths are roughly geometric with that
mean, capped at --cap. The ids are spread over the vocabulary.

Timed, alternating, each --repeats times, on the same prompts (--rows = prompts x samples), batch size
--batch and seeds:
- `continuous`: tsopsd's sampler, slots refilled as rows end (`sample_rollouts`, the default);
- `static`: tsopsd's sampler in lock-step batches (`continuous=False`), every row decoded until its
  batch's longest ends;
- `hf_generate`: `model.generate(do_sample=True)` in batches of --batch (what TRL uses without vLLM).

Then (unless --no-step) whole LoRA reheat steps on the same rows: tsopsd's (`bench/step.py`) against
TRL's DistillationTrainer (`bench/peer_trl.py`), which needs `pip install '.[bench]'`.

The floor is measured here too. It is the useful tokens' FLOPs (2 x parameters per token) at this
machine's fp32 matmul peak, plus the weight bytes one decode step reads, at the measured memory
bandwidth, times the steps the slots need (useful tokens / batch). A large fp32 matmul gives the
peak; a large tensor sum gives the bandwidth. Prints one line per run, then one JSON line with
medians: tokens/s, each against hf_generate, and each as a multiple of its floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import PROMPTS, bandwidth, build_bench_model, matmul_peak, set_threads  # noqa: E402


def long_tail_model(out: Path, *, vocab: int, mean: float) -> Path:
    """The compare bench's model with V/mean stop ids (every mean-th id, from 7)."""
    base = build_bench_model(out.parent / "q8x512", vocab=vocab, hidden=512, layers=8)
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    stops = list(range(7, vocab, round(mean)))[: round(vocab / mean)]
    model.generation_config.eos_token_id = stops
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(out))
    return out


def whole_steps(args) -> dict:
    """Whole reheat steps on this workload, LoRA: `bench/step.py` (tsopsd's step) and `bench/peer_trl.py`
    (TRL's DistillationTrainer, generating with HF `generate` in batches of --batch and accumulating
    over them), alternating, each in its own process; completions end at the model's stop ids."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    job = ["--model", str(args.out), "--mode", "lora", "--prompts-per-step", str(args.rows // args.samples),
           "--samples-per-prompt", str(args.samples), "--length", str(args.cap), "--natural-eos",
           "--rollout-batch", str(args.batch), "--steps", "2", "--threads", str(args.threads)]
    times: dict[str, list[float]] = {"tsopsd": [], "trl": []}
    for rep in range(args.repeats):
        for name, script in (("tsopsd", "bench/step.py"), ("trl", "bench/peer_trl.py")):
            out = subprocess.run([sys.executable, script, *job], cwd=root, capture_output=True, text=True, check=True)
            times[name].append(json.loads(out.stdout.strip().splitlines()[-1])["median_step_s"])
            print(f"step {name:7s} rep {rep}: {times[name][-1]:.2f} s (median of 2 steps after a warm-up)", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"whole step, LoRA: tsopsd {med['tsopsd']:.2f} s, TRL {med['trl']:.2f} s, "
          f"ratio {med['tsopsd'] / med['trl']:.2f}", flush=True)
    return {"step_tsopsd_s": med["tsopsd"], "step_trl_s": med["trl"], "step_ratio": med["tsopsd"] / med["trl"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--mean", type=float, default=48)
    ap.add_argument("--cap", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/out/models/q8x512-longtail"))
    ap.add_argument("--no-step", action="store_true", help="rollouts only: skip the whole-step comparison with TRL")
    args = ap.parse_args()
    set_threads(args.threads)

    import transformers

    from tsopsd.checkpoint import load_checkpoint
    from tsopsd.prompts import Prompt
    from tsopsd.rollout import sample_rollouts

    transformers.utils.logging.set_verbosity_error()
    ck = load_checkpoint(long_tail_model(args.out, vocab=8192, mean=args.mean), device="cpu", dtype="float32")
    model, tok = ck.model, ck.tokenizer
    n_prompts = args.rows // args.samples
    prompts = [Prompt(t, tuple(tok(t)["input_ids"])) for t in (PROMPTS * 8)[:n_prompts]]
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = params * 4
    peak, bw = matmul_peak(), bandwidth()

    def ours(continuous: bool):
        def run(seed):
            r = sample_rollouts(model, tok, prompts, samples_per_prompt=args.samples, max_new_tokens=args.cap,
                                batch_size=args.batch, seed=seed, continuous=continuous)
            return r.completion_lengths.tolist()
        return run

    def hf_generate(seed):
        torch.manual_seed(seed)
        lengths = []
        rows = [p.ids for p in prompts for _ in range(args.samples)]
        stops = set(model.generation_config.eos_token_id)
        for start in range(0, len(rows), args.batch):
            chunk = rows[start:start + args.batch]
            width = max(map(len, chunk))
            ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + list(r) for r in chunk])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk])
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                     top_p=1.0, max_new_tokens=args.cap, pad_token_id=tok.pad_token_id)
            for row in out[:, width:].tolist():
                n = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
                lengths.append(n)
        return lengths

    runs = {"continuous": ours(True), "static": ours(False), "hf_generate": hf_generate}
    ours(True)(999)  # warm-up (packing, allocator)
    results: dict[str, list[dict]] = {k: [] for k in runs}
    for rep in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            lengths = fn(rep)
            seconds = time.perf_counter() - t0
            tokens = sum(lengths)
            floor = 2 * params * tokens / peak + (tokens / args.batch) * weight_bytes / bw
            row = {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds, "floor_s": floor,
                   "x_floor": seconds / floor, "mean_length": tokens / len(lengths), "max_length": max(lengths)}
            results[name].append(row)
            print(f"{name:12s} rep {rep}: {seconds:7.2f} s  {tokens} tokens  {tokens / seconds:7.1f} tok/s  "
                  f"mean {row['mean_length']:.1f} max {row['max_length']}  {row['x_floor']:.2f}x floor", flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in results.items()}
    for k in med:
        med[k]["tok_s_vs_hf_generate"] = med[k]["tok_s"] / med["hf_generate"]["tok_s"]
    steps = {} if args.no_step else whole_steps(args)
    print(json.dumps({"bench": "long_tail", **steps, "rows": args.rows, "batch": args.batch, "mean": args.mean,
                      "cap": args.cap, "threads": torch.get_num_threads(), "params": params,
                      "matmul_peak_gflops": peak / 1e9, "bandwidth_gbs": bw / 1e9, **med}), flush=True)


if __name__ == "__main__":
    main()
