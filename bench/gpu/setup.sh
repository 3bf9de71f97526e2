#!/usr/bin/env bash
# Source on the GPU machine (repo root as cwd), after the model was staged to /root/model.gguf:
# installs the carried pure-Python wheels and points kvjax at the model and the data.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
if [ -d .gpu-stage/data ]; then mkdir -p /root/data && cp -r .gpu-stage/data/* /root/data/; fi
export KVJAX_DATA_DIR=/root/data
export KVJAX_SMOLLM2_135M_PATH=/root/model.gguf
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
