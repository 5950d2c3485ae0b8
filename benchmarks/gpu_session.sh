#!/usr/bin/env bash
# The GPU measurements of the training-CLI issue, in stages that each fit a 10-minute command:
#
#   bash benchmarks/gpu_session.sh tests       # the GPU-marked tests (CUDA, bf16, fused Adam, compile)
#   bash benchmarks/gpu_session.sh throughput  # benchmarks/train_throughput.py on the two paper presets
#   bash benchmarks/gpu_session.sh compare     # benchmarks/vs_score_sde.py (needs REF, see below)
#   bash benchmarks/gpu_session.sh syncs       # benchmarks/cuda_syncs.py: host syncs per step, sampler img/s
#   bash benchmarks/gpu_session.sh train       # a short CIFAR-shaped run on stand-in data, resumed, samples, bits/dim
#   bash benchmarks/gpu_session.sh all         # all five in one command of under 10 minutes (BUDGET seconds)
#   bash benchmarks/gpu_session.sh profile     # benchmarks/profile_step.py: where a step's time goes (not in all)
#
# "all" is for a lease of minutes: it builds the reference's CUDA extension and the stand-in data
# in the background while the tests run, gives each stage a time limit (a stage cut short keeps
# what it printed; training stopped by SIGTERM saves a checkpoint first) and ends inside BUDGET.
#
# Results (small text and PNG files only) go to $OUT, or ./gpu-results; bulky run folders go
# to $WORK (default /tmp/minisgm-gpu). The package is used from this checkout (PYTHONPATH), with
# the machine's own PyTorch. For "compare", REF names a score_sde_pytorch checkout (default
# .ref/score_sde_pytorch, an ignored folder a session can fill and carry). Each stage prints
# what it measured; copy the tables into the README and the CIFAR-10 chapter with the hardware line.
set -uo pipefail
stage=${1:?usage: gpu_session.sh tests|throughput|compare|syncs|train|all|profile}
out=${OUT:-gpu-results}
work=${WORK:-/tmp/minisgm-gpu}
ref=${REF:-.ref/score_sde_pytorch}
py=${PYTHON:-python3}
steps=${STEPS:-3000}            # train: optimizer steps of batch 128 (the first half, then resumed)
per_batch=${PER_BATCH:-2000}    # train: stand-in images per batch file (6 files)
sample_steps=${SAMPLE_STEPS:-1000}
mkdir -p "$out" "$work"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [ -z "${GPU_SESSION_CHILD:-}" ]; then
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } > "$out/hardware.txt" 2>&1
  cat "$out/hardware.txt"
fi

