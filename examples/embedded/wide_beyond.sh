#!/usr/bin/env bash
# WARM, GRPO-style advantages with k1/k3 KL, and DPO on the wide task, on a
# run made by `WIDE_UNTIL=rm bash examples/embedded/wide.sh DIR` (or all of
# wide.sh): it needs DIR/task, teacher, sft_live, prefs_train.jsonl,
# prefs_eval.jsonl, prefs_eval8.jsonl and rm.
#
#   bash examples/embedded/wide_beyond.sh DIR
#   WIDE_MPIRUN="mpirun -np 2" POSTTRAIN=BIN bash …   # as MPI ranks
#
# 1. WARM: rm (seed 0, score head of seed 0) and four more reward models
#    with rm's recipe and seeds 1-4, once with new score heads of their own
#    seeds (rm_s*) and once sharing rm's head initialisation (--head-seed 0,
#    rm_h*: WARM's one shared initialisation) -> weight averages of the
#    first 3 and of all 5 (warp average); pairwise accuracy of members,
#    prediction ensembles and WARM models on the held-out pairs and on pairs
#    sampled from RL policies (a distribution shift); three more members
#    continue from rm itself (rm_f*, 500 steps, lr 1e-4) -> warmf3; rlhf from
#    sft_live against rm vs against each 5-model average, same steps, two
#    seeds.
# 2. rlhf against rm with each advantage / KL placement, two seeds.
# 3. DPO from sft_live on rm's training pairs, two seeds.
# 4. One held-out eval, 16 samples per prompt, and the tables
#    (DIR/beyond/tables.md). A stage whose output exists is skipped.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RUN="$(cd "${1:?usage: wide_beyond.sh RUN_DIR}" && pwd)"
BIN="${POSTTRAIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/posttrain}"
read -r -a PAR <<<"${WIDE_MPIRUN:-}"
RL_STEPS="${RL_STEPS:-300}"
SEEDS="0 1"
mkdir -p "$RUN/beyond"
cd "$RUN/beyond"
step() { local out="$1"; shift; if [[ -e "$out" ]]; then echo "[skip] $out exists"; else echo "[run] $*"; "${PAR[@]}" "$BIN" "$@"; fi; }
serial() { local out="$1"; shift; if [[ -e "$out" ]]; then echo "[skip] $out exists"; else echo "[run] $*"; "$BIN" "$@"; fi; }
timed() { local out="$1"; shift; if [[ ! -e "$out" ]]; then local t0; t0=$(date +%s.%N); step "$out" "$@"; python3 -c "print(round($(date +%s.%N) - $t0, 1))" > "$out.wall"; fi; }

echo "== WARM members =="
RM=(--policy ../sft_live --init ../teacher --data ../prefs_train.jsonl --eval ../prefs_eval.jsonl --steps 1500
  --batch-size 16 --warmup 50 --eval-every 250 --lr 3e-4)
[[ -e rm_s0 ]] || ln -s ../rm rm_s0
for s in 1 2 3 4; do step "rm_s$s" reward "${RM[@]}" --seed "$s" --out "rm_s$s"; done
for s in 1 2 3 4; do step "rm_h$s" reward "${RM[@]}" --seed "$s" --head-seed 0 --out "rm_h$s"; done
serial warm3 warp average --models rm_s0 rm_s1 rm_s2 --out warm3
serial warm5 warp average --models rm_s0 rm_s1 rm_s2 rm_s3 rm_s4 --out warm5
serial warmh3 warp average --models rm_s0 rm_h1 rm_h2 --out warmh3
serial warmh5 warp average --models rm_s0 rm_h1 rm_h2 rm_h3 rm_h4 --out warmh5
# members that start from one trained reward model (its trunk and head: WARM's
# fine-tuned shared initialisation) and continue 500 steps on other data orders
for s in 1 2 3; do
  step "rm_f$s" reward --policy ../sft_live --init ../rm --data ../prefs_train.jsonl --eval ../prefs_eval.jsonl \
    --steps 500 --batch-size 16 --warmup 50 --eval-every 250 --lr 1e-4 --seed "$s" --out "rm_f$s"
done
serial warmf3 warp average --models rm_f1 rm_f2 rm_f3 --out warmf3

