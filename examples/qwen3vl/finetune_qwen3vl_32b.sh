#!/bin/bash
# Fine-tune Qwen3-VL-32B-Instruct on the MM checkpoint that convert_qwen3vl_32b.sh wrote (tp=8, pp=4: the layout of
# model_32b.json). TP and PP are read off the checkpoint; DP = world / (TP x PP).
set -euo pipefail
NPUS_PER_NODE=${NPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
WORLD_SIZE=$(($NPUS_PER_NODE*$NNODES))

MM_DATA="./examples/qwen3vl/data_32b.json"
MM_MODEL="./examples/qwen3vl/model_32b.json"
LOAD_PATH="ckpt/mm_path/Qwen3-VL-32B-Instruct"
SAVE_PATH="save_dir"

TP=8
PP=4
MBS=1
GRAD_ACC_STEP=${GRAD_ACC_STEP:-8}
DP=$(($WORLD_SIZE/$TP/$PP))
GBS=$(($MBS*$GRAD_ACC_STEP*$DP))

mkdir -p logs
torchrun --nproc_per_node $NPUS_PER_NODE --nnodes $NNODES --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR --master_port $MASTER_PORT -m mm_train.finetune \
    --mm-data $MM_DATA --mm-model $MM_MODEL \
    --tensor-model-parallel-size $TP --pipeline-model-parallel-size $PP \
    --micro-batch-size $MBS --global-batch-size $GBS \
    --lr 1.0e-5 --lr-decay-style cosine --lr-warmup-fraction 0.1 --min-lr 0 \
    --weight-decay 0 --clip-grad 0.0 --adam-beta1 0.9 --adam-beta2 0.999 --seed 42 \
    --train-iters 10000 --bf16 \
    --load $LOAD_PATH --no-load-optim --no-load-rng \
    --save $SAVE_PATH --save-interval 10000 \
    --log-interval 1 --log-tps \
    2>&1 | tee logs/train_$(date +%Y%m%d_%H%M%S).log
# back to HF: mm-convert Qwen3VLMegatronConverter mm_to_hf --cfg.mm_dir $SAVE_PATH --cfg.save_hf_dir ckpt/hf_path/Qwen3-VL-32B-Instruct-finetuned --cfg.hf_config.hf_dir ckpt/hf_path/Qwen3-VL-32B-Instruct
