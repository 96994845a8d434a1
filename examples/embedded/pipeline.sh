#!/usr/bin/env bash
# The recipe's stages that exist so far, on the embedded English task:
# task + tokenizer -> teacher pretraining -> teacher completions with top-k
# log-probs -> students pretrained with and without distillation -> scores.
#
#   bash examples/embedded/pipeline.sh [RUN_DIR] [STEPS]
#
# Builds the release binary first. Every stage writes its own directory or
# file under RUN_DIR (default runs/embedded); a stage whose output exists is
# skipped, so re-running after a finished run does nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RUN="${1:-runs/embedded}"
STEPS="${2:-800}"
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
for kind in ce kd; do
  extra=()
  [[ $kind == kd ]] && extra=(--teacher teacher --alpha 0.5 --temperature 1)
  step "student_$kind" pretrain --config task/student.json --tokenizer task/tokenizer.json \
    --data task/train.jsonl --eval task/eval.jsonl --out "student_$kind" --steps "$STEPS" \
    --seed "$SEED" "${extra[@]}"
  step "student_${kind}_eval.jsonl" generate --model "student_$kind" --prompts task/eval_prompts.jsonl \
    --out "student_${kind}_eval.jsonl" --temperature 0 --max-new-tokens 32 --batch-size 32
done

printf '\n%-28s %10s %10s %10s\n' "model (eval prompts)" "eval loss" "accuracy" "score"
for m in teacher student_ce student_kd; do
  loss=$(python3 -c "import json,sys; print(round(json.load(open('$m/posttrain.json'))['metrics']['eval_loss'],4))")
  read -r acc score < <("$BIN" data score --input "${m}_eval.jsonl" | python3 -c "import json,sys; d=json.load(sys.stdin); print(round(d['accuracy'],3), round(d['mean_score'],3))")
  printf '%-28s %10s %10s %10s\n' "$m" "$loss" "$acc" "$score"
done
read -r acc score < <("$BIN" data score --input sft_pairs.jsonl | python3 -c "import json,sys; d=json.load(sys.stdin); print(round(d['accuracy'],3), round(d['mean_score'],3))")
printf '%-28s %10s %10s %10s\n' "teacher data (train prompts)" "-" "$acc" "$score"
