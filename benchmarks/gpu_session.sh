#!/usr/bin/env bash
# The GPU measurements of the training-CLI issue, in stages that each fit a 10-minute command:
#
#   bash benchmarks/gpu_session.sh tests       # the GPU-marked tests (CUDA, bf16, fused Adam, compile)
#   bash benchmarks/gpu_session.sh throughput  # benchmarks/train_throughput.py on the two paper presets
#   bash benchmarks/gpu_session.sh compare     # benchmarks/vs_score_sde.py (needs REF, see below)
#   bash benchmarks/gpu_session.sh train       # a short CIFAR-shaped run on stand-in data, samples, bits/dim
#
# Results (small text and PNG files only) go to $OUT, or ./gpu-results; bulky run folders go
# to $WORK (default /tmp/minisgm-gpu). The package is used from this checkout (PYTHONPATH), with
# the machine's own PyTorch. For "compare", REF names a score_sde_pytorch checkout (default
# .ref/score_sde_pytorch, an ignored folder a session can fill and carry). Each stage prints
# what it measured; copy the tables into the README and the CIFAR-10 chapter with the hardware line.
set -uo pipefail
stage=${1:?usage: gpu_session.sh tests|throughput|compare|train}
out=${OUT:-gpu-results}
work=${WORK:-/tmp/minisgm-gpu}
ref=${REF:-.ref/score_sde_pytorch}
py=${PYTHON:-python3}
steps=${STEPS:-3000}            # train: optimizer steps of batch 128
per_batch=${PER_BATCH:-2000}    # train: stand-in images per batch file (6 files)
sample_steps=${SAMPLE_STEPS:-1000}
mkdir -p "$out" "$work"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } > "$out/hardware.txt" 2>&1
cat "$out/hardware.txt"

case "$stage" in
  tests)
    $py -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$out/gpu-tests.log"
    ;;
  throughput)
    $py benchmarks/train_throughput.py --presets cifar10_ddpmpp_vp,cifar10_ncsnpp_ve --steps 20 --warmup 3 2>&1 \
      | tee "$out/throughput.md"
    ;;
  compare)
    [ -f "$ref/losses.py" ] || { echo "no score_sde_pytorch checkout at $ref (set REF)"; exit 2; }
    $py benchmarks/vs_score_sde.py --ref "$ref" --presets ddpmpp_cifar10,ncsnpp_cifar10 --steps 20 --warmup 3 2>&1 \
      | tee "$out/vs_score_sde.md"
    ;;
  train)
    rm -rf "$work/run"
    $py benchmarks/standin_cifar10.py "$work/standin" --per-batch "$per_batch" || exit 1
    start=$(date +%s)
    $py -m minisgm.train --preset cifar10_small --data.path "$work/standin" --run-dir "$work/run" \
      --train.n_steps "$steps" --train.log_every 100 --train.ckpt_every 1000 --train.sample_every "$steps" \
      --sample.n_steps "$sample_steps" --no-progress 2>&1 | tee "$out/train.log"
    echo "training wall time: $(( $(date +%s) - start )) s" | tee -a "$out/train.log"
    cp "$work/run/metrics.jsonl" "$out/" 2>/dev/null
    cp "$work"/run/samples/step-*.png "$out/" 2>/dev/null
    $py -m minisgm.sample --ckpt "$work/run" --sampler pc --n 64 --steps "$sample_steps" --out "$work/samples.npz" 2>&1 | tee -a "$out/train.log"
    cp "$work/samples.png" "$out/samples-pc.png" 2>/dev/null
    $py -m minisgm.evaluate --ckpt "$work/run" --metric bpd --n 256 --hutchinson rademacher 2>&1 | tee -a "$out/train.log"
    ;;
  *)
    echo "unknown stage $stage: choose tests, throughput, compare or train"; exit 2
    ;;
esac
