#!/bin/bash
# Qwen2.5-VL-3B-Instruct: HF -> MM shards (tp=1, pp=1), then the runtime's logits against transformers'.
set -euo pipefail
mm-convert Qwen2_5_VLConverter hf_to_mm \
  --cfg.mm_dir ckpt/mm_path/Qwen2.5-VL-3B-Instruct \
  --cfg.hf_config.hf_dir ckpt/hf_path/Qwen2.5-VL-3B-Instruct \
  --cfg.parallel_config.llm_pp_layers [36] \
  --cfg.parallel_config.vit_pp_layers [32] \
  --cfg.parallel_config.tp_size 1
# optional: mm-convert Qwen2_5_VLConverter check_logits --cfg.mm_dir ckpt/mm_path/Qwen2.5-VL-3B-Instruct --cfg.hf_config.hf_dir ckpt/hf_path/Qwen2.5-VL-3B-Instruct
# inference: python -m mm_train.infer --config examples/qwen2.5vl/inference_qwen2_5_vl_3b.json
