#!/bin/bash
# Qwen3-VL-235B-A22B-Instruct: HF -> MM shards (tp=4, ep=4, pp=4), then the runtime's logits against transformers'.
set -euo pipefail
mm-convert Qwen3VLMegatronConverter hf_to_mm \
  --cfg.mm_dir ckpt/mm_path/Qwen3-VL-235B-A22B-Instruct \
  --cfg.hf_config.hf_dir ckpt/hf_path/Qwen3-VL-235B-A22B-Instruct \
  --cfg.parallel_config.llm_pp_layers [18,25,25,26] \
  --cfg.parallel_config.vit_pp_layers [27,0,0,0] \
  --cfg.parallel_config.tp_size 4 \
  --cfg.parallel_config.ep_size 4
# optional: mm-convert Qwen3VLMegatronConverter check_logits --cfg.mm_dir ckpt/mm_path/Qwen3-VL-235B-A22B-Instruct --cfg.hf_config.hf_dir ckpt/hf_path/Qwen3-VL-235B-A22B-Instruct
# inference: python -m mm_train.infer --config examples/qwen3vl/inference_qwen3vl_235b_a22b.json
