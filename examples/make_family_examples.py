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
    "Qwen2.5-VL": {  # the articles' layouts; its jsons are written by hand (MindSpeed-MM's), only scripts here
        "3b": (1, 1, [36], [32], "Qwen2.5-VL-3B-Instruct"),
        "7b": (1, 1, [1, 10, 10, 7], [32, 0, 0, 0], "Qwen2.5-VL-7B-Instruct"),
        "32b": (2, 1, [4, 9, 9, 9, 9, 9, 9, 6], [32, 0, 0, 0, 0, 0, 0, 0], "Qwen2.5-VL-32B-Instruct"),
        "72b": (8, 1, [14, 23, 23, 20], [32, 0, 0, 0], "Qwen2.5-VL-72B-Instruct"),
    },
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
# families whose examples are the conversion scripts (the runtime's json and scripts come with its support):
# family -> size -> (file stem, HF repo name, layout values); InternVL: MindSpeed-MM's layouts where its guide has
# them (8B, 78B), with what an even split needs (the 6B tower's 25 heads on vision TP 1, the vocabulary padded)
CONVERT_ONLY = {
    "InternVL": {
        "1b": ("internvl3_1b", "InternVL3-1B-hf", dict(tp_size=1, llm_pp_layers=[[24]], vit_pp_layers=[[24]])),
        "8b": ("internvl3_8b", "InternVL3-8B-hf", dict(tp_size=1, llm_pp_layers=[[6, 8, 8, 6]], vit_pp_layers=[[24, 0, 0, 0]])),
        "38b": ("internvl3_38b", "InternVL3-38B-hf", dict(tp_size=8, vit_tp_size=1, llm_pp_layers=[[32, 32]],
                                                          vit_pp_layers=[[45, 0]], make_vocab_size_divisible_by=128)),
        "78b": ("internvl3_78b", "InternVL3-78B-hf", dict(tp_size=8, vit_tp_size=1, llm_pp_layers=[[40, 40]],
                                                          vit_pp_layers=[[45, 0]], make_vocab_size_divisible_by=128)),
        "1b_v2_5": ("internvl2_5_1b", "InternVL2_5-1B-MPO-hf", dict(tp_size=2, llm_pp_layers=[[24]], vit_pp_layers=[[24]])),
        "8b_v2_5": ("internvl2_5_8b", "InternVL2_5-8B-MPO-hf", dict(tp_size=2, llm_pp_layers=[[12, 20]], vit_pp_layers=[[24, 0]],
                                                                    make_vocab_size_divisible_by=128)),
        "38b_v2_5": ("internvl2_5_38b", "InternVL2_5-38B-MPO-hf", dict(
            tp_size=8, vit_tp_size=1, llm_pp_layers=[[16, 16, 16, 16]], vit_pp_layers=[[45, 0, 0, 0]],
            make_vocab_size_divisible_by=128)),
        "78b_v2_5": ("internvl2_5_78b", "InternVL2_5-78B-MPO-hf", dict(
            tp_size=8, vit_tp_size=1, llm_pp_layers=[[0, 3, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 5, 5, 5, 2]],
            vit_pp_layers=[[45] + [0] * 15], make_vocab_size_divisible_by=128)),
    },
}
FOLDERS = {"Qwen2.5-VL": "qwen2.5vl", "Qwen2-VL": "qwen2vl", "Qwen3-VL": "qwen3vl", "InternVL": "internvl"}
STEMS = {"Qwen2.5-VL": "qwen2_5_vl", "Qwen2-VL": "qwen2vl", "Qwen3-VL": "qwen3vl"}  # file names, as MindSpeed-MM's
HAND_WRITTEN = {"Qwen2.5-VL"}  # families whose jsons are kept as they are
CARDS_PER_NODE = 8

