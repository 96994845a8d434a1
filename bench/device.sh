#!/usr/bin/env bash
# The GPU check: one prepared script that builds nothing and runs in under 8 minutes on a
# machine with a GPU and a Vulkan driver.
#
#   bash bench/device.sh prepare   # on the build machine: target/device/ (two wgpu binaries,
#                                  # xz-compressed, ~45 MB, and the parity inputs)
#   bash bench/device.sh           # on the GPU machine, from the repository root, with
#                                  # target/device carried there (`run` with carry target/device)
#
# `prepare` builds `posttrain` with `--features wgpu,autotune` twice, with and without Burn's
# `fusion`, stripped, into target/device (CARGO_TARGET_DIR is honoured for the build). The run
# prints one JSON line per case:
#   parity      the fixture's logits on wgpu against transformers' (and flex's, on the host)
#   bench       `posttrain bench --backend wgpu` train / sample / rlhf-step / reward-step at tiny,
#               small and a 1.2B Gemma-2 shape (random weights), MFU against PEAK_GFLOPS
#   sft_2b_lora a Gemma-2 2B (random weights from `posttrain init`) LoRA rank 16 `sft`, 3 steps
# each once per binary (`"fusion": true|false`), the two binaries case by case. The lines also go
# to $OUT/device.jsonl and the commands' output to $OUT/device.log when OUT is set (`run` brings
# them back). PEAK_GFLOPS is the device's advertised fp32 peak (default 67,000: an H100/H200
# SXM's fp32 without tensor cores); CASES limits the cases (default "parity bench sft_2b_lora");
# BUDGET (default 450 s) bounds the whole run: a case gets at most what is left, and cases that
# find under 20 s left are reported as skipped. Kernel caches go to a temporary HOME, so every
# run is cold.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEV=target/device

if [[ "${1:-run}" == prepare ]]; then
  target="${CARGO_TARGET_DIR:-target}"
  mkdir -p "$DEV"
  for variant in fusion plain; do
    features=wgpu,autotune
    [[ $variant == fusion ]] && features=$features,fusion
    cargo build --release --features "$features" --bin posttrain
    strip -o "$DEV/posttrain-$variant" "$target/release/posttrain"
    xz -T0 -6 -f "$DEV/posttrain-$variant"
  done
  python3 - tests/fixtures/gemma2-tiny/parity.safetensors "$DEV" <<'PY'
