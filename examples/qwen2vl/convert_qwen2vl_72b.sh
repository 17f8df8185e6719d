#!/bin/bash
# Qwen2-VL-72B-Instruct: HF -> MM shards (tp=8, pp=4), then the runtime's logits against transformers'.
set -euo pipefail
mm-convert Qwen2VLConverter hf_to_mm \
  --cfg.mm_dir ckpt/mm_path/Qwen2-VL-72B-Instruct \
  --cfg.hf_config.hf_dir ckpt/hf_path/Qwen2-VL-72B-Instruct \
  --cfg.parallel_config.llm_pp_layers [14,23,23,20] \
  --cfg.parallel_config.vit_pp_layers [32,0,0,0] \
  --cfg.parallel_config.tp_size 8
# optional: mm-convert Qwen2VLConverter check_logits --cfg.mm_dir ckpt/mm_path/Qwen2-VL-72B-Instruct --cfg.hf_config.hf_dir ckpt/hf_path/Qwen2-VL-72B-Instruct
# inference: python -m mm_train.infer --config examples/qwen2vl/inference_qwen2vl_72b.json
