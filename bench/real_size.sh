#!/usr/bin/env bash
# Real size: posttrain's LoRA stages on a Gemma-2 2B directory beside TRL + PEFT, one sitting.
#
#   bash bench/real_size.sh MODEL_DIR PAIRS.jsonl PROMPTS.jsonl PREFS.jsonl [PEER_VENV]
#
# MODEL_DIR: a Gemma-2 checkpoint in Hugging Face layout (shared/bench/peer/make_gemma2_2b.py
# writes a random-weight 2B). PAIRS: prompt/completion rows (16 short ones were used), PROMPTS:
# prompt rows, PREFS: prompt/chosen/rejected rows; PEER_VENV (with torch, transformers, peft, trl)
# adds TRL + PEFT's LoRA SFT step (PEER_DIR: the peer scripts). Prints one JSON line per case: wall seconds,
# peak RSS (GNU time), and the median step time from the run's metrics. Run on an idle machine.
set -euo pipefail
model=$1 pairs=$2 prompts=$3 prefs=$4 venv=${5:-}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${POSTTRAIN_BIN:-${CARGO_TARGET_DIR:-$HERE/../target}/release/posttrain}"
peer="${PEER_DIR:-$HERE/../../shared/bench/peer}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# case NAME OUT_DIR CMD...: runs CMD under GNU time, prints the JSON line
case_() {
  local name=$1 out=$2; shift 2
  /usr/bin/time -f '%e %M' -o "$work/time" "$@" >"$work/log" 2>&1 || { tail -3 "$work/log"; exit 1; }
  read -r wall rss <"$work/time"
  python3 - "$name" "$wall" "$rss" "$out" <<'PY'
import json, statistics, sys
name, wall, rss, out = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
row = {"case": name, "wall_s": wall, "peak_rss_mb": rss // 1024}
try:
    rows = [json.loads(l) for l in open(f"{out}/metrics.jsonl")]
except OSError:
    rows = []
if rows and "tokens_per_s" in rows[0]:
    t = [r["tokens"] / r["tokens_per_s"] for r in rows]
    steps = [b - a for a, b in zip([0] + t, t)]
    row["step_s_median"] = round(statistics.median(steps), 2)
elif rows and "update_s" in rows[0]:
    row["step_s_median"] = round(statistics.median(
        r["rollout_s"] + r["reward_s"] + r["logprob_s"] + r["update_s"] for r in rows), 2)
    row["rollout_s"] = round(statistics.median(r["rollout_s"] for r in rows), 2)
    row["logprob_s"] = round(statistics.median(r["logprob_s"] for r in rows), 2)
    row["update_s"] = round(statistics.median(r["update_s"] for r in rows), 2)
print(json.dumps(row))
PY
}

case_ sample "$work/none" "$bin" sample --model "$model" --prompts "$prompts" --max-new-tokens 8 --out "$work/samples.jsonl"
case_ sft_lora16 "$work/sft" "$bin" sft --model "$model" --data "$pairs" --out "$work/sft" --steps 4 --batch-size 1 \
  --kd none --lora-rank 16 --lora-alpha 32 --eval-every 0 --save-state-every 0 --eval-samples 0 --warmup 0 --lr 1e-4
case_ sft_lora16_f32base "$work/sft32" "$bin" sft --model "$model" --data "$pairs" --out "$work/sft32" --steps 4 --batch-size 1 \
  --kd none --lora-rank 16 --lora-alpha 32 --eval-every 0 --save-state-every 0 --eval-samples 0 --warmup 0 --lr 1e-4 \
  --base-dtype f32
case_ sft_lora16_seed1 "$work/sft1" "$bin" sft --model "$model" --data "$pairs" --out "$work/sft1" --steps 4 --batch-size 1 \
  --kd none --lora-rank 16 --lora-alpha 32 --eval-every 0 --save-state-every 0 --eval-samples 0 --warmup 0 --lr 1e-4 --seed 1
case_ warp_merge_lora "$work/none" "$bin" warp merge --init "$model" --policies "$work/sft" "$work/sft1" \
  --eta 0.1,0.3,0.5,0.7,1.0 --out "$work/merge"
case_ sample_merged "$work/none" "$bin" sample --model "$work/merge/eta-0.30" --prompts "$prompts" --max-new-tokens 8 --out "$work/samples3.jsonl"
case_ sample_adapter "$work/none" "$bin" sample --model "$work/sft" --prompts "$prompts" --max-new-tokens 8 --out "$work/samples2.jsonl"
case_ reward_lora16 "$work/rm" "$bin" reward --policy "$model" --init "$model" --data "$prefs" --out "$work/rm" --steps 2 \
  --batch-size 1 --eval-every 0 --lora-rank 16 --save-state-every 0 --warmup 0
case_ rlhf_lora16_k2 "$work/rl" "$bin" rlhf --policy "$model" --task-reward --prompts "$prompts" --out "$work/rl" --steps 2 \
  --prompts-per-step 2 --samples 2 --max-new-tokens 8 --lora-rank 16 --save-state-every 0
if [[ -n "$venv" ]]; then
  "$venv/bin/python" "$peer/trl_lora_2b.py" "$model" "$pairs" fp32 4 2>/dev/null | tail -1
fi
