"""Write the per-size example files of the families beyond Qwen2.5-VL from their bundled published configs:
convert (hf_to_mm), inference json, model json, data json and a fine-tuning script per size, in the shape of
examples/qwen2.5vl. Rerun after changing a layout below:  python examples/make_family_examples.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# family -> size -> (tp, ep, llm_pp_layers, vit_pp_layers, HF repo name); layouts whose sizes divide evenly
LAYOUTS = {
    "Qwen2-VL": {
        "2b": (1, 1, [28], [32], "Qwen2-VL-2B-Instruct"),
        "7b": (1, 1, [1, 10, 10, 7], [32, 0, 0, 0], "Qwen2-VL-7B-Instruct"),
        "72b": (8, 1, [14, 23, 23, 20], [32, 0, 0, 0], "Qwen2-VL-72B-Instruct"),
    },
    "Qwen3-VL": {
        "2b": (1, 1, [28], [24], "Qwen3-VL-2B-Instruct"),
        "8b": (1, 1, [6, 10, 10, 10], [27, 0, 0, 0], "Qwen3-VL-8B-Instruct"),
        "32b": (8, 1, [10, 18, 18, 18], [27, 0, 0, 0], "Qwen3-VL-32B-Instruct"),
        "30b_a3b": (1, 8, [48], [27], "Qwen3-VL-30B-A3B-Instruct"),
        "235b_a22b": (4, 4, [18, 25, 25, 26], [27, 0, 0, 0], "Qwen3-VL-235B-A22B-Instruct"),
    },
}
FOLDERS = {"Qwen2-VL": "qwen2vl", "Qwen3-VL": "qwen3vl"}

FINETUNE = """#!/bin/bash
# Fine-tune {repo} on the MM checkpoint that convert_{stem}.sh wrote (tp={tp}, pp={pp}: the layout of
# model_{size}.json). TP and PP are read off the checkpoint; DP = world / (TP x PP).{moe_note}
set -euo pipefail
NPUS_PER_NODE=${{NPUS_PER_NODE:-8}}
NNODES=${{NNODES:-1}}
NODE_RANK=${{NODE_RANK:-0}}
MASTER_ADDR=${{MASTER_ADDR:-localhost}}
MASTER_PORT=${{MASTER_PORT:-6000}}
WORLD_SIZE=$(($NPUS_PER_NODE*$NNODES))

MM_DATA="./examples/{folder}/data_{size}.json"
MM_MODEL="./examples/{folder}/model_{size}.json"
LOAD_PATH="ckpt/mm_path/{repo}"
SAVE_PATH="save_dir"

TP={tp}
PP={pp}
MBS=1
GRAD_ACC_STEP=${{GRAD_ACC_STEP:-8}}
DP=$(($WORLD_SIZE/$TP/$PP))
GBS=$(($MBS*$GRAD_ACC_STEP*$DP))

mkdir -p logs
torchrun --nproc_per_node $NPUS_PER_NODE --nnodes $NNODES --node_rank $NODE_RANK \\
    --master_addr $MASTER_ADDR --master_port $MASTER_PORT -m mm_train.finetune \\
    --mm-data $MM_DATA --mm-model $MM_MODEL \\
    --tensor-model-parallel-size $TP --pipeline-model-parallel-size $PP \\
    --micro-batch-size $MBS --global-batch-size $GBS \\
    --lr 1.0e-5 --lr-decay-style cosine --lr-warmup-fraction 0.1 --min-lr 0 \\
    --weight-decay 0 --clip-grad 0.0 --adam-beta1 0.9 --adam-beta2 0.999 --seed 42 \\
    --train-iters 10000 --bf16 \\
    --load $LOAD_PATH --no-load-optim --no-load-rng \\
    --save $SAVE_PATH --save-interval 10000 \\
    --log-interval 1 --log-tps \\
    2>&1 | tee logs/train_$(date +%Y%m%d_%H%M%S).log
