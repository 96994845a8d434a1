#!/usr/bin/env bash
# WARM, GRPO-style advantages with k1/k3 KL, and DPO on a finished embedded
# run (`make -C examples/embedded RUN=DIR` first; it needs DIR/teacher, sft,
# rm, prefs.jsonl, prefs_eval.jsonl and task/):
#
#   bash examples/embedded/beyond.sh DIR [SEEDS]
#
# 1. three reward models from the teacher's trunk (seeds 0-2): held-out
#    pairwise accuracy of each, of their prediction ensemble (mean score) and
#    of their weight average (warp average);
# 2. rlhf from the SFT policy against DIR/rm with each advantage / KL option,
#    one run per seed, evaluated with 8 samples per held-out prompt;
# 3. DPO from the SFT policy on the reward model's preference pairs, evaluated
#    the same way.
# Outputs go to DIR/beyond; a stage whose output exists is skipped.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RUN="$(cd "${1:?usage: beyond.sh RUN_DIR [SEEDS]}" && pwd)"
SEEDS="${2:-0 1}"
BIN="${POSTTRAIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/posttrain}"
mkdir -p "$RUN/beyond"
cd "$RUN/beyond"
step() { local out="$1"; shift; if [[ -e "$out" ]]; then echo "[skip] $out exists"; else echo "[run] $*"; "$BIN" "$@"; fi; }

echo "== WARM: reward models from the teacher's trunk =="
RM=(--policy ../sft --init ../teacher --data ../prefs.jsonl --eval ../prefs_eval.jsonl --steps 300
  --batch-size 16 --lr 3e-4 --warmup 30)
for s in 0 1 2; do step "rm_s$s" reward "${RM[@]}" --seed "$s" --out "rm_s$s"; done
step warm warp average --models rm_s0 rm_s1 rm_s2 --out warm
python3 - <<'EOF'
import json
rows = [json.loads(l) for l in open("../prefs_eval.jsonl")]
for side in ("chosen", "rejected"):
    with open(f"eval_{side}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"], "completion": r[side]}) + "\n")
EOF
scores() { "$BIN" score --reward "$1" --input "$2" | python3 -c "import json,sys; print(json.dumps([json.loads(l)['reward'] for l in sys.stdin]))"; }
for m in rm_s0 rm_s1 rm_s2 warm; do
  [[ -e "$m.scores.json" ]] || echo "{\"chosen\": $(scores "$m" eval_chosen.jsonl), \"rejected\": $(scores "$m" eval_rejected.jsonl)}" > "$m.scores.json"
done
python3 - <<'EOF'
import json, math
def acc(c, r):
    w = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(c, r)]
    m = sum(w) / len(w)
    return m, math.sqrt(m * (1 - m) / len(w))
s = {m: json.load(open(f"{m}.scores.json")) for m in ["rm_s0", "rm_s1", "rm_s2", "warm"]}
print(f"{'reward model':<28} {'held-out accuracy':>20}")
for m in ["rm_s0", "rm_s1", "rm_s2"]:
    a, e = acc(s[m]["chosen"], s[m]["rejected"]); print(f"{m:<28} {a:>13.3f} ± {e:.3f}")
ens = {k: [sum(x) / 3 for x in zip(*(s[m][k] for m in ["rm_s0", "rm_s1", "rm_s2"]))] for k in ("chosen", "rejected")}
a, e = acc(ens["chosen"], ens["rejected"]); print(f"{'prediction ensemble (mean)':<28} {a:>13.3f} ± {e:.3f}")
a, e = acc(s["warm"]["chosen"], s["warm"]["rejected"]); print(f"{'WARM (weight average)':<28} {a:>13.3f} ± {e:.3f}")
EOF

echo "== rlhf advantages and KL placement; DPO =="
RL=(--policy ../sft --reward ../rm --prompts ../task/train_prompts.jsonl --steps 100 --lr 3e-4)
declare -A OPT=(
  [rloo-k1-reward]="--advantage rloo --kl-estimator k1 --kl-in reward"
  [grpo-k3-loss]="--advantage grpo --kl-estimator k3 --kl-in loss"
  [drgrpo-k1-reward]="--advantage dr-grpo --kl-estimator k1 --kl-in reward"
  [rloo-k3-reward]="--advantage rloo --kl-estimator k3 --kl-in reward"
)
CKPTS=()
for name in rloo-k1-reward grpo-k3-loss drgrpo-k1-reward rloo-k3-reward; do
  for s in $SEEDS; do
    # shellcheck disable=SC2086
    step "rl-$name-s$s" rlhf "${RL[@]}" ${OPT[$name]} --seed "$s" --out "rl-$name-s$s"
    CKPTS+=("rl-$name-s$s")
  done
done
for s in $SEEDS; do
  step "dpo-s$s" dpo --policy ../sft --data ../prefs.jsonl --eval ../prefs_eval.jsonl --steps 100 \
    --batch-size 16 --lr 3e-4 --warmup 10 --seed "$s" --out "dpo-s$s"
  CKPTS+=("dpo-s$s")
done
step eval.jsonl eval --checkpoints ../sft "${CKPTS[@]}" --prompts ../task/eval_prompts.jsonl \
  --reward ../rm --reference ../sft --samples 8 --seed 7 --out eval.jsonl
