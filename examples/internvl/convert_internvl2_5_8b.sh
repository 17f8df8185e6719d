#!/bin/bash
# InternVL2_5-8B-MPO-hf: HF -> MM shards (tp_size 2, make_vocab_size_divisible_by 128).
set -euo pipefail
mm-convert InternVLConverter hf_to_mm \
  --cfg.mm_dir ckpt/mm_path/InternVL2_5-8B-MPO-hf \
  --cfg.hf_config.hf_dir ckpt/hf_path/InternVL2_5-8B-MPO-hf \
  --cfg.parallel_config.llm_pp_layers [[12,20]] \
  --cfg.parallel_config.vit_pp_layers [[24,0]] \
  --cfg.parallel_config.tp_size 2 \
  --cfg.parallel_config.make_vocab_size_divisible_by 128
# back: mm-convert InternVLConverter mm_to_hf --cfg.mm_dir ckpt/mm_path/InternVL2_5-8B-MPO-hf --cfg.save_hf_dir ckpt/hf_path/InternVL2_5-8B-MPO-hf-back --cfg.hf_config.hf_dir ckpt/hf_path/InternVL2_5-8B-MPO-hf
