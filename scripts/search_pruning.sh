#!/usr/bin/env bash
# The same seeded search with pruning off and on (a benchmark, not a test):
# ResNet-20 on real CIFAR-10, lr and weight decay, 12 trials of 4 epochs each, on
# TRAIN training images with VAL more held out (10000 and 5000 by default).
#   [TRAIN=1280 VAL=1000] scripts/search_pruning.sh DATA_ROOT OUT_DIR [extra overrides...]
# Prints, per pruner: trials completed, pruned, best validation error, wall time.
set -euo pipefail
DATA=${1:?CIFAR-10 root (train/ and test/ class folders)}
OUT=${2:?output directory}
shift 2
RESNET_EXP=${RESNET_EXP:-resnet-exp}
JOB=(dataset=cifar10 "data.root=$DATA" data.download=false depth=20
     "data.train_limit=${TRAIN:-10000}" "data.val_size=${VAL:-5000}" data.test_limit=1000
     trainer.epochs=4 trainer.progress=false
     hydra/sweeper=search hydra.sweeper.n_trials=12 hydra.sweeper.sampler.seed=0 "$@")
mkdir -p "$OUT"
# Decode the images into the cache once, so that neither search pays for it.
"$RESNET_EXP" "${JOB[@]:0:7}" trainer.max_steps=1 trainer.device=cpu "hydra.run.dir=$OUT/warmup" >/dev/null
for pruner in none halving; do
  start=$(date +%s.%N)
  "$RESNET_EXP" -m "${JOB[@]}" hydra.sweeper.pruner=$pruner "hydra.sweep.dir=$OUT/$pruner" \
    >"$OUT/$pruner.log" 2>&1 || echo "search with pruner=$pruner exited $?"
  end=$(date +%s.%N)
  echo "$pruner wall_s=$(echo "$end - $start" | bc)" | tee -a "$OUT/times.txt"
  cat "$OUT/$pruner/optimization_results.yaml"
done
