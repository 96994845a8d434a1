#!/usr/bin/env bash
# issue 19 sitting: compare.sh (peer vs posttrain, 3 rounds) then fused vs unfused A/B
set -euo pipefail
cd /work/main
BIN=/tmp/b19/posttrain
lscpu | grep "Model name" > /tmp/b19/cpu.txt; grep -m1 "cpu family" /proc/cpuinfo >> /tmp/b19/cpu.txt
rm -rf /tmp/b19/compare; mkdir -p /tmp/b19/compare
OUT=/tmp/b19/compare POSTTRAIN_BIN=$BIN bash bench/compare.sh /tmp/peftvenv 3 > /tmp/b19/compare.md 2>/tmp/b19/compare.err
: > /tmp/b19/ab.jsonl
for r in 1 2 3; do
  for mode in 1 0; do
    for shape in tiny small; do
      POSTTRAIN_FUSED=$mode $BIN bench --shape $shape --case train --reps 10 --warmup 2 --peak-gflops 100 | sed "s/^{/{\"fused\":$mode,/" >> /tmp/b19/ab.jsonl
      POSTTRAIN_FUSED=$mode $BIN bench --shape $shape --case sample --reps 5 --warmup 1 --peak-gflops 100 | sed "s/^{/{\"fused\":$mode,/" >> /tmp/b19/ab.jsonl
      POSTTRAIN_FUSED=$mode $BIN bench --shape $shape --case rlhf-step reward-step --reps 7 --warmup 1 --peak-gflops 100 2>/dev/null | sed "s/^{/{\"fused\":$mode,/" >> /tmp/b19/ab.jsonl
    done
  done
done
echo done > /tmp/b19/finished
