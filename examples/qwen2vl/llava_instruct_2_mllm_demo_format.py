"""LLaVA-Instruct-150K -> the mllm format the trainer reads (the articles' data step), dropping samples whose image
is missing. Run from the directory holding ./data, with the articles' layout:

    ./data/COCO2017/train2017/*.jpg  ./data/llava_instruct_150k.json
    python examples/qwen2vl/llava_instruct_2_mllm_demo_format.py   # -> ./data/mllm_format_llava_instruct_data.json

Image paths are written relative to data.json's dataset_dir (./data by default: COCO2017/train2017/<file>).
The articles have you create the (empty) output file first: an empty one is filled; one with content is kept
unless --overwrite is given. The output appears whole or not at all.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def convert(items: list[dict], image_dir: Path, image_prefix: str) -> tuple[list[dict], list[str]]:
    out, missing = [], []
    for i, it in enumerate(items):
        conv = it.get("conversations")
        if not isinstance(conv, list) or not conv:
            missing.append(f"[{i}] no conversations")
            continue
        sample = {"id": it.get("id", str(i)), "conversations": [{"from": t["from"], "value": t["value"]} for t in conv]}
        if it.get("image"):
            if not (image_dir / it["image"]).is_file():
                missing.append(f"[{i}] {image_dir / it['image']}")
                continue
            sample["image"] = f"{image_prefix.rstrip('/')}/{it['image']}" if image_prefix else it["image"]
        out.append(sample)
    return out, missing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", nargs="?", default="./data/llava_instruct_150k.json")
    ap.add_argument("--image-dir", default="./data/COCO2017/train2017", help="where the images named by the input lie")
    ap.add_argument("--image-prefix", default="COCO2017/train2017",
                    help="prefix written before each image path (relative to data.json's dataset_dir)")
    ap.add_argument("-o", "--output", default="./data/mllm_format_llava_instruct_data.json")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output")
    a = ap.parse_args(argv)
    out_path = Path(a.output)
    if out_path.exists() and out_path.stat().st_size > 0 and not a.overwrite:
        print(f"{out_path} already exists and is not empty: remove it, or pass --overwrite", file=sys.stderr)
        return 2
    try:
        items = json.loads(Path(a.input).read_text())
    except (OSError, ValueError) as e:
        print(f"{a.input}: cannot read the LLaVA json ({e})", file=sys.stderr)
        return 2
    out, skipped = convert(items, Path(a.image_dir), a.image_prefix)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(out, ensure_ascii=False, indent=1))
    os.replace(tmp, out_path)
    for s in skipped[:20]:
        print(f"skipped: {s}", file=sys.stderr)
    print(f"wrote {len(out)} samples to {out_path}; skipped {len(skipped)} (missing image or conversations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
