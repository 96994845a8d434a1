#!/usr/bin/env bash
# Data parallelism on one machine: `sft` and `rlhf` as one process with T threads against T
# ranks of one thread each (mpirun), alternating, ROUNDS rounds; one JSON line per run, then a
# markdown table of medians. Needs a binary built with `--features mpi` and Open MPI.
#
#   bash bench/mpi.sh [OUT_DIR]        (ROUNDS=3 THREADS=2 BIN=… to change)
#
# Models: the embedded task's student shape (82k parameters) and the `small` bench shape
# (31M parameters, 512 vocabulary), both new random weights on `data synth` data.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-$(mktemp -d)}"
ROUNDS="${ROUNDS:-3}"
THREADS="${THREADS:-2}"
BIN="${BIN:-${CARGO_TARGET_DIR:-target}/release/posttrain}"
mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

"$BIN" data synth --seed 0 --vocab-size 512 --out "$OUT/task" --overwrite 2>/dev/null
python3 - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
c = json.load(open(f"{out}/task/student.json"))
json.dump(c, open(f"{out}/student.json", "w"))
c.update(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
         num_key_value_heads=4, head_dim=64, query_pre_attn_scalar=64,
         layer_types=["sliding_attention", "full_attention"] * 4)
json.dump(c, open(f"{out}/small.json", "w"))
EOF
for shape in student small; do
  "$BIN" init --config "$OUT/$shape.json" --tokenizer "$OUT/task/tokenizer.json" --seed 0 \
    --out "$OUT/$shape" --overwrite 2>/dev/null
done

# one run: prints {"case", "shape", "mode", "seconds", "tokens", "steps", "all_reduce_s", ...}
run() {
  local case=$1 shape=$2 mode=$3 dir="$OUT/run-$1-$2-$3"
  local launch=("$BIN")
  if [[ $mode == ranks ]]; then
    launch=(mpirun -np "$THREADS" -x RAYON_NUM_THREADS=1 "$BIN")
  fi
  local args
  case $case in
    sft) args=(sft --model "$OUT/$shape" --data "$OUT/task/train.jsonl" --steps 20
               --batch-size 16 --eval-every 0) ;;
    rlhf) args=(rlhf --policy "$OUT/$shape" --task-reward --prompts "$OUT/task/train_prompts.jsonl"
                --steps 6 --prompts-per-step 8 --samples 4 --max-new-tokens 32) ;;
  esac
  if [[ $mode == ranks ]]; then
    "${launch[@]}" "${args[@]}" --out "$dir" --overwrite 2>/dev/null
  else
    RAYON_NUM_THREADS="$THREADS" "${launch[@]}" "${args[@]}" --out "$dir" --overwrite 2>/dev/null
  fi
  python3 - "$case" "$shape" "$mode" "$dir" <<'EOF'
import json, sys
case, shape, mode, d = sys.argv[1:]
m = json.load(open(f"{d}/posttrain.json"))["metrics"]
rows = [json.loads(l) for l in open(f"{d}/metrics.jsonl")]
mean = lambda k: sum(r.get(k, 0.0) for r in rows) / len(rows)
print(json.dumps({"case": case, "shape": shape, "mode": mode, "seconds": m["seconds"],
                  "tokens": m["tokens"], "steps": len(rows),
                  "rollout_s": mean("rollout_s"), "update_s": mean("update_s"),
                  "all_reduce_s": mean("all_reduce_s")}))
EOF
}

LOG="$OUT/runs.jsonl"
: > "$LOG"
for round in $(seq "$ROUNDS"); do
  for case in sft rlhf; do
    for shape in student small; do
      for mode in process ranks; do
        run "$case" "$shape" "$mode" | tee -a "$LOG"
      done
    done
  done
done

python3 - "$LOG" "$THREADS" <<'EOF'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
t = sys.argv[2]
print(f"\n| case | shape | 1 process × {t} threads: tokens/s | {t} ranks × 1 thread: tokens/s | ratio | rollout s/step (1 / {t}) | update s/step (1 / {t}) | all-reduce s/step |")
print("|---|---|---|---|---|---|---|---|")
for case in ["sft", "rlhf"]:
    for shape in ["student", "small"]:
        def med(mode, f):
            return statistics.median(f(r) for r in rows if (r["case"], r["shape"], r["mode"]) == (case, shape, mode))
        tps = {m: med(m, lambda r: r["tokens"] / r["seconds"]) for m in ["process", "ranks"]}
        roll = {m: med(m, lambda r: r["rollout_s"]) for m in ["process", "ranks"]}
        upd = {m: med(m, lambda r: r["update_s"]) for m in ["process", "ranks"]}
        red = med("ranks", lambda r: r["all_reduce_s"])
        cell = lambda d: f"{d['process']:.3f} / {d['ranks']:.3f}" if case == "rlhf" else "–"
        print(f"| {case} | {shape} | {tps['process']:,.0f} | {tps['ranks']:,.0f} | {tps['ranks'] / tps['process']:.2f}x | {cell(roll)} | {cell(upd)} | {red:.4f} |")
EOF
