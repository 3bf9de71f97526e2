#!/usr/bin/env bash
# GPU session, part 1: train the SmolLM2 compressors of results/smollm2/grid.json (defaults of
# train.autoencoder: PCA init, stage 2 on all coders, CE + 0.01 * L1, 400 steps, batch 8) and copy them
# into results/compressors/. Run after the model was staged (see ../shared/GPU.md) and setup.sh was sourced.
set -uo pipefail
mkdir -p /root/runs results/compressors
train() {  # NAME FLAGS...
  local name=$1; shift
  if [ ! -d /root/runs/$name/compressor ]; then
    bash bench/gpu/train_smollm2.sh "$name" "$@" --save-dtype float16 2>&1 | grep -v -E "slow_operation|Constant folding|transpose|necessarily|file a bug|^$|took"
  fi
  rm -rf results/compressors/smollm2-$name && cp -r /root/runs/$name/compressor results/compressors/smollm2-$name
}
train l96 --latent 96
train k96v192-int8 --latent 96 --latent-v 192 --latent-dtype int8
train l96-int8 --latent 96 --latent-dtype int8
train k48v144 --latent 48 --latent-v 144
train id192 --latent 192
tar -cf $OUT/compressors.tar results/compressors