FINETUNE = """#!/bin/bash
# Fine-tune {repo} on the MM checkpoint that convert_{stem}.sh wrote: the structure and variable names of
# MindSpeed-MM's examples/{mm_folder}/finetune_{stem}.sh (GPT_ARGS, MM_ARGS, OUTPUT_ARGS), run by mm_train.
# Layout tp={tp}, pp={pp}{ep_text} (model_{size}.json's pipeline_num_layers; checked against LOAD_PATH at start);
# DP = WORLD_SIZE / (TP x PP){ep_dp}. Every setting can be overridden from the environment.
# Ascend: edit the toolkit path to yours (sourced where it exists)
ASCEND_SET_ENV=${{ASCEND_SET_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}}
if [ -f "$ASCEND_SET_ENV" ]; then source "$ASCEND_SET_ENV"; fi
set -eo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=1

NPUS_PER_NODE=${{NPUS_PER_NODE:-8}}
MASTER_ADDR=${{MASTER_ADDR:-localhost}}
MASTER_PORT=${{MASTER_PORT:-6000}}
NNODES=${{NNODES:-{nnodes}}}
NODE_RANK=${{NODE_RANK:-0}}
WORLD_SIZE=$(($NPUS_PER_NODE*$NNODES))

MM_DATA=${{MM_DATA:-"./examples/{folder}/data_{size}.json"}}
MM_MODEL=${{MM_MODEL:-"./examples/{folder}/model_{size}.json"}}
LOAD_PATH=${{LOAD_PATH:-"ckpt/mm_path/{repo}"}}
SAVE_PATH=${{SAVE_PATH:-"save_dir"}}

TP=${{TP:-{tp}}}
PP=${{PP:-{pp}}}
CP=1
MBS=${{MBS:-1}}
GRAD_ACC_STEP=${{GRAD_ACC_STEP:-48}}
DP=$(($WORLD_SIZE/$TP/$PP/$CP))
if [ "$DP" -lt 1 ]; then
    echo "TP x PP = $(($TP*$PP)) ranks, but NPUS_PER_NODE x NNODES = $WORLD_SIZE: set NNODES (and NODE_RANK, MASTER_ADDR on each node)" >&2
    exit 2
fi
GBS=$(($MBS*$GRAD_ACC_STEP*$DP))
TRAIN_ITERS=${{TRAIN_ITERS:-10000}}
SAVE_INTERVAL=${{SAVE_INTERVAL:-10000}}
VOCAB_SIZE=${{VOCAB_SIZE:-{vocab}}}
SEQ_LEN=${{SEQ_LEN:-1024}}

DISTRIBUTED_ARGS="
    --nproc_per_node $NPUS_PER_NODE \\
    --nnodes $NNODES \\
    --node_rank $NODE_RANK \\
    --master_addr $MASTER_ADDR \\
    --master_port $MASTER_PORT
"

# the model itself is described by model_{size}.json; training settings are here
GPT_ARGS="
    --use-mcore-models \\
    --tensor-model-parallel-size ${{TP}} \\
    --pipeline-model-parallel-size ${{PP}} \\
    --context-parallel-size ${{CP}} \\
    --context-parallel-algo ulysses_cp_algo \\
    --micro-batch-size ${{MBS}} \\
    --global-batch-size ${{GBS}} \\
    --tokenizer-type NullTokenizer \\
    --vocab-size ${{VOCAB_SIZE}} \\
    --seq-length ${{SEQ_LEN}} \\
    --make-vocab-size-divisible-by 1 \\
    --normalization RMSNorm \\
    --use-fused-rmsnorm \\
    --swiglu \\
    --use-fused-swiglu \\
    --no-masked-softmax-fusion \\
    --lr 1.0e-5 \\
    --lr-decay-style cosine \\
    --weight-decay 0 \\
    --train-iters ${{TRAIN_ITERS}} \\
    --lr-warmup-fraction 0.1 \\
    --clip-grad 0.0 \\
    --adam-beta1 0.9 \\
    --adam-beta2 0.999 \\
    --no-gradient-accumulation-fusion \\
    --seed 42 \\
    --bf16 \\
    --load $LOAD_PATH \\
    --use-flash-attn \\
    --variable-seq-lengths \\
    --use-distributed-optimizer \\
    --no-load-optim \\
    --no-load-rng \\
    --no-save-optim \\
    --no-save-rng \\
    --num-workers 8 \\
    --distributed-timeout-minutes 20
"

MM_ARGS="
    --mm-data $MM_DATA \\
    --mm-model $MM_MODEL
"

OUTPUT_ARGS="
    --log-interval 1 \\
    --save-interval ${{SAVE_INTERVAL}} \\
    --eval-interval 10000 \\
    --eval-iters 5000 \\
    --save $SAVE_PATH \\
    --ckpt-format torch \\
    --log-tps
"

logfile=train_$(date +%Y%m%d)_$(date +%H%M%S)
mkdir -p logs
torchrun $DISTRIBUTED_ARGS -m mm_train.finetune \\
    $GPT_ARGS \\
    $MM_ARGS \\
    $OUTPUT_ARGS \\
    --distributed-backend nccl \\
    2>&1 | tee logs/${{logfile}}.log
# the articles' summary from the log (the first iteration, warm-up, left out); a grep finding nothing is no error
set +o pipefail
STEP_TIME=`grep "elapsed time per iteration" logs/${{logfile}}.log | awk -F ':' '{{print$5}}' | awk -F '|' '{{print$1}}' | tail -n +2 | awk '{{sum+=$1}} END {{if (NR != 0) printf("%.1f",sum/NR)}}'`
if [ -n "$STEP_TIME" ]; then
    SAMPLES_PER_SECOND=`awk 'BEGIN{{printf "%.3f\\n", '${{GBS}}'*1000/'${{STEP_TIME}}'}}'`
    echo "Elapsed Time Per iteration: $STEP_TIME"
    echo "Average Samples per Second: $SAMPLES_PER_SECOND"
    if grep -q "tokens per sample" logs/${{logfile}}.log; then
        AVERAGE_TOKENS=`grep "tokens per sample" logs/${{logfile}}.log | awk -F 'tokens per sample:' '{{print$2}}' | awk -F '|' '{{print$1}}' | tail -n +2 | awk '{{sum+=$1}} END {{if (NR != 0) printf("%.1f",sum/NR)}}'`
        echo "Consumed Tokens per Second: `awk 'BEGIN{{printf "%.3f\\n", '${{SAMPLES_PER_SECOND}}'*'${{AVERAGE_TOKENS}}'}}'`"
    fi
fi
# back to HF: mm-convert {converter} mm_to_hf --cfg.mm_dir $SAVE_PATH --cfg.save_hf_dir ckpt/hf_path/{repo}-finetuned --cfg.hf_config.hf_dir ckpt/hf_path/{repo}
"""

