#!/usr/bin/env bash
# tsopsd vs TRL's DistillationTrainer on the same job, alternating runs, median ratios.
#
#   bash bench/compare.sh            # needs: pip install -e '.[bench]'  (make bench does it)
#   REPEATS=3 THREADS=2 LENGTHS="256 1024 4096" PEER_LENGTHS="256 1024" bash bench/compare.sh
#
# 1. Step time: random Qwen3 model, 8 layers x 512 hidden, vocab 8192; 8 prompts x 1 sample,
#    64 completion tokens (EOS suppressed); LoRA and full.
# 2. Peak memory: vocab 151,936, hidden 256, 4 layers; batch 4; completions of 256, 1024, 4096
#    tokens (LoRA). Each run is its own process; peak RSS includes the weights.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REPEATS=${REPEATS:-3}
THREADS=${THREADS:-2}
LENGTHS=${LENGTHS:-"256 1024 4096"}
PEER_LENGTHS=${PEER_LENGTHS:-"256 1024"}  # TRL at 4096 tokens: hours on 2 cores, and B x T x V logits
OUT=bench/out
mkdir -p "$OUT/models"
RESULTS="$OUT/compare.jsonl"
: > "$RESULTS"

"$PY" - <<'PYEOF'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from bench.common import build_bench_model
build_bench_model(Path("bench/out/models/q8x512"), vocab=8192, hidden=512, layers=8)
build_bench_model(Path("bench/out/models/v152k"), vocab=151936, hidden=256, layers=4, heads=4)
PYEOF

run() {  # tool mode model prompts length steps
  local script=bench/step.py
  [ "$1" = trl ] && script=bench/peer_trl.py
  "$PY" "$script" --model "bench/out/models/$3" --mode "$2" --prompts-per-step "$4" --length "$5" \
      --steps "$6" --threads "$THREADS" 2>/dev/null | tail -n 1 >> "$RESULTS"
}

for r in $(seq "$REPEATS"); do
  for mode in lora full; do
    echo "step time, repeat $r, $mode" >&2
    run tsopsd "$mode" q8x512 8 64 5
    run trl "$mode" q8x512 8 64 5
  done
done
for len in $LENGTHS; do
  echo "memory, $len tokens" >&2
  run tsopsd lora v152k 4 "$len" 1
  case " $PEER_LENGTHS " in *" $len "*) run trl lora v152k 4 "$len" 1 ;; esac
done

"$PY" - "$RESULTS" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"machine: {rows[0]['device']}, {rows[0]['threads']} threads, dtype {rows[0]['dtype']}")
print("\nstep time, 8-layer x 512 model, 8 prompts x 1 sample, 64 tokens (median over runs of median step):")
for mode in ("lora", "full"):
    t = [r["median_step_s"] for r in rows if r["tool"] == "tsopsd" and r["mode"] == mode and r["length"] == 64]
    p = [r["median_step_s"] for r in rows if r["tool"] == "trl" and r["mode"] == mode and r["length"] == 64]
    if t and p:
        print(f"  {mode:5s} tsopsd {statistics.median(t):.3f} s   TRL {statistics.median(p):.3f} s   "
              f"ratio {statistics.median(t) / statistics.median(p):.2f}")
print("\npeak memory, vocab 151,936, batch 4, LoRA (MiB, RSS incl. weights):")
for length in sorted({r["length"] for r in rows if r["length"] != 64}):
    t = [r["peak_memory_mib"] for r in rows if r["tool"] == "tsopsd" and r["length"] == length]
    p = [r["peak_memory_mib"] for r in rows if r["tool"] == "trl" and r["length"] == length]
    tt = f"{statistics.median(t):.0f}" if t else "n/a"
    pp = f"{statistics.median(p):.0f}" if p else "not run"
    ratio = f"{statistics.median(t) / statistics.median(p):.2f}" if t and p else "n/a"
    print(f"  {length:5d} tokens: tsopsd {tt}   TRL {pp}   ratio {ratio}")
PYEOF
