#!/usr/bin/env bash
# The reward-model and RLHF recipe on the wide embedded task: operands up to
# 99 (~26,000 distinct questions, 24,000 of them for training), so that more
# preference pairs mean new prompts rather than repeated ones.
#
#   bash examples/embedded/wide.sh [RUN_DIR]
#   WIDE_UNTIL=rm bash examples/embedded/wide.sh DIR   # stop after the reward model
#   WIDE_MPIRUN="mpirun -np 2" POSTTRAIN=BIN bash …   # training and data stages
#                                                     # as MPI ranks (--features mpi)
#
# task -> 10x teacher (wide/teacher.json: the task's teacher with a 384-wide
# MLP, 9.76x the student) -> greedy top-k completions -> live-KD student ->
# preference pairs from student and teacher -> reward model started from the
# teacher's trunk -> the same size sweep from scratch -> two WARP iterations
# against that reward model (warp.mk). A stage whose output exists is skipped.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RUN="${1:-runs/wide}"
if [[ -z "${POSTTRAIN:-}" ]]; then cargo build --release --manifest-path "$ROOT/Cargo.toml" --quiet; fi
BIN="${POSTTRAIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/posttrain}"
read -r -a PAR <<<"${WIDE_MPIRUN:-}"
mkdir -p "$RUN"
cd "$RUN"
step() { local out="$1"; shift; if [[ -e "$out" ]]; then echo "[skip] $out exists"; else echo "[run] $*"; "$BIN" "$@"; fi; }
pstep() { local out="$1"; shift; if [[ -e "$out" ]]; then echo "[skip] $out exists"; else echo "[run] $*"; "${PAR[@]}" "$BIN" "$@"; fi; }

step task data synth --seed 0 --out task --vocab-size 128 --max-number 99 --train 24000
pstep teacher pretrain --config "$ROOT/examples/embedded/wide/teacher.json" --tokenizer task/tokenizer.json \
  --data task/train.jsonl --eval task/eval.jsonl --out teacher --steps 5000 --seed 0 --eval-every 1000
step student_init init --config task/student.json --tokenizer task/tokenizer.json --seed 0 --out student_init
pstep sft_pairs.jsonl generate --model teacher --prompts task/train_prompts.jsonl --out sft_pairs.jsonl \
  --temperature 0 --max-new-tokens 32 --batch-size 32 --topk 8
pstep sft_live sft --model student_init --data sft_pairs.jsonl --eval task/eval.jsonl --out sft_live \
  --steps 800 --seed 0 --kd live --teacher teacher --alpha 0.5

pstep prefs_train.jsonl data prefs --policy sft_live teacher --prompts task/train_prompts.jsonl \
  --out prefs_train.jsonl --samples 4 --pairs-per-prompt 1 --seed 0
pstep prefs_eval.jsonl data prefs --policy sft_live teacher --prompts task/eval_prompts.jsonl \
  --out prefs_eval.jsonl --samples 4 --seed 1
pstep prefs_eval8.jsonl data prefs --policy sft_live teacher --prompts task/eval_prompts.jsonl \
  --out prefs_eval8.jsonl --samples 8 --pairs-per-prompt 2 --seed 2

RM=(--policy sft_live --data prefs_train.jsonl --eval prefs_eval.jsonl --steps 1500 --batch-size 16
  --warmup 50 --eval-every 250 --seed 0)
pstep rm reward "${RM[@]}" --init teacher --lr 3e-4 --out rm
[[ "${WIDE_UNTIL:-}" == rm ]] && exit 0
step rm1_init reward "${RM[@]}" --init sft_live --lr 3e-4 --out rm1_init
for r in 1 3 10; do
  step "rm${r}_scratch" reward "${RM[@]}" --size-ratio "$r" --lr 1e-3 --out "rm${r}_scratch"
done

echo
printf '%-28s %8s %12s %12s\n' "reward model" "ratio" "eval pairs" "eval8 pairs"
for m in rm rm1_init rm1_scratch rm3_scratch rm10_scratch; do
  ratio=$(python3 -c "import json; print(round(json.load(open('$m/posttrain.json'))['metrics']['size_ratio'],2))")
  acc=()
  for pairs in prefs_eval.jsonl prefs_eval8.jsonl; do
    acc+=("$("$BIN" score --reward "$m" --pairs "$pairs" |
      python3 -c "import json,sys; d=json.load(sys.stdin); print(f\"{d['accuracy']:.3f} ({d['pairs']})\")")")
  done
  printf '%-28s %8s %12s %12s\n' "$m" "$ratio" "${acc[0]}" "${acc[1]}"
done

echo
echo "== WARP against the reward model: 2 iterations of rlhf x 2 seeds -> SLERP -> LITI =="
make -f "$ROOT/examples/embedded/warp.mk" RUN=. SFT=sft_live REWARD_MODEL=rm \
  PROMPTS=task/train_prompts.jsonl EVAL_PROMPTS=task/eval_prompts.jsonl POSTTRAIN="$BIN" \
  W=warp EXTRA_CHECKPOINTS=teacher

echo
echo "== the README's table: 16 samples per held-out prompt =="
step eval16.jsonl eval --checkpoints sft_live warp/it1/sft-anchor warp/it1/rl-s0 warp/it1/rl-s1 \
  warp/it1/merge/eta-0.30 warp/it1/merge/eta-0.50 warp/it1/merge/eta-0.70 warp/it1/merge/eta-1.00 \
  warp/it2/rl-s0 warp/it2/rl-s1 warp/it2/merge/eta-0.30 warp/it2/merge/eta-0.70 warp/it2/merge/eta-1.00 \
  --prompts task/eval_prompts.jsonl --reward rm --reference sft_live --samples 16 --seed 7 --out eval16.jsonl