INFERENCE = """#!/bin/bash
# Generate with {repo} from an MM checkpoint (converted or fine-tuned): the structure of MindSpeed-MM's
# examples/{mm_folder}/inference_{stem}.sh, run by mm_train.infer. inference_{stem}.json holds the model, the
# layout (tp={tp}, pp={pp}{ep_text}: TP x PP{ep_x} ranks), tokenizer, image and prompt; every setting can be overridden
# from the environment.
ASCEND_SET_ENV=${{ASCEND_SET_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}}
if [ -f "$ASCEND_SET_ENV" ]; then source "$ASCEND_SET_ENV"; fi
set -eo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=1

NPUS_PER_NODE=${{NPUS_PER_NODE:-{infer_npus}}}
MASTER_ADDR=${{MASTER_ADDR:-localhost}}
MASTER_PORT=${{MASTER_PORT:-6000}}
NNODES=${{NNODES:-{infer_nodes}}}
NODE_RANK=${{NODE_RANK:-0}}

MM_MODEL=${{MM_MODEL:-"./examples/{folder}/inference_{stem}.json"}}
LOAD_PATH=${{LOAD_PATH:-"ckpt/mm_path/{repo}"}}

TP=${{TP:-{tp}}}
PP=${{PP:-{pp}}}

DISTRIBUTED_ARGS="
    --nproc_per_node $NPUS_PER_NODE \\
    --nnodes $NNODES \\
    --node_rank $NODE_RANK \\
    --master_addr $MASTER_ADDR \\
    --master_port $MASTER_PORT
"

GPT_ARGS="
    --tensor-model-parallel-size ${{TP}} \\
    --pipeline-model-parallel-size ${{PP}} \\
    --load $LOAD_PATH
"

MM_ARGS="
    --mm-model $MM_MODEL
"

torchrun $DISTRIBUTED_ARGS -m mm_train.infer \\
    $GPT_ARGS \\
    $MM_ARGS
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


CONVERT_FLAGS = """#!/bin/bash
# {repo}: HF -> MM shards ({describe}).
set -euo pipefail
mm-convert {converter} hf_to_mm \\
  --cfg.mm_dir ckpt/mm_path/{repo} \\
  --cfg.hf_config.hf_dir ckpt/hf_path/{repo}{flags}
