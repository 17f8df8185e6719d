#!/bin/bash
# Fine-tune Qwen2.5-VL-3B on the MM checkpoint that mm-convert hf_to_mm wrote (tp=1, pp=1: the layout of
# model_3b.json). TP and PP are read off the checkpoint; DP = world / (TP x PP).
set -euo pipefail
NPUS_PER_NODE=${NPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
WORLD_3B=$(($NPUS_PER_NODE*$NNODES))

MM_DATA="./examples/qwen2.5vl/data_3b.json"
MM_MODEL="./examples/qwen2.5vl/model_3b.json"
LOAD_PATH="ckpt/mm_path/Qwen2.5-VL-3B-Instruct"
SAVE_PATH="save_dir"

TP=1
PP=1
MBS=1
GRAD_ACC_STEP=${GRAD_ACC_STEP:-8}
DP=$(($WORLD_3B/$TP/$PP))
GBS=$(($MBS*$GRAD_ACC_STEP*$DP))

mkdir -p logs
logfile=logs/train_$(date +%Y%m%d_%H%M%S).log
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
    2>&1 | tee $logfile
# back to HF: mm-convert Qwen2_5_VLConverter mm_to_hf --cfg.mm_dir $SAVE_PATH --cfg.save_hf_dir ckpt/hf_path/Qwen2.5-VL-3B-finetuned --cfg.hf_config.hf_dir ckpt/hf_path/Qwen2.5-VL-3B-Instruct
STEP_TIME=`grep "elapsed time per iteration" $logfile | awk -F ':' '{print$5}' | awk -F '|' '{print$1}' | tail -n +2 | awk '{sum+=$1} END {if (NR != 0) printf("%.1f",sum/NR)}'`
echo "Elapsed Time Per iteration: $STEP_TIME"
echo "Average Samples per Second: `awk 'BEGIN{printf "%.3f\n", '${GBS}'*1000/'${STEP_TIME}'}'`"
