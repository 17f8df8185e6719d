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

from mm_convert.errors import DataError

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
    """One sample of either format; ValueError naming ``where`` and what is wrong."""
    try:
        return _parse(obj, where)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _parse(obj, where: str) -> Sample:
    if not isinstance(obj, dict):
        raise ValueError(f"a sample is a JSON object, got {type(obj).__name__}")
    if "conversations" in obj:
        raw = [(t.get("from"), t.get("value", "")) for t in obj["conversations"] if isinstance(t, dict)]
        images = [obj["image"]] if isinstance(obj.get("image"), str) else list(obj.get("image") or [])
    elif "messages" in obj:
        raw = [(t.get("role"), t.get("content", "")) for t in obj["messages"] if isinstance(t, dict)]
        images = list(obj.get("images") or [])
    else:
        raise ValueError("expected 'conversations' (mllm format) or 'messages'")
    if not raw:
        raise ValueError("no turns")
    for n, (role, _) in enumerate(raw):
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} in turn {n}; expected one of {sorted(ROLES)}")
    turns = [(ROLES[r], t if isinstance(t, str) else str(t)) for r, t in raw]
    if not any(r == "assistant" for r, _ in turns):
        raise ValueError("no assistant turn (nothing to learn from)")
    placeholders = sum(t.count("<image>") for _, t in turns)
    if images and placeholders == 0:  # LLaVA data sometimes omits the tag: the image goes first
        turns[0] = (turns[0][0], "<image>\n" * len(images) + turns[0][1])
    elif placeholders != len(images):
        raise ValueError(f"{placeholders} <image> placeholders for {len(images)} images")
    return Sample(str(obj.get("id", where)), turns, images)


@dataclass(frozen=True)
class BadSample:
    file: str
    index: int
    id: str
    what: str

    def line(self) -> str:
        return f"{self.file}: sample {self.index} (id {self.id!r}): {self.what}"


def read_samples(cfg: DataConfig) -> tuple[list[tuple[Sample, str, int]], list[BadSample]]:
    """(sample, file, index) of every well-formed sample (up to max_samples), and the malformed ones."""
    good, bad = [], []
    for name in cfg.datasets:
        path = Path(name)
        try:
            items = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: cannot read the dataset ({str(e).splitlines()[0]})") from None
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON list of samples")
        for i, obj in enumerate(items):
            try:
                good.append((_parse(obj, f"{path}[{i}]"), str(path), i))
            except ValueError as e:
                bad.append(BadSample(str(path), i, str(obj.get("id", "?")) if isinstance(obj, dict) else "?", str(e)))
            if cfg.max_samples and len(good) >= cfg.max_samples:
                return good, bad
    return good, bad


def load_samples(cfg: DataConfig) -> list[Sample]:
    """The samples; DataError naming the first malformed one."""
    good, bad = read_samples(cfg)
    if bad:
        raise DataError(bad[0].line())
    return [s for s, _, _ in good]


def checked_length(sample: Sample, tokenizer, image_processor, image_root, seq_length: int | None) -> tuple[int, str | None]:
    """(token length, None), or (0, what is wrong): a missing or unreadable image, an image the processor
    cannot resize, a sample longer than ``seq_length`` tokens."""
    from PIL import Image, UnidentifiedImageError

    for p in sample.images:
        path = Path(image_root) / p
        if not path.is_file():
            return 0, f"missing image {path}"
        try:
            with Image.open(path) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            return 0, f"unreadable image {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    try:
        n = token_length(sample, tokenizer, image_processor, image_root)
    except ValueError as e:  # the resize rule refuses, e.g. an aspect ratio beyond 200
        return 0, f"image cannot be resized within the processor's pixel bounds ({str(e).splitlines()[0]})"
    if seq_length and n > seq_length:
        return n, f"{n} tokens, longer than --seq-length {seq_length}"
    return n, None


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
