#!/bin/bash
# Generate with Qwen2.5-VL-3B-Instruct from an MM checkpoint (converted or fine-tuned): the structure of MindSpeed-MM's
# examples/qwen2.5vl/inference_qwen2_5_vl_3b.sh, run by mm_train.infer. inference_qwen2_5_vl_3b.json holds the model, the
# layout (tp=1, pp=1: TP x PP ranks), tokenizer, image and prompt; every setting can be overridden
# from the environment.
ASCEND_SET_ENV=${ASCEND_SET_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}
if [ -f "$ASCEND_SET_ENV" ]; then source "$ASCEND_SET_ENV"; fi
set -eo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=1

NPUS_PER_NODE=${NPUS_PER_NODE:-1}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}

MM_MODEL=${MM_MODEL:-"./examples/qwen2.5vl/inference_qwen2_5_vl_3b.json"}
LOAD_PATH=${LOAD_PATH:-"ckpt/mm_path/Qwen2.5-VL-3B-Instruct"}

TP=${TP:-1}
PP=${PP:-1}

DISTRIBUTED_ARGS="
    --nproc_per_node $NPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

GPT_ARGS="
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --load $LOAD_PATH
"

MM_ARGS="
    --mm-model $MM_MODEL
"

torchrun $DISTRIBUTED_ARGS -m mm_train.infer \
    $GPT_ARGS \
    $MM_ARGS
