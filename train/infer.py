"""Generate from an image and a prompt with an MM checkpoint, configured by an inference json.

    torchrun --nproc-per-node 4 -m mm_train.infer --config examples/qwen2.5vl/inference_qwen2_5_vl_7b.json
    python -m mm_train.infer --config ...   # without torchrun: starts the tp x pp ranks locally itself

The json is MindSpeed-MM's inference format: ``image_encoder`` / ``text_decoder`` describe the model (with
``pipeline_num_layers`` giving the pipeline layout), ``tokenizer.from_pretrained`` the HF directory with the
tokenizer and image processor, ``generation_config``, ``image_path`` and ``prompts``; ``load`` is the MM
checkpoint and ``tensor_model_parallel_size`` its TP size. Command-line flags override the json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mm_convert.layout import ParallelLayout

from .config import ModelConfig, mm_pipeline_layers


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mm_train.infer", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", "--mm-model", dest="config", required=True,
                   help="inference json (examples/qwen2.5vl/inference_qwen2_5_vl_*.json)")
    p.add_argument("--load", help="MM checkpoint directory (json: load)")
    p.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int,
                   help="tensor parallel size (json: tensor_model_parallel_size)")
    p.add_argument("--pipeline-model-parallel-size", dest="pp", type=int,
                   help="checked against the json's pipeline_num_layers")
    p.add_argument("--ep", type=int, help="expert parallel size of a MoE checkpoint (json: expert_model_parallel_size)")
    p.add_argument("--tokenizer", help="HF directory with tokenizer + image processor (json: tokenizer.from_pretrained)")
    p.add_argument("--image", help="image path (json: image_path); 'none' for a text-only prompt")
    p.add_argument("--prompt", help="user prompt (json: prompts)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--seed", type=int)
    p.add_argument("--output", help="also write {'ids': [...], 'text': ...} as json here (rank 0)")
    return p.parse_args(argv)


def settings(args) -> dict:
    cfg_json = json.loads(Path(args.config).read_text())
    llm, vit = mm_pipeline_layers(cfg_json)
    if args.pp is not None and args.pp != len(llm):
        from mm_convert.errors import LayoutError
        raise LayoutError(f"--pipeline-model-parallel-size {args.pp}, but {args.config}'s pipeline_num_layers "
                          f"{llm} has {len(llm)} stages")
    image = args.image if args.image is not None else cfg_json.get("image_path")
    return {
        "json": cfg_json, "model": ModelConfig.from_mm(cfg_json),
        "layout": ParallelLayout.create(args.tp or cfg_json.get("tensor_model_parallel_size", 1), llm, vit,
                                        ep_size=args.ep or cfg_json.get("expert_model_parallel_size", 1)),
        "load": args.load or cfg_json.get("load"),
        "tokenizer": args.tokenizer or (cfg_json.get("tokenizer") or {}).get("from_pretrained"),
        "image": None if image in (None, "", "none") else image,
        "prompt": args.prompt or cfg_json.get("prompts", "Describe this image."),
    }


def run(args) -> None:
    from .generate import GenerationConfig, generate
    from .inputs import build_inputs, load_processors
    from .runtime import Runtime

    s = settings(args)
    cfg_json, cfg = s["json"], s["model"]
    rt = Runtime(cfg, s["layout"], s["load"])
    tok, improc = load_processors(s["tokenizer"])
    inputs = build_inputs(tok, improc, cfg, s["prompt"], s["image"],
                          min_pixels=cfg_json.get("min_pixels"), max_pixels=cfg_json.get("max_pixels"))
    gen = GenerationConfig.from_dict(cfg_json.get("generation_config"), max_new_tokens=args.max_new_tokens,
                                     do_sample=args.do_sample, seed=args.seed)
    if not gen.eos_token_id:
        gen.eos_token_id = cfg.eos_token_ids
    ids = generate(rt, inputs, gen)
    if rt.ps.rank == 0:
        text = tok.decode(ids, skip_special_tokens=True)
        print(text, flush=True)
        if args.output:
            Path(args.output).write_text(json.dumps({"ids": ids, "text": text}))


def main(argv=None) -> None:
    from .launch import launch_local, worker_main

    args = parse_args(argv)
    if "RANK" not in os.environ:  # not under torchrun: start the ranks here
        layout = settings(args)["layout"]
        launch_local("mm_train.infer", list(sys.argv[1:] if argv is None else argv), layout.model_ranks,
                     show_rank0=True, timeout=None)
        return
    worker_main(run, args)


if __name__ == "__main__":
    main()