echo "== rlhf: advantages and KL placement against rm; member vs WARM =="
RL=(--policy ../sft_live --prompts ../task/train_prompts.jsonl --steps "$RL_STEPS" --lr 3e-4 --snapshot-every 100)
declare -A OPT=(
  [rloo-k1-reward]="--advantage rloo --kl-estimator k1 --kl-in reward"
  [grpo-k3-loss]="--advantage grpo --kl-estimator k3 --kl-in loss"
  [drgrpo-k1-reward]="--advantage dr-grpo --kl-estimator k1 --kl-in reward"
  [rloo-k3-reward]="--advantage rloo --kl-estimator k3 --kl-in reward"
)
CKPTS=(../sft_live)
for s in $SEEDS; do
  for name in rloo-k1-reward grpo-k3-loss drgrpo-k1-reward rloo-k3-reward; do
    # shellcheck disable=SC2086
    timed "rl-$name-s$s" rlhf "${RL[@]}" --reward ../rm ${OPT[$name]} --seed "$s" --out "rl-$name-s$s"
    CKPTS+=("rl-$name-s$s")
  done
  timed "rl-warm5-s$s" rlhf "${RL[@]}" --reward warm5 --seed "$s" --out "rl-warm5-s$s"
  CKPTS+=("rl-warm5-s$s")
done
for s in $SEEDS; do
  for run in rl-rloo-k1-reward rl-warm5; do
    for snap in "$run-s$s"/snapshots/step-*; do CKPTS+=("$snap"); done
  done
done
WARMH=()
for s in $SEEDS; do
  timed "rl-warmh5-s$s" rlhf "${RL[@]}" --reward warmh5 --seed "$s" --out "rl-warmh5-s$s"
  WARMH+=("rl-warmh5-s$s" "rl-warmh5-s$s"/snapshots/step-*)
done

echo "== DPO =="
for s in $SEEDS; do
  timed "dpo-s$s" dpo --policy ../sft_live --data ../prefs_train.jsonl --eval ../prefs_eval.jsonl \
    --steps "$RL_STEPS" --batch-size 16 --lr 3e-4 --warmup 10 --seed "$s" --out "dpo-s$s"
  CKPTS+=("dpo-s$s")
done

echo "== shifted pairs: samples of the RL policies, labelled by the task's scorer =="
step prefs_shift.jsonl data prefs --policy rl-rloo-k1-reward-s0 rl-warm5-s0 \
  --prompts ../task/eval_prompts.jsonl --out prefs_shift.jsonl --samples 4 --pairs-per-prompt 2 --seed 3
for pairs in prefs_eval prefs_eval8; do [[ -e "$pairs.jsonl" ]] || ln -s "../$pairs.jsonl" "$pairs.jsonl"; done
for pairs in prefs_eval prefs_eval8 prefs_shift; do
  python3 - "$pairs" <<'EOF'
import json, sys
p = sys.argv[1]
rows = [json.loads(l) for l in open(f"{p}.jsonl")]
for side in ("chosen", "rejected"):
    with open(f"{p}.{side}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"], "completion": r[side]}) + "\n")
EOF
  for m in rm_s0 rm_s1 rm_s2 rm_s3 rm_s4 warm3 warm5 rm_h1 rm_h2 rm_h3 rm_h4 warmh3 warmh5 rm_f1 rm_f2 rm_f3 warmf3; do
    for side in chosen rejected; do
      out="scores/$m.$pairs.$side.jsonl"
      mkdir -p scores
      [[ -e "$out" ]] || "${PAR[@]}" "$BIN" score --reward "$m" --input "$pairs.$side.jsonl" --out "$out"
    done
  done
done

echo "== held-out eval: 16 samples per prompt =="
step eval16.jsonl eval --checkpoints "${CKPTS[@]}" --prompts ../task/eval_prompts.jsonl \
  --reward ../rm --reference ../sft_live --samples 16 --seed 7 --out eval16.jsonl
step eval16_warm5.jsonl eval --checkpoints ../sft_live rl-warm5-s0 rl-warm5-s1 rl-rloo-k1-reward-s0 \
  rl-rloo-k1-reward-s1 --prompts ../task/eval_prompts.jsonl --reward warm5 --samples 16 --seed 7 \
  --out eval16_warm5.jsonl

step eval16_h.jsonl eval --checkpoints "${WARMH[@]}" --prompts ../task/eval_prompts.jsonl \
  --reward ../rm --reference ../sft_live --samples 16 --seed 7 --out eval16_h.jsonl
step eval16_warmh5.jsonl eval --checkpoints ../sft_live rl-warmh5-s0 rl-warmh5-s1 rl-rloo-k1-reward-s0 \
  rl-rloo-k1-reward-s1 --prompts ../task/eval_prompts.jsonl --reward warmh5 --samples 16 --seed 7 \
  --out eval16_warmh5.jsonl

python3 "$ROOT/examples/embedded/wide_beyond_tables.py" . | tee tables.md
