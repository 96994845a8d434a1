#!/usr/bin/env bash
# The recipe's stages that exist so far, on the embedded English task:
# task + tokenizer -> teacher pretraining -> teacher completions with top-k
# log-probs -> one student fine-tuned four ways on them (CE only, + stored
# top-k KD, + live-teacher KD, + on-policy GKD) -> scores.
#
#   bash examples/embedded/pipeline.sh [RUN_DIR] [STEPS] [SFT_STEPS]
#
# Builds the release binary first. Every stage writes its own directory or
# file under RUN_DIR (default runs/embedded); a stage whose output exists is
# skipped, so re-running after a finished run does nothing. SEED picks the
# task, teacher and student seed (default 0).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RUN="${1:-runs/embedded}"
STEPS="${2:-800}"
SFT_STEPS="${3:-$STEPS}"
SEED="${SEED:-0}"
cargo build --release --manifest-path "$ROOT/Cargo.toml" --quiet
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/posttrain"
mkdir -p "$RUN"
cd "$RUN"
step() { local out="$1"; shift; if [[ -e "$out" ]]; then echo "[skip] $out exists"; else echo "[run] $*"; "$BIN" "$@"; fi; }

step task data synth --seed "$SEED" --out task --vocab-size 128
step teacher pretrain --config task/teacher.json --tokenizer task/tokenizer.json \
  --data task/train.jsonl --eval task/eval.jsonl --out teacher --steps "$STEPS" --seed "$SEED"
step teacher_eval.jsonl generate --model teacher --prompts task/eval_prompts.jsonl \
  --out teacher_eval.jsonl --temperature 0 --max-new-tokens 32 --batch-size 32
step sft_pairs.jsonl generate --model teacher --prompts task/train_prompts.jsonl \
  --out sft_pairs.jsonl --temperature 0 --max-new-tokens 32 --batch-size 32 --topk 8
step student_init init --config task/student.json --tokenizer task/tokenizer.json --seed "$SEED" --out student_init

declare -A KD=(
  [ce]="--kd none"
  [topk]="--kd topk --alpha 0.5"
  [live]="--kd live --teacher teacher --alpha 0.5"
  [onpolicy]="--kd live --teacher teacher --alpha 0.5 --on-policy-fraction 0.5 --gkd-beta 0.5"
)
VARIANTS=(ce topk live onpolicy)
for v in "${VARIANTS[@]}"; do
  # shellcheck disable=SC2086
  step "sft_$v" sft --model student_init --data sft_pairs.jsonl --eval task/eval.jsonl \
    --out "sft_$v" --steps "$SFT_STEPS" --seed "$SEED" ${KD[$v]}
  step "sft_${v}_eval.jsonl" generate --model "sft_$v" --prompts task/eval_prompts.jsonl \
    --out "sft_${v}_eval.jsonl" --temperature 0 --max-new-tokens 32 --batch-size 32
done

printf '\n%-34s %10s %10s %10s\n' "model (200 held-out prompts)" "eval loss" "accuracy" "score"
row() {
  local name="$1" dir="$2" samples="$3" loss acc score
  loss=$(python3 -c "import json; print(round(json.load(open('$dir/posttrain.json'))['metrics']['eval_loss'],4))")
  read -r acc score < <("$BIN" data score --input "$samples" | python3 -c "import json,sys; d=json.load(sys.stdin); print(round(d['accuracy'],3), round(d['mean_score'],3))")
  printf '%-34s %10s %10s %10s\n' "$name" "$loss" "$acc" "$score"
}
row teacher teacher teacher_eval.jsonl
for v in "${VARIANTS[@]}"; do row "student sft: $v" "sft_$v" "sft_${v}_eval.jsonl"; done
read -r acc score < <("$BIN" data score --input sft_pairs.jsonl | python3 -c "import json,sys; d=json.load(sys.stdin); print(round(d['accuracy'],3), round(d['mean_score'],3))")
printf '%-34s %10s %10s %10s\n' "teacher data (3,000 train prompts)" "-" "$acc" "$score"