run_tests() {
  # the files that hold the gpu-marked tests (collecting the rest would need the book's packages)
  $py -m pytest -m gpu -q -p no:cacheprovider tests/test_train.py tests/test_ncsnpp.py tests/test_samplers.py \
    tests/test_guidance.py tests/test_ebm.py 2>&1 | tee "$out/gpu-tests.log"
}
run_throughput() {
  $py benchmarks/train_throughput.py --presets ${THROUGHPUT_PRESETS:-cifar10_ddpmpp_vp,cifar10_ncsnpp_ve} \
    --modes "${THROUGHPUT_MODES:-fp32,bf16,bf16+compile}" --batch-size "${BATCH:-128}" --steps "${TIMED:-20}" \
    --warmup "${WARMUP:-3}" 2>&1 | tee "$out/throughput.md"
}
run_compare() {
  [ -f "$ref/losses.py" ] || { echo "no score_sde_pytorch checkout at $ref (set REF)"; return 2; }
  $py benchmarks/vs_score_sde.py --ref "$ref" --presets ${COMPARE_PRESETS:-ddpmpp_cifar10,ncsnpp_cifar10} \
    --batch-size "${BATCH:-128}" --modes "${COMPARE_MODES:-fp32,bf16,bf16+compile}" --steps "${TIMED:-20}" \
    --warmup "${WARMUP:-3}" 2>&1 | tee "$out/vs_score_sde.md"
}
run_profile() {
  for mode in ${PROFILE_MODES:-bf16+compile bf16}; do
    $py benchmarks/profile_step.py --preset "${PROFILE_PRESET:-cifar10_ddpmpp_vp}" --mode "$mode" \
      --batch-size "${BATCH:-128}" 2>&1 | tee -a "$out/profile.md"
  done
}
run_syncs() {
  $py benchmarks/cuda_syncs.py ${SYNCS_ARGS:-} 2>&1 | tee "$out/syncs.md"
}
standin() {
  [ -f "$work/standin/cifar-10-batches-py/test_batch" ] || \
    $py benchmarks/standin_cifar10.py "$work/standin" --per-batch "$per_batch"
}
run_train() {
  rm -rf "$work/run"
  standin || return 1
  local half=$(( steps / 2 )) start
  start=$(date +%s)
  $py -m minisgm.train --preset cifar10_small --data.path "$work/standin" --run-dir "$work/run" \
    --train.n_steps "$half" --train.log_every 100 --train.ckpt_every "$half" --train.sample_every "$half" \
    --sample.n_steps "$sample_steps" --no-progress 2>&1 | tee "$out/train.log"
  echo "== resumed to $steps steps" | tee -a "$out/train.log"
  $py -m minisgm.train --resume "$work/run" --train.n_steps "$steps" --train.ckpt_every "$half" \
    --train.sample_every "$half" --no-progress 2>&1 | tee -a "$out/train.log"
  echo "training wall time: $(( $(date +%s) - start )) s" | tee -a "$out/train.log"
  $py - "$work/run" <<'PY' 2>&1 | tee -a "$out/train.log"
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = lambda name: [json.loads(l) for l in (run / name).read_text().splitlines() if l.strip()]
print("history:", [(r["event"], r["step"]) for r in rows("history.jsonl")])
loss = [(r["step"], r["loss"]) for r in rows("metrics.jsonl")]
k = max(1, len(loss) // 5)
first, last = loss[:k], loss[-k:]
print(f"mean loss, steps {first[0][0]}-{first[-1][0]}: {sum(v for _, v in first) / k:.1f}; "
      f"steps {last[0][0]}-{last[-1][0]}: {sum(v for _, v in last) / k:.1f}")
PY
  cp "$work/run/metrics.jsonl" "$work/run/history.jsonl" "$out/" 2>/dev/null
  cp "$work/run/samples/step-$(printf %07d "$steps").png" "$out/train-samples.png" 2>/dev/null \
    || cp "$(ls "$work"/run/samples/step-*.png | tail -1)" "$out/train-samples.png" 2>/dev/null
  $py -m minisgm.sample --ckpt "$work/run" --sampler pc --n 64 --steps "$sample_steps" --out "$work/samples.npz" 2>&1 | tee -a "$out/train.log"
  cp "$work/samples.png" "$out/samples-pc.png" 2>/dev/null
  $py -m minisgm.evaluate --ckpt "$work/run" --metric bpd --n "${BPD_N:-256}" --hutchinson rademacher 2>&1 | tee -a "$out/train.log"
}

case "$stage" in
  tests) run_tests ;;
  throughput) run_throughput ;;
  compare) run_compare ;;
  syncs) run_syncs ;;
  profile) run_profile ;;
  train) run_train ;;
  all)
    budget=${BUDGET:-575}
    t0=$(date +%s)
    final=$out                    # at most 8 files come back from a lease: one archive, and the stage log
    # Sized from the H200 session (benchmarks/results/h200-2026-11-30): compiling one CIFAR model
    # took 107 s, 400 training steps with two 200-step sample grids 76 s, bits/dim of 256 images 52 s.
    export OUT=$work/results GPU_SESSION_CHILD=1 COMPARE_MODES=${COMPARE_MODES:-fp32,bf16} \
      STEPS=${STEPS:-400} SAMPLE_STEPS=${SAMPLE_STEPS:-200} PER_BATCH=${PER_BATCH:-1000} \
      TIMED=${TIMED:-10} WARMUP=${WARMUP:-2} BPD_N=${BPD_N:-64}
    per_batch=$PER_BATCH  # the stand-in data is written here, in the background
    rm -rf "$OUT" && mkdir -p "$OUT" && cp "$final/hardware.txt" "$OUT/"
    # Stage limits in seconds, in the order run. A stage gets at most its limit, and never what
    # the later stages are promised (half their limits).
    declare -A limit=([tests]=${T_TESTS:-70} [throughput]=${T_THROUGHPUT:-260} [syncs]=${T_SYNCS:-45} \
                      [compare]=${T_COMPARE:-90} [train]=${T_TRAIN:-110})
    order=(tests throughput syncs compare train)
    # CPU-side work in the background while the GPU tests run: the reference's CUDA extension
    # (its op/ package compiles at import) and the stand-in data.
    ( [ -f "$ref/losses.py" ] && cd "$ref" && timeout 240 $py -c "import op" > "$OUT/ref-op-build.log" 2>&1 ) &
    bg_op=$!
    ( standin > "$OUT/standin.log" 2>&1 ) &
    bg_data=$!
    for i in "${!order[@]}"; do
      st=${order[$i]}
      [ "$st" = throughput ] && wait $bg_op $bg_data  # timings on a quiet CPU
      promised=0
      for later in "${order[@]:$((i + 1))}"; do promised=$(( promised + ${limit[$later]} / 2 )); done
      give=$(( budget - ($(date +%s) - t0) - promised ))
      (( give > ${limit[$st]} )) && give=${limit[$st]}
      if (( give < 10 )); then echo "== $st: skipped, ${give}s left" | tee -a "$final/stages.txt"; continue; fi
      echo "== $st: up to ${give}s" | tee -a "$final/stages.txt"
      s0=$(date +%s)
      timeout --signal=TERM --kill-after=10 "$give" bash "$0" "$st"
      rc=$?
      echo "== $st: exit $rc after $(( $(date +%s) - s0 ))s" | tee -a "$final/stages.txt"
    done
    echo "total: $(( $(date +%s) - t0 ))s" | tee -a "$final/stages.txt"
    tar -czf "$final/gpu-results.tar.gz" -C "$OUT" . && ls -la "$OUT"
    ;;
  *)
    echo "unknown stage $stage: choose tests, throughput, compare, syncs, train, all or profile"; exit 2
    ;;
esac
