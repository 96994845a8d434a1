#!/usr/bin/env bash
# The fused CPU kernels against Burn's unfused expressions, one binary,
# alternating POSTTRAIN_FUSED=0 / 1, in one sitting (bench/ab.sh).
#
#   bash bench/fused_ab.sh [ROUNDS]
#
# Prints a markdown table of medians (tokens/s for train and sample,
# seconds per step for rlhf-step and reward-step). Never run this while
# anything else (a cargo build!) uses the CPUs.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN="${POSTTRAIN_BIN:-${CARGO_TARGET_DIR:-$HERE/../target}/release/posttrain}"
OUT="${OUT:-$(mktemp -d)}/ab.jsonl"
echo "results in $OUT" >&2
bash "$HERE/ab.sh" "${1:-3}" "$OUT" unfused="env POSTTRAIN_FUSED=0 $BIN" fused="env POSTTRAIN_FUSED=1 $BIN"
