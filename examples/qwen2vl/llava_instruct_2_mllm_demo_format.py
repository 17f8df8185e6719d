"""Turn LLaVA-Instruct-style JSON into the mllm format the trainer reads, dropping samples whose image is missing.

    python examples/qwen2.5vl/llava_to_mllm.py llava_instruct_150k.json --image-dir data/COCO2017/train2017 \
        --image-prefix COCO2017/train2017 -o data/mllm_format_llava_instruct_data.json
"""
from __future__ import annotations

import argparse
import json
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
    ap.add_argument("input")
    ap.add_argument("--image-dir", required=True, help="where the images named by the input lie")
    ap.add_argument("--image-prefix", default="", help="prefix written before each image path (relative to dataset_dir)")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args(argv)
    items = json.loads(Path(a.input).read_text())
    out, skipped = convert(items, Path(a.image_dir), a.image_prefix)
    Path(a.output).write_text(json.dumps(out, ensure_ascii=False, indent=1))
    for s in skipped[:20]:
        print(f"skipped: {s}", file=sys.stderr)
    print(f"wrote {len(out)} samples to {a.output}; skipped {len(skipped)} (missing image or conversations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