import json, struct, sys
src, dev = sys.argv[1], sys.argv[2]
with open(src, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    head = json.loads(f.read(n))
    body = f.read()
def raw(name):
    a, b = head[name]["data_offsets"]
    return body[a:b]
ids = raw("ids_long")
header = json.dumps({"ids": {"dtype": "I64", "shape": head["ids_long"]["shape"],
                             "data_offsets": [0, len(ids)]}}).encode()
with open(f"{dev}/ids.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header + ids)
with open(f"{dev}/reference_logits.f32", "wb") as f:
    f.write(raw("long.logits"))
PY
  cp -r tests/fixtures/gemma2-tiny "$DEV/model"
  du -sh "$DEV"
  exit 0
fi

# a failed case is reported and the next one runs
set +e
PEAK_GFLOPS=${PEAK_GFLOPS:-67000}
CASES=${CASES:-parity bench sft_2b_lora}
BUDGET=${BUDGET:-450}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
results="${OUT:-$work}/device.jsonl"
log="${OUT:-$work}/device.log"
: >"$results"
: >"$log"
export HOME="$work/home" POSTTRAIN_BACKEND=wgpu
mkdir -p "$HOME"
start=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || true
nvidia_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [[ -z "${VK_DRIVER_FILES:-}" && -e $nvidia_icd && ! -e /usr/share/vulkan/icd.d/nvidia_icd.json ]]; then
  export VK_DRIVER_FILES=$nvidia_icd
fi

emit() { tee -a "$results"; }
# seconds a case may take: its own limit, or what is left of BUDGET (0: skip it)
limit() {
  local left=$((BUDGET - ($(date +%s) - start)))
  ((left < 20)) && { echo 0; return; }
  echo $((left < $1 ? left : $1))
}
skipped() { echo "{\"fusion\": $2, \"case\": \"$1\", \"skipped\": \"budget of $BUDGET s spent\"}" | emit; }

# max |a - b| of two little-endian f32 files: logits (safetensors, header skipped) and a raw file
maxdiff() {
  python3 - "$@" <<'PY'
import array, json, struct, sys
def floats(path):
    data = open(path, "rb").read()
    if path.endswith(".safetensors"):
        n = struct.unpack("<Q", data[:8])[0]
        data = data[8 + n:]
    return array.array("f", data)
a, b = floats(sys.argv[1]), floats(sys.argv[2])
assert len(a) == len(b), (len(a), len(b))
print(max(abs(x - y) for x, y in zip(a, b)))
PY
}

# a Gemma-2 config: the 2B's with LAYERS layers
config() {
  cat >"$2" <<EOF
{"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": 256000,
 "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": $1,
 "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
 "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192, "rms_norm_eps": 1e-06,
 "rope_theta": 10000.0, "attention_bias": false, "attention_dropout": 0.0,
 "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": 30.0,
 "attn_logit_softcapping": 50.0, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
 "tie_word_embeddings": true, "torch_dtype": "float32"}
EOF
}

# a binary that was not carried is left out
for variant in fusion plain; do
  [[ -e "$DEV/posttrain-$variant.xz" ]] || continue
  xz -dc "$DEV/posttrain-$variant.xz" >"$work/posttrain-$variant"
  chmod +x "$work/posttrain-$variant"
done
mkdir -p "$work/1b"
config 12 "$work/1b/config.json"

parity() { # variant fusion
  [[ -x "$work/posttrain-$1" ]] || return 0
  local bin="$work/posttrain-$1" s t0 ref flex
  s=$(limit 60)
  ((s > 0)) || { skipped parity "$2"; return; }
  t0=$(date +%s)
  if ! timeout "$s" "$bin" logits --model "$DEV/model" --ids "$DEV/ids.safetensors" \
    --out "$work/wgpu.safetensors" --overwrite >>"$log" 2>&1; then
    echo "{\"fusion\": $2, \"case\": \"parity\", \"error\": \"$(tail -1 "$log" | tr -d '"\\')\"}" | emit
    return
  fi
  "$bin" --backend flex logits --model "$DEV/model" --ids "$DEV/ids.safetensors" --out "$work/flex.safetensors" --overwrite >>"$log" 2>&1
  ref=$(maxdiff "$work/wgpu.safetensors" "$DEV/reference_logits.f32")
  flex=$(maxdiff "$work/wgpu.safetensors" "$work/flex.safetensors")
  echo "{\"fusion\": $2, \"case\": \"parity\", \"max_abs_vs_transformers\": $ref, \"max_abs_vs_flex\": $flex, \"s\": $(($(date +%s) - t0))}" | emit
}

bench() { # variant fusion name want_s args...
  [[ -x "$work/posttrain-$1" ]] || return 0
  local bin="$work/posttrain-$1" fusion=$2 name=$3 s rc
  s=$(limit "$4")
  shift 4
  ((s > 0)) || { skipped "bench $name" "$fusion"; return; }
  rc=0
  timeout "$s" "$bin" bench "$@" --peak-gflops "$PEAK_GFLOPS" --peak-gbs 4800 2>>"$log" |
    sed -u "s/^{/{\"fusion\": $fusion, /" | emit || rc=$?
  ((rc == 0)) || echo "{\"fusion\": $fusion, \"case\": \"bench $name\", \"error\": \"exit $rc after at most $s s\"}" | emit
}

sft_2b() { # variant fusion
  [[ -x "$work/posttrain-$1" ]] || return 0
  local bin="$work/posttrain-$1" s t0
  s=$(limit 200)
  ((s > 0)) || { skipped sft_2b_lora16 "$2"; return; }
  if [[ ! -d "$work/2b" ]]; then
    config 26 "$work/2b.json"
    "$bin" --backend flex init --config "$work/2b.json" --tokenizer "$DEV/model/tokenizer.json" --out "$work/2b" >>"$log" 2>&1
    for i in $(seq 16); do
      echo "{\"prompt\": \"What is $i plus $i?\", \"completion\": \"$i plus $i is $((i + i)). It is an even number, as every sum of a number with itself is.\"}"
    done >"$work/pairs.jsonl"
    s=$(limit 200)
    ((s > 0)) || { skipped sft_2b_lora16 "$2"; return; }
  fi
  t0=$(date +%s.%N)
  timeout "$s" "$bin" sft --model "$work/2b" --data "$work/pairs.jsonl" --out "$work/sft-$1" --steps 3 \
    --batch-size 4 --kd none --lora-rank 16 --base-dtype f32 --eval-every 0 --save-state-every 0 \
    --eval-samples 0 --warmup 0 >>"$log" 2>&1 || echo "sft exit $?" >>"$log"
  python3 - "$work/sft-$1/metrics.jsonl" "$t0" "$2" <<'PY' | emit
import json, sys, time
path, t0, fusion = sys.argv[1], float(sys.argv[2]), sys.argv[3]
try:
    rows = [json.loads(l) for l in open(path)]
except OSError:
    rows = []
t = [r["tokens"] / r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
steps = [round(b - a, 3) for a, b in zip([0] + t, t)]
print(json.dumps({"fusion": fusion == "true", "case": "sft_2b_lora16", "steps_s": steps,
                  "losses": [r.get("loss") for r in rows], "wall_s": round(time.time() - t0, 1)}))
PY
}

# The two binaries side by side, case by case, so that a spent budget loses the least.
if [[ " $CASES " == *" parity "* ]]; then
  parity fusion true
  parity plain false
fi
if [[ " $CASES " == *" bench "* ]]; then
  bench fusion true tiny-small 110 --shape tiny small --case train sample rlhf-step reward-step --reps 5 --warmup 2
  bench plain false tiny-small 110 --shape tiny small --case train sample rlhf-step reward-step --reps 5 --warmup 2
  bench fusion true matmul 30 --shape tiny --case matmul --reps 5 --warmup 2
  bench fusion true 1.2B 90 --model "$work/1b" --case train sample --reps 3 --warmup 1 --batch 8 --seq 256
  bench plain false 1.2B 90 --model "$work/1b" --case train sample --reps 3 --warmup 1 --batch 8 --seq 256
fi
if [[ " $CASES " == *" sft_2b_lora "* ]]; then
  sft_2b fusion true
  sft_2b plain false
fi
echo "{\"case\": \"total\", \"s\": $(($(date +%s) - start))}" | emit
