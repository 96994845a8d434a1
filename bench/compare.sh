#!/usr/bin/env bash
# posttrain vs the PyTorch + transformers peer, alternating, in one sitting.
#
#   bash bench/compare.sh PEER_VENV [ROUNDS] [EXTRA_BACKEND]
#
# PEER_VENV is made by shared/bench/peer/setup.sh. Each round runs both
# fp32 2048³ matmuls and posttrain's memory read rate, then, per shape, the peer's training and generation
# benchmarks and posttrain's, one process per case (so peak RSS is per
# case; posttrain's MFU is against its own matmul of that round), then
# TRL's RLOO (at β 0 and at posttrain's β 0.1) and reward-model steps
# (bench_trl.py) against posttrain's rlhf-step and reward-step. EXTRA_BACKEND (e.g.
# ndarray) also measures posttrain built with that feature, from
# POSTTRAIN_EXTRA_BIN. Prints a markdown table of medians over rounds.
# Never run this while anything else (a cargo build!) uses the CPUs.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${1:?usage: bash bench/compare.sh PEER_VENV [ROUNDS] [EXTRA_BACKEND]}"
ROUNDS="${2:-3}"
EXTRA="${3:-}"
BIN="${POSTTRAIN_BIN:-${CARGO_TARGET_DIR:-$HERE/../target}/release/posttrain}"
PEER="${PEER_DIR:-$HERE/../../shared/bench/peer}"
OUT="${OUT:-$(mktemp -d)}"
echo "results in $OUT" >&2
for _ in $(seq "$ROUNDS"); do
  # The matmul peak once per round; every case's MFU is measured against it.
  "$VENV/bin/python" "$PEER/bench_matmul.py" --dtypes fp32 >> "$OUT/peer.jsonl"
  "$BIN" bench --case matmul >> "$OUT/posttrain.jsonl"
  PEAK="$(tail -n 1 "$OUT/posttrain.jsonl" | python3 -c 'import json, sys; print(json.load(sys.stdin)["gflops_best"])')"
  # the memory read rate once per round: sampling's bandwidth bound
  "$BIN" bench --case bandwidth >> "$OUT/posttrain.jsonl"
  GBS="$(tail -n 1 "$OUT/posttrain.jsonl" | python3 -c 'import json, sys; print(json.load(sys.stdin)["read_gbs_best"])')"
  for shape in tiny small; do
    "$VENV/bin/python" "$PEER/bench_train.py" --preset "$shape" --steps 10 --warmup 2 >> "$OUT/peer.jsonl"
    "$BIN" bench --shape "$shape" --case train --reps 10 --warmup 2 --peak-gflops "$PEAK" >> "$OUT/posttrain.jsonl"
    "$VENV/bin/python" "$PEER/bench_generate.py" --preset "$shape" --reps 5 >> "$OUT/peer.jsonl"
    "$BIN" bench --shape "$shape" --case sample --reps 5 --warmup 1 --peak-gflops "$PEAK" --peak-gbs "$GBS" >> "$OUT/posttrain.jsonl"
    # TRL prints its log dicts to stdout too: keep the JSON line
    "$VENV/bin/python" "$PEER/bench_trl.py" rloo --preset "$shape" --steps 8 | grep '^{"' >> "$OUT/peer.jsonl"
    # posttrain's KL weight (β 0.1): TRL then runs its reference model too
    "$VENV/bin/python" "$PEER/bench_trl.py" rloo --preset "$shape" --steps 8 --beta 0.1 | grep '^{"' >> "$OUT/peer.jsonl"
    "$BIN" bench --shape "$shape" --case rlhf-step --reps 7 --warmup 1 --peak-gflops "$PEAK" >> "$OUT/posttrain.jsonl"
    "$VENV/bin/python" "$PEER/bench_trl.py" reward --preset "$shape" --steps 8 | grep '^{"' >> "$OUT/peer.jsonl"
    "$BIN" bench --shape "$shape" --case reward-step --reps 7 --warmup 1 --peak-gflops "$PEAK" >> "$OUT/posttrain.jsonl"
    if [[ -n "$EXTRA" ]]; then
      "$POSTTRAIN_EXTRA_BIN" --backend "$EXTRA" bench --shape "$shape" --case train --reps 10 --warmup 2 --peak-gflops "$PEAK" >> "$OUT/posttrain.jsonl"
      "$POSTTRAIN_EXTRA_BIN" --backend "$EXTRA" bench --shape "$shape" --case sample --reps 5 --warmup 1 --peak-gflops "$PEAK" >> "$OUT/posttrain.jsonl"
    fi
  done
done
python3 "$HERE/table.py" "$OUT"