# back to HF: mm-convert {converter} mm_to_hf --cfg.mm_dir $SAVE_PATH --cfg.save_hf_dir ckpt/hf_path/{repo}-finetuned --cfg.hf_config.hf_dir ckpt/hf_path/{repo}
"""

CONVERT = """#!/bin/bash
# {repo}: HF -> MM shards (tp={tp}{ep_text}, pp={pp}), then the runtime's logits against transformers'.
set -euo pipefail
mm-convert {converter} hf_to_mm \\
  --cfg.mm_dir ckpt/mm_path/{repo} \\
  --cfg.hf_config.hf_dir ckpt/hf_path/{repo} \\
  --cfg.parallel_config.llm_pp_layers [{llm}] \\
  --cfg.parallel_config.vit_pp_layers [{vit}] \\
  --cfg.parallel_config.tp_size {tp}{ep_flag}
# optional: mm-convert {converter} check_logits --cfg.mm_dir ckpt/mm_path/{repo} --cfg.hf_config.hf_dir ckpt/hf_path/{repo}
# inference: python -m mm_train.infer --config examples/{folder}/inference_{stem}.json
"""


def main() -> None:
    from mm_convert.testing import family, published_config_path
    from mm_train.config import to_mm

    for fam, sizes in LAYOUTS.items():
        spec = family(fam)
        folder = ROOT / "examples" / FOLDERS[fam]
        folder.mkdir(parents=True, exist_ok=True)
        for size, (tp, ep, llm, vit, repo) in sizes.items():
            hf = json.loads(published_config_path(size, fam).read_text())
            cfg = spec.config_from_hf(hf, size)
            stem = f"{FOLDERS[fam]}_{size}"
            block = to_mm(cfg, llm, vit)
            gen_ids = hf.get("text_config", hf)
            infer = {**block, "load": f"ckpt/mm_path/{repo}", "tensor_model_parallel_size": tp,
                     **({"expert_model_parallel_size": ep} if ep > 1 else {}),
                     "tokenizer": {"hub_backend": "hf", "autotokenizer_name": "AutoProcessor",
                                   "from_pretrained": f"ckpt/hf_path/{repo}"},
                     "generation_config": {"do_sample": False, "kv_cache": True, "max_new_tokens": 256,
                                           "repetition_penalty": 1.05, "seed": 1234,
                                           "eos_token_id": [gen_ids.get("eos_token_id", 151645), 151643]},
                     "image_path": "./demo.jpeg", "prompts": "Describe this image and keep it within 100 words."}
            model = json.loads(json.dumps(block))
            model["image_encoder"]["vision_encoder"].update(freeze=True, recompute_granularity="full",
                                                            recompute_method="uniform", recompute_num_layers=1)
            model["image_encoder"]["vision_projector"]["freeze"] = False
            model["text_decoder"]["freeze"] = False
            model.update(loss_type="token_level", variable_seq_lengths=True)
            data = json.loads((ROOT / "examples/qwen2.5vl/data_7b.json").read_text())
            data["dataset_param"]["preprocess_parameters"]["model_name_or_path"] = f"./ckpt/hf_path/{repo}"
            files = {f"inference_{stem}.json": json.dumps(infer, indent=4) + "\n",
                     f"model_{size}.json": json.dumps(model, indent=4) + "\n",
                     f"data_{size}.json": json.dumps(data, indent=4) + "\n",
                     f"convert_{stem}.sh": CONVERT.format(
                         repo=repo, tp=tp, pp=len(llm), llm=",".join(map(str, llm)), vit=",".join(map(str, vit)),
                         converter=spec.CONVERTER, folder=FOLDERS[fam], stem=stem,
                         ep_text=f", ep={ep}" if ep > 1 else "",
                         ep_flag=f" \\\n  --cfg.parallel_config.ep_size {ep}" if ep > 1 else "")}
            moe_note = (f"\n# Expert parallel: the checkpoint's ep_size {ep} is read off its shards too; EP ranks are data-parallel\n"
                        f"# ranks, so DP must be a multiple of {ep} (world = TP x PP x DP).") if ep > 1 else ""
            files[f"finetune_{stem}.sh"] = FINETUNE.format(repo=repo, stem=stem, tp=tp, pp=len(llm), size=size,
                                                          folder=FOLDERS[fam], converter=spec.CONVERTER, moe_note=moe_note)
            for name, text in files.items():
                (folder / name).write_text(text)
            print(f"wrote examples/{FOLDERS[fam]}/*{size}*")


if __name__ == "__main__":
    main()
