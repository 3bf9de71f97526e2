#!/usr/bin/env bash
# GPU session 3 (2026-11-25). The model travels in three parts (.gpu-stage/p1..p3, made by
# `split -b 33000000` of the GGUF: each call carries one part plus the ~20 MB repo, under the 64 MiB limit).
#   call 1: carry [".gpu-stage/p1"]:  bash bench/gpu/session3.sh stage1 profile
#   call 2: carry [".gpu-stage/p2"]:  bash bench/gpu/session3.sh stage2 kernels1
#   call 3: carry [".gpu-stage/p3", ".gpu-stage/data", ".whl"]: bash bench/gpu/session3.sh stage3 model
# Outputs go to $OUT (tar files when there are many).
set -uo pipefail
export PYTHONUNBUFFERED=1
for step in "$@"; do
  case $step in
    stage1) mkdir -p /root/stage && cp .gpu-stage/p1/* /root/stage/ ;;
    stage2) cp .gpu-stage/p2/* /root/stage/ ;;
    stage3) cp .gpu-stage/p3/* /root/stage/ && cat /root/stage/gpart_aa /root/stage/gpart_ab /root/stage/gpart_ac > /root/model.gguf \
              && sha256sum /root/model.gguf && source bench/gpu/setup.sh ;;
    setup) source bench/gpu/setup.sh ;;
    profile)
      export PYTHONPATH=$PWD
      python3 -m bench.decode_profile --trace --out $OUT/profile 2>&1 | grep -v -E "slow_operation|Constant folding|^$"
      tar -C $OUT -cf $OUT/profile.tar profile && rm -rf $OUT/profile ;;
    bench)  # decode speed of the dense cache variants (random weights: speed does not depend on values)
      export PYTHONPATH=$PWD
      for m in "dense:layout=bksd" "dense:layout=bskd" "dense:layout=bskd,kernel=pallas"; do
        d=$OUT/mb_$(echo $m | tr ':=,' '___')
        python3 -m bench.model_bench --random-weights --method $m --reps 5 --out $d 2>&1 | grep -E "^\|" ; done
      tar -C $OUT -cf $OUT/model_bench.tar $(cd $OUT && ls -d mb_*) && rm -rf $OUT/mb_* ;;
    kernels1)
      export PYTHONPATH=$PWD
      python3 -m pallas_kernels.decompress_attention.bench --layers smollm2 --time-budget-s 480 --out $OUT/kernels_smollm2 2>&1 | tail -60 ;;
    kernels2)
      export PYTHONPATH=$PWD
      python3 -m pallas_kernels.decompress_attention.bench --layers llama7b --time-budget-s 480 --out $OUT/kernels_llama7b 2>&1 | tail -60 ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
