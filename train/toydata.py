"""A synthetic image-caption set for smoke tests and the laptop example: solid-colour images of a few sizes
(so sequence lengths vary) with a caption naming the colour, in the mllm format, plus its data.json."""
from __future__ import annotations

import json
import random
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40),
           "black": (10, 10, 10), "white": (245, 245, 245)}
SIZES = [(56, 56), (84, 56), (112, 84)]


def make_caption_set(root, n: int, model_dir, seed: int = 0, sampler: str = "BucketBatchSampler") -> Path:
    """Writes root/images/*.png, root/captions.json (mllm) and root/data.json; returns the data.json path."""
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    items = []
    for i in range(n):
        name = rng.choice(sorted(COLOURS))
        w, h = rng.choice(SIZES)
        Image.new("RGB", (w, h), COLOURS[name]).save(root / "images" / f"{i}.png")
        items.append({"id": str(i), "image": f"images/{i}.png",
                      "conversations": [{"from": "human", "value": "<image>\nWhat colour is this?"},
                                        {"from": "gpt", "value": f"It is {name}."}]})
    (root / "captions.json").write_text(json.dumps(items, indent=1))
    doc = {"dataset_param": {"dataset_type": "huggingface",
                             "preprocess_parameters": {"model_name_or_path": str(model_dir)},
                             "basic_parameters": {"dataset_dir": str(root), "dataset": str(root / "captions.json"),
                                                  "cache_dir": str(root / "cache")}},
           "dataloader_param": {"sampler_type": sampler, "shuffle": True}}
    (root / "data.json").write_text(json.dumps(doc, indent=1))
    return root / "data.json"
