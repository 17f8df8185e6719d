"""End to end on a laptop CPU, in about a minute: a tiny random model of any family (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL dense or MoE), synthetic coloured images with captions, convert to MM shards, fine-tune a few dozen
steps (tp x pp ranks on gloo), save, convert the save back to HF, and generate with transformers before and after.

    python examples/tiny_finetune_example.py --workdir /tmp/tiny_ft [--family Qwen3-VL --variant moe]
        [--tp 1 --pp 2 --ep 1 --iters 80]
"""
from __future__ import annotations

import argparse
from pathlib import Path



def generate(hf_dir, image_path, prompt="What colour is this?") -> str:
    import torch

    from mm_train.check_logits import reference_class
    from mm_train.config import ModelConfig
    from mm_train.inputs import build_inputs, hf_kwargs, load_processors

    tok, ip = load_processors(hf_dir)
    inputs = build_inputs(tok, ip, ModelConfig.from_hf(hf_dir), prompt, image_path)
    model = reference_class(hf_dir).from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model.generate(**hf_kwargs(inputs), max_new_tokens=8, do_sample=False)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def main() -> None:
    a = argparse.ArgumentParser()
    a.add_argument("--workdir", default="/tmp/tiny_ft")
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--pp", type=int, default=1)
    a.add_argument("--ep", type=int, default=1, help="expert parallel size (MoE): also the data-parallel size")
    a.add_argument("--iters", type=int, default=80)
    a.add_argument("--samples", type=int, default=24)
    a.add_argument("--family", default="Qwen2.5-VL", help="Qwen2-VL, Qwen2.5-VL or Qwen3-VL")
    a.add_argument("--variant", default="", help="'moe' for the Qwen3-VL mixture-of-experts tiny model")
    args = a.parse_args()

    from mm_convert import CONVERTERS
    from mm_convert.testing import family, make_tiny_hf_checkpoint
    from mm_train.config import ModelConfig
    from mm_train.finetune import main as finetune
    from mm_train.toydata import make_caption_set

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    hf = make_tiny_hf_checkpoint(work / "hf", dtype="float32", family_name=args.family, variant=args.variant)
    data = make_caption_set(work / "data", args.samples, hf)
    cfg = ModelConfig.from_hf(hf)
    L, V = cfg.text.num_layers, cfg.vision.depth
    llm = [L] if args.pp == 1 else [L // args.pp] * (args.pp - 1) + [L - L // args.pp * (args.pp - 1)]
    vit = [V] + [0] * (args.pp - 1)
    conv = CONVERTERS[family(args.family).CONVERTER](progress=False)
    conv.hf_to_mm(hf, work / "mm", tp_size=args.tp, llm_pp_layers=llm, vit_pp_layers=vit, ep_size=args.ep,
                  overwrite=True)
    print("before:", repr(generate(hf, work / "data" / "images" / "0.png")))
    finetune(["--nproc", str(args.tp * args.pp * args.ep), "--data-config", str(data), "--load", str(work / "mm"),
              "--save", str(work / "save"), "--save-interval", str(args.iters // 2), "--train-iters", str(args.iters),
              "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3", "--lr-warmup-iters", "4",
              "--train-vit", "--log-interval", "5", "--log-tps"])
    conv.mm_to_hf(work / "save", work / "hf_finetuned", hf_dir=hf, overwrite=True)
    import json
    caption = json.loads((work / "data" / "captions.json").read_text())[0]["conversations"][1]["value"]
    print("after: ", repr(generate(work / "hf_finetuned", work / "data" / "images" / "0.png")), "| caption:", repr(caption))


if __name__ == "__main__":
    main()
