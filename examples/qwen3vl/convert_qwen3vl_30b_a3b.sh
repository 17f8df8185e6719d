#!/bin/bash
# Qwen3-VL-30B-A3B-Instruct: HF -> MM shards (tp=1, ep=8, pp=1), then the runtime's logits against transformers'.
set -euo pipefail
mm-convert Qwen3VLMegatronConverter hf_to_mm \
  --cfg.mm_dir ckpt/mm_path/Qwen3-VL-30B-A3B-Instruct \
  --cfg.hf_config.hf_dir ckpt/hf_path/Qwen3-VL-30B-A3B-Instruct \
  --cfg.parallel_config.llm_pp_layers [48] \
  --cfg.parallel_config.vit_pp_layers [27] \
  --cfg.parallel_config.tp_size 1 \
  --cfg.parallel_config.ep_size 8
# optional: mm-convert Qwen3VLMegatronConverter check_logits --cfg.mm_dir ckpt/mm_path/Qwen3-VL-30B-A3B-Instruct --cfg.hf_config.hf_dir ckpt/hf_path/Qwen3-VL-30B-A3B-Instruct
# inference: python -m mm_train.infer --config examples/qwen3vl/inference_qwen3vl_30b_a3b.json
