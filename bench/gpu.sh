#!/usr/bin/env bash
# The GPU path, once, on a lent device: bf16, cuda generation, a random ~0.5B Qwen3 model.
#
#   bash bench/gpu.sh            (on a machine with CUDA; nothing is downloaded)
#
# Prints step breakdowns for LoRA and full, decode tokens/s against the memory-bandwidth bound
# (weights read once per decode step), and training MFU (6 x params x trained tokens / time / peak).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
"$PY" -m pytest -q -s -m gpu tests/test_decode.py tests/test_plan.py  # lean decoder == model forward, CUDA graphs; plan vs max_memory_allocated
"$PY" - <<'PYEOF'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from bench.common import build_bench_model
# Qwen3-0.6B-like shape: 28 layers x 1024 hidden, vocab 151,936 (about 0.6B parameters)
build_bench_model(Path("bench/out/models/q05b"), vocab=151936, hidden=1024, layers=28, heads=16)
PYEOF
"$PY" bench/decode.py --model bench/out/models/q05b --device cuda --dtype bfloat16 --repeats 3  # CUDA graphs vs eager
for mode in lora full; do
  "$PY" bench/step.py --model bench/out/models/q05b --mode "$mode" --prompts-per-step 16 --samples-per-prompt 4 \
      --length 256 --steps 3 --device cuda --dtype bfloat16 | tee -a bench/out/gpu.jsonl
done
"$PY" - <<'PYEOF'
import json
import torch
from transformers import AutoConfig
rows = [json.loads(l) for l in open("bench/out/gpu.jsonl") if l.startswith("{")]
cfg = AutoConfig.from_pretrained("bench/out/models/q05b")
from transformers import AutoModelForCausalLM
with torch.device("meta"):
    n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
props = torch.cuda.get_device_properties(0)
name = props.name
bw = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}.get(next((k for k in ("H200", "H100", "A100") if k in name), ""), None)
peak = {"H100": 989e12, "H200": 989e12, "A100": 312e12}.get(next((k for k in ("H200", "H100", "A100") if k in name), ""), None)
print(f"device {name}, params {n / 1e6:.0f}M")
for r in rows:
    batch = r["prompts"] * r["samples"]
    steps_per_s = r["median_generated_tok_s"] / batch
    bound = bw / (2 * n) if bw else None  # bf16 weights read once per decode step
    mfu = 6 * n * r["median_trained_tok_s"] / peak if peak else None
    print(f"{r['mode']}: decode {r['median_generated_tok_s']:.0f} tok/s ({steps_per_s:.1f} steps/s at batch {batch}; "
          f"bandwidth bound {bound:.0f} steps/s)" if bound else "", f"train MFU {mfu:.1%}" if mfu else "")
PYEOF
