#!/usr/bin/env bash
# The recipe's stages that exist so far, on the embedded English task:
# task + tokenizer -> teacher pretraining -> teacher completions with top-k
# log-probs -> one student fine-tuned four ways on them (CE only, + stored
# top-k KD, + live-teacher KD, + on-policy GKD) -> preference pairs labelled
# by the task scorer -> a reward model ~10x the student -> scores -> two
# WARP iterations (rlhf x 2 seeds with the EMA anchor, one fixed-anchor run
# for comparison, per-layer SLERP, LITI sweep; examples/embedded/warp.mk)
# -> one eval table (RM score, true score, KL to the SFT policy).
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

step prefs_train.jsonl data prefs --policy sft_live teacher --prompts task/train_prompts.jsonl \
  --out prefs_train.jsonl --samples 4 --pairs-per-prompt 4 --seed "$SEED"
step prefs_eval.jsonl data prefs --policy sft_live teacher --prompts task/eval_prompts.jsonl \
  --out prefs_eval.jsonl --samples 4 --seed "$((SEED + 1))"
step rm reward --policy sft_live --size-ratio 10 --data prefs_train.jsonl --eval prefs_eval.jsonl \
  --out rm --steps 600 --batch-size 16 --lr 1e-3 --warmup 30 --seed "$SEED"

python3 - <<'PY'
import json
m = json.load(open("rm/posttrain.json"))["metrics"]
print(f"\nreward model: {m['size_ratio']:.2f}x the student, held-out pairwise accuracy {m['eval']['accuracy']:.3f} "
      f"({m['eval']['pairs']} pairs, reward gap {m['eval']['mean_gap']:.2f} ± {m['eval']['std_gap']:.2f})")
PY
printf '\n%-34s %10s %10s %10s %10s\n' "model (200 held-out prompts)" "eval loss" "accuracy" "score" "RM score"
row() {
  local name="$1" dir="$2" samples="$3" loss acc score rm
  loss=$(python3 -c "import json; print(round(json.load(open('$dir/posttrain.json'))['metrics']['eval_loss'],4))")
  read -r acc score < <("$BIN" data score --input "$samples" | python3 -c "import json,sys; d=json.load(sys.stdin); print(round(d['accuracy'],3), round(d['mean_score'],3))")
  rm=$("$BIN" score --reward rm --input "$samples" | python3 -c "import json,sys; r=[json.loads(l)['reward'] for l in sys.stdin]; print(round(sum(r)/len(r),3))")
  printf '%-34s %10s %10s %10s %10s\n' "$name" "$loss" "$acc" "$score" "$rm"
}
row teacher teacher teacher_eval.jsonl
for v in "${VARIANTS[@]}"; do row "student sft: $v" "sft_$v" "sft_${v}_eval.jsonl"; done
read -r acc score < <("$BIN" data score --input sft_pairs.jsonl | python3 -c "import json,sys; d=json.load(sys.stdin); print(round(d['accuracy'],3), round(d['mean_score'],3))")
printf '%-34s %10s %10s %10s %10s\n' "teacher data (3,000 train prompts)" "-" "$acc" "$score" "-"

echo
echo "== WARP: 2 iterations of rlhf x 2 seeds -> SLERP -> LITI (warp.mk) =="
make --no-print-directory -f "$ROOT/examples/embedded/warp.mk" RUN=. POSTTRAIN="$BIN"
