#!/usr/bin/env bash
# The peer runs of results/peers (CPU, float32, SmolLM2 GGUF, WikiText-2 test, C=512, P=384), resumable:
# finished (method, ratio) JSONs are skipped, a job in progress resumes from its .partial file.
#   nohup nice -n 10 bash results/peers/run_cpu.sh > results/peers/run_cpu.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv-peers/bin/python}
export PYTHONPATH=.
# 1) the first 8 windows, one run per job: every press at 0.5 / 0.75 / 0.875 and both quantized caches
"$PY" -m eval.peers kvpress --max-windows 8 --out results/peers/wikitext2-8win \
  --methods dense,snapkv,observed_attention,expected_attention,tova,streaming_llm,knorm,quanto-int4,quanto-int2
# 2) the full test set, one shared prefill per batch (eval.peers --shared-prefill: equal numbers), the most
#    wanted ten first, then the rest. Its first 8 windows are the slice of 1): compare the partial sums.
"$PY" -m eval.peers kvpress --out results/peers/wikitext2-full --shared-prefill --methods \
dense,snapkv@0.5,observed_attention@0.5,streaming_llm@0.5,expected_attention@0.5,\
snapkv@0.75,observed_attention@0.75,streaming_llm@0.75,expected_attention@0.75,quanto-int4
"$PY" -m eval.peers kvpress --out results/peers/wikitext2-full --shared-prefill --methods \
tova@0.5,knorm@0.5,tova@0.75,knorm@0.75,snapkv@0.875,observed_attention@0.875,expected_attention@0.875,\
tova@0.875,streaming_llm@0.875,knorm@0.875,quanto-int2
