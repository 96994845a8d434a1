#!/usr/bin/env bash
# The fused CPU kernels against Burn's unfused expressions, one binary,
# alternating POSTTRAIN_FUSED=1 / 0, in one sitting.
#
#   bash bench/fused_ab.sh [ROUNDS]
#
# Prints a markdown table of medians (tokens/s for train and sample,
# seconds per step for rlhf-step and reward-step). Never run this while
# anything else (a cargo build!) uses the CPUs.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROUNDS="${1:-3}"
BIN="${POSTTRAIN_BIN:-${CARGO_TARGET_DIR:-$HERE/../target}/release/posttrain}"
OUT="${OUT:-$(mktemp -d)}/ab.jsonl"
echo "results in $OUT" >&2
for _ in $(seq "$ROUNDS"); do
  for fused in 1 0; do
    for shape in tiny small; do
      run() { POSTTRAIN_FUSED=$fused "$BIN" bench --shape "$shape" --peak-gflops 1 "$@" 2>/dev/null |
        sed "s/^{/{\"fused\":$fused,/" >> "$OUT"; }
      run --case train --reps 10 --warmup 2
      run --case sample --reps 5 --warmup 1
      run --case rlhf-step reward-step --reps 7 --warmup 1
    done
  done
done
python3 - "$OUT" <<'EOF'
import json, statistics, sys
from collections import defaultdict
runs = defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs[(r["bench"], r["shape"], r["fused"])].append(r.get("tokens_per_s") or r.get("step_s_median"))
print("| case | unfused | fused | fused / unfused |")
print("|---|---|---|---|")
for bench, shape in sorted({(b, s) for b, s, _ in runs}):
    a, b = (statistics.median(runs[(bench, shape, f)]) for f in (0, 1))
    if bench in ("train", "generate"):
        cells, gain = (f"{a:,.0f} tokens/s", f"{b:,.0f} tokens/s"), b / a
    else:
        cells, gain = (f"{a:.3f} s/step", f"{b:.3f} s/step"), a / b
    print(f"| {bench} `{shape}` | {cells[0]} | {cells[1]} | {gain:.2f}x |")
EOF
