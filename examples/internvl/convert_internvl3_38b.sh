#!/bin/bash
# InternVL3-38B-hf: HF -> MM shards (tp_size 8, vit_tp_size 1, make_vocab_size_divisible_by 128).
set -euo pipefail
mm-convert InternVLConverter hf_to_mm \
  --cfg.mm_dir ckpt/mm_path/InternVL3-38B-hf \
  --cfg.hf_config.hf_dir ckpt/hf_path/InternVL3-38B-hf \
  --cfg.parallel_config.llm_pp_layers [[32,32]] \
  --cfg.parallel_config.vit_pp_layers [[45,0]] \
  --cfg.parallel_config.tp_size 8 \
  --cfg.parallel_config.vit_tp_size 1 \
  --cfg.parallel_config.make_vocab_size_divisible_by 128
# back: mm-convert InternVLConverter mm_to_hf --cfg.mm_dir ckpt/mm_path/InternVL3-38B-hf --cfg.save_hf_dir ckpt/hf_path/InternVL3-38B-hf-back --cfg.hf_config.hf_dir ckpt/hf_path/InternVL3-38B-hf
