#!/bin/bash
# Fine-tune Qwen2.5-VL-72B-Instruct on the MM checkpoint that convert_qwen2_5_vl_72b.sh wrote: the structure and variable names of
# MindSpeed-MM's examples/qwen2.5vl/finetune_qwen2_5_vl_72b.sh (GPT_ARGS, MM_ARGS, OUTPUT_ARGS), run by mm_train.
# Layout tp=8, pp=4 (model_72b.json's pipeline_num_layers; checked against LOAD_PATH at start);
# DP = WORLD_SIZE / (TP x PP). Every setting can be overridden from the environment.
# Ascend: edit the toolkit path to yours (sourced where it exists)
ASCEND_SET_ENV=${ASCEND_SET_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}
if [ -f "$ASCEND_SET_ENV" ]; then source "$ASCEND_SET_ENV"; fi
set -eo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=1

NPUS_PER_NODE=${NPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-4}
NODE_RANK=${NODE_RANK:-0}
WORLD_SIZE=$(($NPUS_PER_NODE*$NNODES))

MM_DATA=${MM_DATA:-"./examples/qwen2.5vl/data_72b.json"}
MM_MODEL=${MM_MODEL:-"./examples/qwen2.5vl/model_72b.json"}
LOAD_PATH=${LOAD_PATH:-"ckpt/mm_path/Qwen2.5-VL-72B-Instruct"}
SAVE_PATH=${SAVE_PATH:-"save_dir"}

TP=${TP:-8}
PP=${PP:-4}
CP=1
MBS=${MBS:-1}
GRAD_ACC_STEP=${GRAD_ACC_STEP:-48}
DP=$(($WORLD_SIZE/$TP/$PP/$CP))
if [ "$DP" -lt 1 ]; then
    echo "TP x PP = $(($TP*$PP)) ranks, but NPUS_PER_NODE x NNODES = $WORLD_SIZE: set NNODES (and NODE_RANK, MASTER_ADDR on each node)" >&2
    exit 2
fi
GBS=$(($MBS*$GRAD_ACC_STEP*$DP))
TRAIN_ITERS=${TRAIN_ITERS:-10000}
SAVE_INTERVAL=${SAVE_INTERVAL:-10000}
VOCAB_SIZE=${VOCAB_SIZE:-152064}
SEQ_LEN=${SEQ_LEN:-1024}

DISTRIBUTED_ARGS="
    --nproc_per_node $NPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

# the model itself is described by model_72b.json; training settings are here
GPT_ARGS="
    --use-mcore-models \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --context-parallel-size ${CP} \
    --context-parallel-algo ulysses_cp_algo \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --tokenizer-type NullTokenizer \
    --vocab-size ${VOCAB_SIZE} \
    --seq-length ${SEQ_LEN} \
    --make-vocab-size-divisible-by 1 \
    --normalization RMSNorm \
    --use-fused-rmsnorm \
    --swiglu \
    --use-fused-swiglu \
    --no-masked-softmax-fusion \
    --lr 1.0e-5 \
    --lr-decay-style cosine \
    --weight-decay 0 \
    --train-iters ${TRAIN_ITERS} \
    --lr-warmup-fraction 0.1 \
    --clip-grad 0.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.999 \
    --no-gradient-accumulation-fusion \
    --seed 42 \
    --bf16 \
    --load $LOAD_PATH \
    --use-flash-attn \
    --variable-seq-lengths \
    --use-distributed-optimizer \
    --no-load-optim \
    --no-load-rng \
    --no-save-optim \
    --no-save-rng \
    --num-workers 8 \
    --distributed-timeout-minutes 20
"

MM_ARGS="
    --mm-data $MM_DATA \
    --mm-model $MM_MODEL
"

OUTPUT_ARGS="
    --log-interval 1 \
    --save-interval ${SAVE_INTERVAL} \
    --eval-interval 10000 \
    --eval-iters 5000 \
    --save $SAVE_PATH \
    --ckpt-format torch \
    --log-tps
"

logfile=train_$(date +%Y%m%d)_$(date +%H%M%S)
mkdir -p logs
torchrun $DISTRIBUTED_ARGS -m mm_train.finetune \
    $GPT_ARGS \
    $MM_ARGS \
    $OUTPUT_ARGS \
    --distributed-backend nccl \
    2>&1 | tee logs/${logfile}.log
# the articles' summary from the log (the first iteration, warm-up, left out); a grep finding nothing is no error
set +o pipefail
STEP_TIME=`grep "elapsed time per iteration" logs/${logfile}.log | awk -F ':' '{print$5}' | awk -F '|' '{print$1}' | tail -n +2 | awk '{sum+=$1} END {if (NR != 0) printf("%.1f",sum/NR)}'`
if [ -n "$STEP_TIME" ]; then
    SAMPLES_PER_SECOND=`awk 'BEGIN{printf "%.3f\n", '${GBS}'*1000/'${STEP_TIME}'}'`
    echo "Elapsed Time Per iteration: $STEP_TIME"
    echo "Average Samples per Second: $SAMPLES_PER_SECOND"
    if grep -q "tokens per sample" logs/${logfile}.log; then
        AVERAGE_TOKENS=`grep "tokens per sample" logs/${logfile}.log | awk -F 'tokens per sample:' '{print$2}' | awk -F '|' '{print$1}' | tail -n +2 | awk '{sum+=$1} END {if (NR != 0) printf("%.1f",sum/NR)}'`
        echo "Consumed Tokens per Second: `awk 'BEGIN{printf "%.3f\n", '${SAMPLES_PER_SECOND}'*'${AVERAGE_TOKENS}'}'`"
    fi
fi
# back to HF: mm-convert Qwen2_5_VLConverter mm_to_hf --cfg.mm_dir $SAVE_PATH --cfg.save_hf_dir ckpt/hf_path/Qwen2.5-VL-72B-Instruct-finetuned --cfg.hf_config.hf_dir ckpt/hf_path/Qwen2.5-VL-72B-Instruct