# back: mm-convert {converter} mm_to_hf --cfg.mm_dir ckpt/mm_path/{repo} --cfg.save_hf_dir ckpt/hf_path/{repo}-back --cfg.hf_config.hf_dir ckpt/hf_path/{repo}
"""


def convert_script(converter: str, repo: str, layout: dict) -> str:
    """A conversion script for ``layout`` (``--cfg.parallel_config.*`` values: layer lists nested as given)."""
    def value(v):
        return "[" + ",".join(value(x) for x in v) + "]" if isinstance(v, list) else str(v)
    order = ("llm_pp_layers", "vit_pp_layers", "tp_size", "vit_tp_size", "ep_size", "make_vocab_size_divisible_by")
    flags = "".join(f" \\\n  --cfg.parallel_config.{k} {value(layout[k])}" for k in order if k in layout)
    describe = ", ".join(f"{k} {value(layout[k])}" for k in order if k in layout and not k.endswith("layers"))
    return CONVERT_FLAGS.format(repo=repo, converter=converter, flags=flags, describe=describe)


def scripts(fam: str, size: str, converter: str, hf: dict) -> dict[str, str]:
    """finetune_<stem>.sh and inference_<stem>.sh: defaults that run the size (enough nodes of 8 cards)."""
    tp, ep, llm, vit, repo = LAYOUTS[fam][size]
    stem, ranks = f"{STEMS[fam]}_{size}", tp * len(llm) * ep
    common = dict(repo=repo, stem=stem, tp=tp, pp=len(llm), size=size, folder=FOLDERS[fam], mm_folder=FOLDERS[fam],
                  converter=converter, ep_text=f", ep={ep}" if ep > 1 else "",
                  ep_dp=f"; EP ranks are data-parallel ranks, so DP is a multiple of {ep}" if ep > 1 else "",
                  ep_x=" x EP" if ep > 1 else "")
    nodes = -(-ranks // CARDS_PER_NODE)
    vocab = hf.get("text_config", hf).get("vocab_size", hf.get("vocab_size"))
    return {f"finetune_{stem}.sh": FINETUNE.format(nnodes=nodes, vocab=vocab, **common),
            f"inference_{stem}.sh": INFERENCE.format(infer_npus=min(ranks, CARDS_PER_NODE), infer_nodes=nodes, **common)}


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
            stem = f"{STEMS[fam]}_{size}"
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
            files.update(scripts(fam, size, spec.CONVERTER, hf))
            if fam in HAND_WRITTEN:
                files = {k: v for k, v in files.items() if k.endswith(".sh")}
            for name, text in files.items():
                (folder / name).write_text(text)
            print(f"wrote examples/{FOLDERS[fam]}/*{size}*")
    for fam, sizes in CONVERT_ONLY.items():
        spec = family(fam)
        folder = ROOT / "examples" / FOLDERS[fam]
        folder.mkdir(parents=True, exist_ok=True)
        for size, (stem, repo, layout) in sizes.items():
            (folder / f"convert_{stem}.sh").write_text(convert_script(spec.CONVERTER, repo, layout))
            print(f"wrote examples/{FOLDERS[fam]}/convert_{stem}.sh")


if __name__ == "__main__":
    main()
