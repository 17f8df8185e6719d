#!/bin/bash
# InternVL3-8B-hf: HF -> MM shards (tp_size 1).
set -euo pipefail
mm-convert InternVLConverter hf_to_mm \
  --cfg.mm_dir ckpt/mm_path/InternVL3-8B-hf \
  --cfg.hf_config.hf_dir ckpt/hf_path/InternVL3-8B-hf \
  --cfg.parallel_config.llm_pp_layers [[6,8,8,6]] \
  --cfg.parallel_config.vit_pp_layers [[24,0,0,0]] \
  --cfg.parallel_config.tp_size 1
# back: mm-convert InternVLConverter mm_to_hf --cfg.mm_dir ckpt/mm_path/InternVL3-8B-hf --cfg.save_hf_dir ckpt/hf_path/InternVL3-8B-hf-back --cfg.hf_config.hf_dir ckpt/hf_path/InternVL3-8B-hf
