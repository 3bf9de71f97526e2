#!/usr/bin/env bash
# Trains SmolLM2 KV-CAR compressors on the GPU machine: bash bench/gpu/train_smollm2.sh NAME [train flags...]
# Resumable (--resume on a run directory that has checkpoints); the compressor is tarred into $OUT.
set -uo pipefail
name=$1; shift
run=/root/runs/$name
resume=""; [ -d "$run/ckpt" ] && resume="--resume"
start=$(date +%s)
python3 -m train.autoencoder --out "$run" --no-progress $resume "$@" 2>&1 | grep -v -i warn | tee -a /root/runs/$name.log | tail -n 25
echo "[$name] wall $(( $(date +%s) - start )) s"
if [ -d "$run/compressor" ]; then tar -C "$run" -cf "$OUT/$name.tar" compressor history.json; fi
