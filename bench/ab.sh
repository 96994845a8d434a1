#!/usr/bin/env bash
# Two posttrain binaries (or one binary under two environments) against
# each other, alternating, in one sitting.
#
#   bash bench/ab.sh ROUNDS OUT.jsonl NAME=COMMAND NAME=COMMAND
#   bash bench/ab.sh 3 ab.jsonl before=/tmp/old/posttrain after=target/release/posttrain
#   bash bench/ab.sh 3 ab.jsonl unfused="env POSTTRAIN_FUSED=0 $BIN" fused="$BIN"
#
# Each round runs, per binary and shape, the train, sample, rlhf-step and
# reward-step cases (one process per case) and appends their JSON lines,
# tagged with the name, to OUT.jsonl; then prints a markdown table of
# medians (tokens/s for train and sample, seconds per step for the steps).
# Never run this while anything else (a cargo build!) uses the CPUs.
set -euo pipefail
ROUNDS="${1:?usage: bash bench/ab.sh ROUNDS OUT.jsonl NAME=COMMAND NAME=COMMAND}"
OUT="${2:?usage: bash bench/ab.sh ROUNDS OUT.jsonl NAME=COMMAND NAME=COMMAND}"
shift 2
for _ in $(seq "$ROUNDS"); do
  for spec in "$@"; do
    name=${spec%%=*}
    read -ra cmd <<< "${spec#*=}"
    for shape in tiny small; do
      run() { "${cmd[@]}" bench --shape "$shape" --peak-gflops 1 "$@" 2>/dev/null |
        sed "s/^{/{\"variant\":\"$name\",/" >> "$OUT"; }
      run --case train --reps 10 --warmup 2
      run --case sample --reps 5 --warmup 1
      run --case rlhf-step reward-step --reps 7 --warmup 1
    done
  done
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
from collections import defaultdict
runs, names = defaultdict(list), []
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["variant"] not in names:
        names.append(r["variant"])
    runs[(r["bench"], r["shape"], r["variant"])].append(r.get("tokens_per_s") or r.get("step_s_median"))
a, b = names[:2]
print(f"| case | {a} | {b} | {b} vs {a} |")
print("|---|---|---|---|")
for bench, shape in sorted({(x, s) for x, s, _ in runs}):
    va, vb = (statistics.median(runs[(bench, shape, n)]) for n in (a, b))
    if bench in ("train", "generate"):
        cells, gain = (f"{va:,.0f} tokens/s", f"{vb:,.0f} tokens/s"), vb / va
    else:
        cells, gain = (f"{va:.3f} s/step", f"{vb:.3f} s/step"), va / vb
    print(f"| {bench} `{shape}` | {cells[0]} | {cells[1]} | {gain:.2f}x |")
PY
