#!/usr/bin/env bash
# The GPU machine's named steps (written in session 3, 2026-11-25; used again in sessions 4 and 5). The model travels
# in five parts (.gpu-stage/p1..p5, made by `split -b 20000000` of the GGUF into gpart_aa..ae, one per folder): each call
# carries one part plus the ~35 MB repo (and, last, the data and wheels), under the 64 MiB limit.
#   calls 1-4: carry [".gpu-stage/pN"]:  bash bench/gpu/steps.sh stageN   (N = 1..4; other steps may follow)
#   call 5: carry [".gpu-stage/p5", ".gpu-stage/data", ".whl"]: bash bench/gpu/steps.sh stage5 assemble qat report
# Outputs go to $OUT (tar files when there are many).
set -uo pipefail
export PYTHONUNBUFFERED=1
for step in "$@"; do
  case $step in
    stage[1-9]) mkdir -p /root/stage && cp .gpu-stage/p${step#stage}/* /root/stage/ && ls /root/stage ;;
    assemble) cat /root/stage/gpart_* > /root/model.gguf && sha256sum /root/model.gguf && source bench/gpu/setup.sh ;;
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
    capacity)  # issue 4: capacity in 80 GB (74.5 GiB), computed and confirmed by allocating + decoding on the device
      export PYTHONPATH=/tmp/site:$PWD
      timeout ${CAPACITY_S:-420} python3 -m eval.capacity --model smollm2-135m --dtype bfloat16 \
        --memory-gb ${CAPACITY_GIB:-74.5} --reserve-gb ${RESERVE_GB:-4} --seq-len 4096 --batch 64 --verify \
        --methods "dense:dtype=bfloat16;quantized:bits=8,dtype=bfloat16;kivi:bits=4,residual=32,dtype=bfloat16;quantized:bits=4,group=32,dtype=bfloat16${CAPACITY_EXTRA:-}" \
        --compressor results/compressors/smollm2-k96v192-int8 ${CAPACITY_COMPRESSORS:-} --json $OUT/capacity.json 2>&1 \
        | grep -v -E "slow_operation|Constant folding|bfc_allocator|caller indicates|rematerialization|fragmentation|Current allocation|^$" ;;
    aebench)  # issue 6: the model's decode step with the fused kernel (kernel=auto) vs decode-then-attend (xla)
      for k in auto xla; do
        python3 -m bench.model_bench --dtype bfloat16 --compressor results/compressors/smollm2-k96v192-int8 --kernel $k \
          --batches 16,64 --contexts 2048 --reps 5 --out $OUT/mb_ae_$k 2>&1 | grep -E "^\|" ; done
      python3 -m bench.model_bench --random-weights --method dense:layout=bskd,kernel=pallas --batches 64 --contexts 2048 \
        --reps 5 --out $OUT/mb_dense_pallas_nopad 2>&1 | grep -E "^\|"
      tar -C $OUT -cf $OUT/aebench.tar mb_ae_auto mb_ae_xla mb_dense_pallas_nopad && rm -rf $OUT/mb_* ;;
    report)  # the grid (cells already in results/smollm2/cells are skipped)
      timeout ${REPORT_S:-560} python3 -m eval.report --grid results/smollm2/grid.json --out results/smollm2 2>&1 | grep -v -E "slow_operation|Constant folding|^$" | tail -30
      tar -cf $OUT/report.tar results/smollm2/cells results/smollm2/results.* results/smollm2/*.png ;;
    continue)  # every method under the compress-then-continue protocol, full WikiText-2 test
      timeout ${REPORT_S:-560} python3 -m eval.report --grid results/smollm2/grid-continue.json --out results/smollm2/continue 2>&1 | grep -v -E "slow_operation|Constant folding|^$" | tail -30
      tar -cf $OUT/continue.tar results/smollm2/continue ;;
    reusecurve)  # issue 5: perplexity vs reused heads/layers, plain and composed with the compressor
      timeout ${REPORT_S:-560} python3 -m train.reuse curve --similarity results/smollm2/reuse/similarity/similarity.json \
        --compressor results/compressors/smollm2-k96v192-int8 --datasets wikitext2 c4 --batch 32 \
        --heads 0,3,6,9,15,30 --layers 0,1,2,3,5,8 --rank cosine --out results/smollm2/reuse/curve-full 2>&1 | grep -v -E "slow_operation|Constant folding|^$" | tail -30
      tar -cf $OUT/reuse.tar results/smollm2/reuse/curve-full ;;
    kernels1)
      export PYTHONPATH=$PWD
      python3 -m pallas_kernels.decompress_attention.bench --layers smollm2 --time-budget-s 480 --out $OUT/kernels_smollm2 2>&1 | tail -60 ;;
    kernels2)
      export PYTHONPATH=$PWD
      python3 -m pallas_kernels.decompress_attention.bench --layers llama7b --time-budget-s 480 --out $OUT/kernels_llama7b 2>&1 | tail -60 ;;
    kerneltests)  # issue 6: both kernel suites compiled on the GPU (the same cases CI interprets on CPU)
      export PYTHONPATH=$PWD
      python3 -m unittest -v pallas_kernels.decompress_attention.test_decompress_attention \
        pallas_kernels.decode_attention.test_decode_attention > $OUT/kernel_tests.log 2>&1; tail -4 $OUT/kernel_tests.log ;;
    mosaic)  # issue 6, session 6: the Mosaic GPU kernel compiled (tests), then the SmolLM2 sweep beside XLA and Triton
      export PYTHONPATH=$PWD
      python3 -m unittest -v pallas_kernels.decompress_attention.test_decompress_attention.MosaicGpuTest \
        > $OUT/mosaic_tests.log 2>&1; grep -E "^(test_|Ran|OK|FAILED)|Error" $OUT/mosaic_tests.log | head -30
      timeout ${MOSAIC_S:-300} python3 -m pallas_kernels.decompress_attention.bench --layers smollm2 \
        --methods ${MOSAIC_METHODS:-dense_xla,linear_xla_absorbed,linear_fused,linear_mosaic} --out $OUT/mosaic_bench 2>&1 \
        | grep -E "linear_mosaic|ERROR" ;;
    mosaicsweep)  # tilings of the Mosaic kernel at two SmolLM2 shapes
      export PYTHONPATH=$PWD
      timeout ${MOSAIC_S:-240} python3 -m pallas_kernels.decompress_attention.bench --sweep --methods linear_mosaic \
        --sweep-shape "${MOSAIC_SHAPES:-smollm2,128,4096;smollm2,8,4096}" --out $OUT/mosaic_sweep 2>&1 | grep -v "^$" ;;
    decodeattn)  # issue 2: kvjax's dense decode kernel (head-major cache): GPU tests, tiling sweep, vs XLA
      export PYTHONPATH=$PWD
      python3 -m unittest pallas_kernels.decode_attention.test_decode_attention 2>&1 | tail -4
      timeout ${SWEEP_S:-240} python3 -m pallas_kernels.decode_attention.bench --shapes ${DA_SHAPES:-64x2048,256x512,64x512} \
        ${DA_SWEEP---sweep} --out $OUT/decode_attention${DA_SWEEP-_sweep} 2>&1 | grep -E "^\|" ;;
    densebench)  # issue 2: the model's decode step, dense cache, XLA attention vs the Pallas kernel
      export PYTHONPATH=$PWD
      for k in ${DENSE_KERNELS:-pallas xla}; do
        python3 -m bench.model_bench --random-weights --method dense:kernel=$k --reps 5 --batches ${MB_BATCHES:-16,64,256} \
          --contexts ${MB_CONTEXTS:-512,2048} --prefill-chunk 512 --out $OUT/mb_dense_$k 2>&1 | grep -E "^\|" ; done ;;
    reusecompose)  # issues 4/5: the reuse compositions of the grid as compressor folders under runs/ (not committed)
      export PYTHONPATH=/tmp/site:$PWD
      S=results/smollm2/reuse/similarity/similarity.json; C=results/compressors/smollm2-k96v192-int8
      for L in 1 2; do python3 -m train.reuse compose --similarity $S --compressor $C --layers $L --out runs/reuse/k96v192-int8-latent-L$L 2>&1 | tail -1; done
      python3 -m train.reuse compose --similarity $S --heads 3 --out runs/reuse/plain-3heads 2>&1 | tail -1
      python3 -m train.reuse compose --similarity $S --heads 3 --dtype bfloat16 --out runs/reuse/plain-3heads-bf16 2>&1 | tail -1 ;;
    reuseft)  # issue 5: fine-tuning after reuse (CE + scaled L1, coders trained, model frozen) vs the same steps without reuse
      export PYTHONPATH=/tmp/site:$PWD
      S=results/smollm2/reuse/similarity/similarity.json; C=results/compressors/smollm2-k96v192-int8
      python3 -m train.reuse plan --similarity $S --whole-layers 1 --metric cosine --out runs/reuse/plan-L1.json
      for run in "latent-L1 --reuse-plan runs/reuse/plan-L1.json --reuse-mode latent" "control"; do
        set -- $run; name=$1; shift
        python3 -m train.autoencoder --latent 96 --latent-v 192 --latent-dtype int8 --save-dtype float16 --steps2 ${FT_STEPS:-400} \
          --init-from $C "$@" --out runs/reuse/ft-$name 2>&1 | grep -v -E "it/s\]|slow_operation" | tail -2
        for ds in wikitext2 c4; do
          python3 -m eval.perplexity --compressor runs/reuse/ft-$name/compressor --dataset $ds --batch 64 \
            --json $OUT/ft-$name-$ds.json --no-progress 2>&1 | tail -1; done; done ;;
    zsevict)  # issue 7: PIQA / Winogrande through eviction (per-row ratios) and MiniCache, context compressed first
      timeout ${REPORT_S:-560} python3 -m eval.report --grid results/smollm2/grid-zeroshot-evict.json --out results/smollm2/zeroshot-evict 2>&1 | grep -v -E "slow_operation|Constant folding|^$" | grep -E "done in|failed|cells" | tail -30
      tar -cf $OUT/zsevict.tar results/smollm2/zeroshot-evict ;;
    qat)  # issue 7: quantization-aware KV-CAR coders, trained on wiki.valid; QAT_SPECS entries dtype:group:lr2:steps
          # (int2 g48 = 8x vs bf16, int4 g32 = 4.3x), loss QAT_LOSS (ce or kl), names tagged QAT_TAG,
          # QAT_INIT: a compressor to continue from; copied to results/compressors (the grids' paths) and into $OUT/qat.tar
      export PYTHONPATH=/tmp/site:$PWD
      for spec in ${QAT_SPECS:-int2:48:1e-3:400 int4:32:1e-4:400}; do
        IFS=: read dt g lr n <<< "$spec"; name=smollm2-k96v192-$dt-g$g-qat${QAT_TAG:-}
        python3 -m train.autoencoder --latent 96 --latent-v 192 --latent-dtype $dt --latent-group $g --save-dtype float16 \
          --steps2 $n --lr2 $lr --loss ${QAT_LOSS:-ce} ${QAT_INIT:+--init-from $QAT_INIT} --no-progress --out runs/qat/$name 2>&1 | grep -E "held-back|wrote|Error"
        cp -r runs/qat/$name/compressor results/compressors/$name && cp runs/qat/$name/history.json $OUT/$name-history.json
        tar -C results/compressors -rf $OUT/qat.tar $name
      done ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
