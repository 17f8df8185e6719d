"""Fine-tuning data as the MindSpeed-MM guides have it.

Sample formats (one JSON list per file; samples without an image are text-only and mix freely):
  mllm:     {"id", "image": "coco/x.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                           {"from": "gpt", "value": "..."}]}
  messages: {"images": ["x.jpg"], "messages": [{"role": "user", "content": "<image>..."}, {"role": "assistant", ...}]}
data.json: dataset_param.preprocess_parameters.model_name_or_path (tokenizer / processor),
           dataset_param.basic_parameters.{dataset_dir, dataset (comma-separated files), cache_dir, max_samples},
           dataloader_param.sampler_type ("BucketBatchSampler" or random).
Encoding follows the Qwen2.5-VL chat template; labels are -100 everywhere but on assistant replies (and their
closing <|im_end|>), so the loss is only on what the assistant says.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

IGNORE = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
DEFAULT_SYSTEM = "You are a helpful assistant."


@dataclass
class Sample:
    id: str
    turns: list[tuple[str, str]]          # (role, text) with "<image>" placeholders
    images: list[str] = field(default_factory=list)  # paths, resolved against dataset_dir


@dataclass
class DataConfig:
    model_name_or_path: str
    dataset_dir: str
    datasets: list[str]
    cache_dir: str | None = None
    max_samples: int | None = None
    sampler_type: str = "BucketBatchSampler"


def load_data_config(path: str | Path) -> DataConfig:
    doc = json.loads(Path(path).read_text())
    try:
        ds = doc["dataset_param"]
        pre, basic = ds["preprocess_parameters"], ds["basic_parameters"]
        return DataConfig(model_name_or_path=pre["model_name_or_path"], dataset_dir=basic.get("dataset_dir", "."),
                          datasets=[s for s in basic["dataset"].split(",") if s],
                          cache_dir=basic.get("cache_dir"), max_samples=basic.get("max_samples"),
                          sampler_type=doc.get("dataloader_param", {}).get("sampler_type", "BucketBatchSampler"))
    except KeyError as e:
        raise ValueError(f"{path}: missing {e.args[0]!r}; expected dataset_param.preprocess_parameters."
                         f"model_name_or_path and dataset_param.basic_parameters.dataset")


def parse_sample(obj: dict, where: str) -> Sample:
    if "conversations" in obj:
        turns = [(ROLES.get(t.get("from"), ""), t.get("value", "")) for t in obj["conversations"]]
        images = [obj["image"]] if isinstance(obj.get("image"), str) else list(obj.get("image") or [])
    elif "messages" in obj:
        turns = [(ROLES.get(t.get("role"), ""), t.get("content", "")) for t in obj["messages"]]
        images = list(obj.get("images") or [])
    else:
        raise ValueError(f"{where}: expected 'conversations' (mllm format) or 'messages'")
    bad = [r for r, _ in turns if not r]
    if bad or not turns:
        raise ValueError(f"{where}: every turn needs a role of {sorted(ROLES)}")
    placeholders = sum(t.count("<image>") for _, t in turns)
    if images and placeholders == 0:  # LLaVA data sometimes omits the tag: the image goes first
        turns[0] = (turns[0][0], "<image>\n" * len(images) + turns[0][1])
    elif placeholders != len(images):
        raise ValueError(f"{where}: {placeholders} <image> placeholders for {len(images)} images")
    return Sample(str(obj.get("id", where)), turns, images)


def load_samples(cfg: DataConfig) -> list[Sample]:
    out = []
    for name in cfg.datasets:
        path = Path(name)
        items = json.loads(path.read_text())
        for i, obj in enumerate(items):
            out.append(parse_sample(obj, f"{path}[{i}]"))
            if cfg.max_samples and len(out) >= cfg.max_samples:
                return out
    return out


def image_tokens(width: int, height: int, image_processor) -> int:
    """Merged image tokens for an image of this size, from the processor's own resize rule."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # PIL one: no torchvision
    patch, merge = image_processor.patch_size, image_processor.merge_size
    size = image_processor.size
    h, w = smart_resize(height, width, factor=patch * merge, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    return (h // patch) * (w // patch) // merge ** 2


def encode(sample: Sample, tokenizer, image_processor, image_root: str | Path = ".") -> dict:
    """input_ids, labels (assistant tokens only), and pixel_values / image_grid_thw for its images."""
    from PIL import Image
    pixel_values = grid = None
    counts: list[int] = []
    if sample.images:
        imgs = [Image.open(Path(image_root) / p).convert("RGB") for p in sample.images]
        px = image_processor(images=imgs, return_tensors="pt")
        pixel_values, grid = px["pixel_values"], px["image_grid_thw"]
        counts = [int(g.prod()) // image_processor.merge_size ** 2 for g in grid]
    ids, labels = _token_ids(sample, tokenizer, counts)
    out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
    if pixel_values is not None:
        out.update(pixel_values=pixel_values, image_grid_thw=grid)
    return out


def token_length(sample: Sample, tokenizer, image_processor, image_root: str | Path = ".") -> int:
    """len(encode(...)["input_ids"]) without decoding any image: sizes come from the file headers. The
    samplers need every sample's length before training; encoding every image up front would not scale."""
    from PIL import Image
    counts = []
    for p in sample.images:
        with Image.open(Path(image_root) / p) as im:
            counts.append(image_tokens(*im.size, image_processor))
    return len(_token_ids(sample, tokenizer, counts)[0])


def _token_ids(sample: Sample, tokenizer, counts: list[int]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []

    def add(text: str, learn: bool):
        t = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(t)
        labels.extend(t if learn else [IGNORE] * len(t))

    turns = sample.turns if sample.turns[0][0] == "system" else [("system", DEFAULT_SYSTEM)] + sample.turns
    img = iter(counts)
    for role, text in turns:
        if "<image>" in text:
            parts = text.split("<image>")
            text = parts[0] + "".join("<|vision_start|>" + "<|image_pad|>" * next(img) + "<|vision_end|>" + p for p in parts[1:])
        add(f"<|im_start|>{role}\n", False)
        add(text + "<|im_end|>", role == "assistant")
        add("\n", False)
    return ids, labels
