"""Fine-tuning data as the MindSpeed-MM guides have it.

Sample formats (one JSON list per file; samples without an image are text-only and mix freely):
  mllm:     {"id", "image": "coco/x.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                           {"from": "gpt", "value": "..."}]}
  messages: {"images": ["x.jpg"], "messages": [{"role": "user", "content": "<image>..."}, {"role": "assistant", ...}]}
data.json is read as MindSpeed-MM reads it (``load_data_config``; every key and what it does here is in ``SCHEMA``):
  dataset_param.preprocess_parameters.model_name_or_path (tokenizer / processor), image_max_pixels /
  image_min_pixels (MindSpeed-MM's PIL pre-resize before the image processor, see ``pre_resize``);
  dataset_param.basic_parameters.{dataset_dir, dataset (comma-separated files), cache_dir, max_samples, template,
  train_on_prompt, overwrite_cache}; dataloader_param.{sampler_type, shuffle, drop_last}.
Unknown keys are listed as ignored, keys that tune what this runtime does not have as "no effect here", and a value
this runtime cannot honour is a one-line error naming the key and what is supported.
Encoding follows the Qwen2.5-VL chat template (MindSpeed-MM's ``qwen2vl`` template); labels are -100 everywhere but
on assistant replies (and their closing <|im_end|>), so the loss is only on what the assistant says
(``train_on_prompt`` true: on every token).
"""
from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mm_convert.errors import ConfigError, DataError

IGNORE = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_PAD = "<|image_pad|>"
# MindSpeed-MM's ProcessorArguments defaults, in force when data.json leaves the keys out
DEFAULT_IMAGE_MAX_PIXELS = 768 * 768
DEFAULT_IMAGE_MIN_PIXELS = 32 * 32


@dataclass
class Sample:
    id: str
    turns: list[tuple[str, str]]          # (role, text) with "<image>" placeholders
    images: list[str] = field(default_factory=list)  # paths, resolved against dataset_dir


class DataConfigError(ConfigError, ValueError):
    """data.json lacks a required key, or sets a value this runtime cannot honour (one line naming the key)."""


@dataclass
class DataConfig:
    model_name_or_path: str
    dataset_dir: str
    datasets: list[str]
    cache_dir: str | None = None
    max_samples: int | None = None
    sampler_type: str = "BucketBatchSampler"
    image_max_pixels: int | None = DEFAULT_IMAGE_MAX_PIXELS
    image_min_pixels: int | None = DEFAULT_IMAGE_MIN_PIXELS
    template: str = "qwen2vl"
    train_on_prompt: bool = False
    overwrite_cache: bool = False
    shuffle: bool = True
    drop_last: bool = True
    ignored: list[str] = field(default_factory=list)    # unknown keys (dotted paths)
    no_effect: list[str] = field(default_factory=list)  # "dotted.key (why)"

    def encoding(self) -> dict:
        """The keyword arguments of ``encode`` / ``token_length`` / ``checked_encoding`` this config asks for."""
        return {"max_pixels": self.image_max_pixels, "min_pixels": self.image_min_pixels,
                "train_on_prompt": self.train_on_prompt}


# ---- data.json keys ------------------------------------------------------------------------------------------
# Each known key: USED (read into DataConfig), _NoEffect (accepted; listed at start as "no effect here" unless its
# value is one of ``quiet``), or _Only (these values work, null too; anything else is an error naming what works).
USED = "used"


@dataclass(frozen=True)
class _NoEffect:
    why: str
    quiet: tuple = (None,)


@dataclass(frozen=True)
class _Only:
    values: tuple
    supported: str


_NO_VIDEO = _NoEffect("no video samples here")
_IN_PROCESS = _NoEffect("samples are encoded in the training process", quiet=(None, False, 0))
_TOKENISED_ONCE = _NoEffect("samples are tokenised once, by rank 0, into cache_dir")
_NO_EVAL = _NoEffect("no evaluation here")
SCHEMA: dict = {
    "dataset_param": {
        "dataset_type": _Only(("huggingface",), "'huggingface' (JSON lists of samples)"),
        "preprocess_parameters": {
            "model_name_or_path": USED, "image_max_pixels": USED, "image_min_pixels": USED,
            "use_fast_tokenizer": _NoEffect("the checkpoint's fast tokenizer is used", quiet=(None, True)),
            "split_special_tokens": _Only((False,), "false (special tokens such as <|image_pad|> stay single tokens)"),
            "image_resolution": _NoEffect("Qwen-VL images are bounded by image_max_pixels / image_min_pixels"),
            "video_max_pixels": _NO_VIDEO, "video_min_pixels": _NO_VIDEO, "video_fps": _NO_VIDEO,
            "video_maxlen": _NO_VIDEO, "video_resolution": _NO_VIDEO,
            "image_do_pan_and_scan": _Only((False,), "false (pan and scan is Gemma3's)"),
            "crop_to_patches": _Only((False,), "false (images are not cropped into tiles here)"),
            "use_audio_in_video": _Only((False,), "false (no audio here)"),
            "audio_sampling_rate": _NoEffect("no audio here"),
        },
        "basic_parameters": {
            "dataset_dir": USED, "dataset": USED, "cache_dir": USED, "max_samples": USED, "template": USED,
            "train_on_prompt": USED, "overwrite_cache": USED,
            "cutoff_len": _Only((), "nothing: cutoff_len is deprecated (MindSpeed-MM refuses it too); use --seq-length"),
            "enable_thinking": _NoEffect("only reasoning templates read it"),
            "mask_history": _Only((False,), "false (the loss is on every assistant turn)"),
            "streaming": _Only((False,), "false (samples are read up front: the sampler needs every length)"),
            "preprocessing_batch_size": _TOKENISED_ONCE, "preprocessing_num_workers": _TOKENISED_ONCE,
            "tool_format": _Only((), "null (tool calls are not formatted here)"),
            "val_dataset": _NO_EVAL, "val_max_samples": _NO_EVAL, "val_rate": _NO_EVAL,
            "packing": _Only((False,), "false or null (sequence packing is not implemented)"),
            "neat_packing": _Only((False,), "false (sequence packing is not implemented)"),
            "preprocess_on_fly": _NoEffect("samples are encoded when their step comes; token ids are cached",
                                           quiet=(None, False)),
        },
        "attr": _NoEffect("the sample format (mllm conversations/from/value or messages/role/content) is detected "
                          "per sample"),
    },
    "dataloader_param": {
        "dataloader_mode": _Only(("sampler",), "'sampler'"),
        "sampler_type": USED, "shuffle": USED, "drop_last": USED,
        "collate_param": _NoEffect("micro-batches are padded to their longest sample, padding labels -100"),
        "pin_memory": _IN_PROCESS, "num_workers": _IN_PROCESS, "prefetch_factor": _IN_PROCESS,
        "persistent_workers": _IN_PROCESS,
        "seed": _NoEffect("the samplers use --seed"),
        "data_sharding": _Only((False,), "false"),
        "priority_mode": _NoEffect("BucketBatchSampler here buckets by token count"),
        "group_frame": _Only((False,), "false (video samplers)"), "group_resolution": _Only((False,), "false (video samplers)"),
        "group_data": _Only((False,), "false (video samplers)"),
    },
}


def _walk(doc: dict, schema: dict, prefix: str, where, ignored: list, no_effect: list) -> None:
    for k, v in doc.items():
        key = f"{prefix}{k}"
        rule = schema.get(k)
        if rule is None:
            ignored.append(key)
        elif isinstance(rule, dict):
            if not isinstance(v, dict):
                raise DataConfigError(f"{where}: {key} must be an object, got {json.dumps(v)}")
            _walk(v, rule, key + ".", where, ignored, no_effect)
        elif isinstance(rule, _NoEffect):
            if not any(v is q or (v == q and type(v) is type(q)) for q in rule.quiet):
                no_effect.append(f"{key} ({rule.why})")
        elif isinstance(rule, _Only):
            if v is not None and not any(v == q and type(v) is type(q) for q in rule.values):
                raise DataConfigError(f"{where}: {key} {json.dumps(v)} is not supported here; supported: {rule.supported}")


def load_data_config(path: str | Path) -> DataConfig:
    """data.json as MindSpeed-MM reads it (see the module docstring); ``DataConfigError`` (one line) on a missing
    required key or a value this runtime cannot honour."""
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict):
        raise DataConfigError(f"{path}: expected a JSON object")
    ignored: list[str] = []
    no_effect: list[str] = []
    _walk(doc, SCHEMA, "", path, ignored, no_effect)
    try:
        ds = doc["dataset_param"]
        pre, basic = ds["preprocess_parameters"], ds["basic_parameters"]
        model, dataset = pre["model_name_or_path"], basic["dataset"]
    except KeyError as e:
        raise DataConfigError(f"{path}: missing {e.args[0]!r}; expected dataset_param.preprocess_parameters."
                              f"model_name_or_path and dataset_param.basic_parameters.dataset") from None
    loader = doc.get("dataloader_param", {})

    def get(section: dict, name: str, kind, default, where: str):
        v = section.get(name)
        if v is None:
            return default
        if kind is int and (type(v) is not int or v < 0):
            raise DataConfigError(f"{path}: {where}.{name} {json.dumps(v)}: expected a whole number >= 0 or null")
        if kind is bool and type(v) is not bool:
            raise DataConfigError(f"{path}: {where}.{name} {json.dumps(v)}: expected true or false")
        if kind is str and not isinstance(v, str):
            raise DataConfigError(f"{path}: {where}.{name} {json.dumps(v)}: expected a string")
        return v

    P, B, L = "dataset_param.preprocess_parameters", "dataset_param.basic_parameters", "dataloader_param"
    if not isinstance(dataset, str):
        raise DataConfigError(f"{path}: {B}.dataset {json.dumps(dataset)}: expected comma-separated file names")

    def pixels(name: str, default: int) -> int | None:  # null: no bound
        return None if name in pre and pre[name] is None else get(pre, name, int, default, P)

    max_px, min_px = pixels("image_max_pixels", DEFAULT_IMAGE_MAX_PIXELS), pixels("image_min_pixels", DEFAULT_IMAGE_MIN_PIXELS)
    if max_px == 0:
        raise DataConfigError(f"{path}: {P}.image_max_pixels 0: every image would shrink to nothing; give a "
                              f"positive number of pixels (MindSpeed-MM's default is {DEFAULT_IMAGE_MAX_PIXELS})")
    template = get(basic, "template", str, "qwen2vl", B)
    if template != "qwen2vl":
        raise DataConfigError(f"{path}: {B}.template {json.dumps(template)} is not supported here; supported: "
                              f"'qwen2vl' (the chat format this runtime encodes)")
    return DataConfig(model_name_or_path=model, dataset_dir=get(basic, "dataset_dir", str, ".", B),
                      datasets=[s.strip() for s in dataset.split(",") if s.strip()],
                      cache_dir=get(basic, "cache_dir", str, None, B),
                      max_samples=get(basic, "max_samples", int, None, B) or None,
                      sampler_type=get(loader, "sampler_type", str, "BucketBatchSampler", L),
                      image_max_pixels=max_px, image_min_pixels=min_px, template=template,
                      train_on_prompt=get(basic, "train_on_prompt", bool, False, B),
                      overwrite_cache=get(basic, "overwrite_cache", bool, False, B),
                      shuffle=get(loader, "shuffle", bool, True, L), drop_last=get(loader, "drop_last", bool, True, L),
                      ignored=ignored, no_effect=no_effect)


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
    """(sample, file, index) of every well-formed sample, and the malformed ones. ``max_samples`` N keeps the
    first N entries of the files taken one after the other, well-formed or not, as MindSpeed-MM's
    ``dataset.select(range(N))`` does on the concatenated files (null / 0: all)."""
    good, bad = [], []
    seen = 0
    for name in cfg.datasets:
        path = Path(name)
        try:
            items = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: cannot read the dataset ({str(e).splitlines()[0]})") from None
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON list of samples")
        for i, obj in enumerate(items):
            if cfg.max_samples and seen >= cfg.max_samples:
                return good, bad
            seen += 1
            try:
                good.append((_parse(obj, f"{path}[{i}]"), str(path), i))
            except ValueError as e:
                bad.append(BadSample(str(path), i, str(obj.get("id", "?")) if isinstance(obj, dict) else "?", str(e)))
    return good, bad


def load_samples(cfg: DataConfig) -> list[Sample]:
    """The samples; DataError naming the first malformed one."""
    good, bad = read_samples(cfg)
    if bad:
        raise DataError(bad[0].line())
    return [s for s, _, _ in good]


# ---- images --------------------------------------------------------------------------------------------------
def pre_resize(width: int, height: int, max_pixels: int | None = None, min_pixels: int | None = None) -> tuple[int, int]:
    """The size MindSpeed-MM's data path gives an image before the image processor sees it (its LlamaFactory
    ``_preprocess_image``): above ``max_pixels`` pixels both sides are scaled by sqrt(max / (w * h)) and truncated,
    then below ``min_pixels`` scaled up the same way (0 or None: no bound). The processor's own min/max_pixels
    (smart_resize) apply after this. ValueError when nothing would be left of the image."""
    if max_pixels is not None and width * height > max_pixels:
        f = math.sqrt(max_pixels / (width * height))
        width, height = int(width * f), int(height * f)
    if min_pixels and width * height < min_pixels:
        if width * height == 0:
            raise ValueError(f"image_max_pixels {max_pixels} leaves an empty image")
        f = math.sqrt(min_pixels / (width * height))
        width, height = int(width * f), int(height * f)
    if width * height == 0:
        raise ValueError(f"image_max_pixels {max_pixels} leaves an empty image")
    return width, height


def load_image(path, max_pixels: int | None = None, min_pixels: int | None = None):
    """The RGB image the processor gets: MindSpeed-MM's pre-resize (nearest neighbour, as its Qwen2-VL plugin
    does) when a bound applies, then RGB."""
    from PIL import Image

    with Image.open(path) as im:
        size = pre_resize(im.width, im.height, max_pixels, min_pixels)
        return (im.resize(size, resample=Image.Resampling.NEAREST) if size != im.size else im).convert("RGB")


def image_tokens(width: int, height: int, image_processor, max_pixels: int | None = None,
                 min_pixels: int | None = None) -> int:
    """Merged image tokens for an image of this size: the pre-resize (``pre_resize``), then the processor's own
    resize rule."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # PIL one: no torchvision
    width, height = pre_resize(width, height, max_pixels, min_pixels)
    patch, merge = image_processor.patch_size, image_processor.merge_size
    size = image_processor.size
    h, w = smart_resize(height, width, factor=patch * merge, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    return (h // patch) * (w // patch) // merge ** 2


def check_images(sample: Sample, image_root) -> tuple[list[tuple[int, int]], str | None]:
    """((size, mtime_ns) of each image file, None), or (…, what is wrong): a missing or unreadable image."""
    from PIL import Image, UnidentifiedImageError

    stats = []
    for p in sample.images:
        path = Path(image_root) / p
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            return stats, f"missing image {path}"
        try:
            with Image.open(path) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            return stats, f"unreadable image {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        stats.append((st.st_size, st.st_mtime_ns))
    return stats, None


def image_counts(sample: Sample, image_processor, image_root=".", max_pixels: int | None = None,
                 min_pixels: int | None = None) -> list[int]:
    """Each image's token count from its file header (no decoding)."""
    from PIL import Image
    counts = []
    for p in sample.images:
        with Image.open(Path(image_root) / p) as im:
            counts.append(image_tokens(*im.size, image_processor, max_pixels, min_pixels))
    return counts


# ---- samples -------------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """A sample's tokens without its pixels: what the cache keeps (``train.dataset``)."""
    input_ids: list[int]
    labels: list[int]
    image_tokens: list[int]                                            # per image
    image_stats: list[tuple[int, int]] = field(default_factory=list)   # per image file: (size, mtime_ns)


def checked_length(sample: Sample, tokenizer, image_processor, image_root, seq_length: int | None,
                   **encoding) -> tuple[int, str | None]:
    """(token length, None), or (0, what is wrong): a missing or unreadable image, an image the processor
    cannot resize, a sample longer than ``seq_length`` tokens. ``encoding``: max_pixels, min_pixels."""
    enc, what = checked_encoding(sample, tokenizer, image_processor, image_root, **encoding)
    if what:
        return 0, what
    n = len(enc.input_ids)
    if seq_length and n > seq_length:
        return n, f"{n} tokens, longer than --seq-length {seq_length}"
    return n, None


def checked_encoding(sample: Sample, tokenizer, image_processor, image_root, *, max_pixels: int | None = None,
                     min_pixels: int | None = None, train_on_prompt: bool = False) -> tuple[Encoded | None, str | None]:
    """The checks of ``checked_length`` but the length, then the token ids: (Encoded, None) or (None, what)."""
    stats, what = check_images(sample, image_root)
    if what:
        return None, what
    try:
        counts = image_counts(sample, image_processor, image_root, max_pixels, min_pixels)
    except ValueError as e:  # the resize rule refuses, e.g. an aspect ratio beyond 200
        return None, f"image cannot be resized within the processor's pixel bounds ({str(e).splitlines()[0]})"
    ids, labels = _token_ids(sample, tokenizer, counts, train_on_prompt)
    pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    if ids.count(pad) != sum(counts):
        return None, f"the text itself contains {IMAGE_PAD} (image tokens would not match the images)"
    return Encoded(ids, labels, counts, stats), None


def encode(sample: Sample, tokenizer, image_processor, image_root: str | Path = ".", *, max_pixels: int | None = None,
           min_pixels: int | None = None, train_on_prompt: bool = False, tokens: Encoded | None = None) -> dict:
    """input_ids, labels (assistant tokens only), and pixel_values / image_grid_thw for its images (pre-resized
    to ``max_pixels`` / ``min_pixels`` as MindSpeed-MM does). ``tokens``: the sample's token ids as the cache holds
    them; only the images are processed then, and their token counts must be the cached ones."""
    pixel_values = grid = None
    counts: list[int] = []
    if sample.images:
        imgs = [load_image(Path(image_root) / p, max_pixels, min_pixels) for p in sample.images]
        px = image_processor(images=imgs, return_tensors="pt")
        pixel_values, grid = px["pixel_values"], px["image_grid_thw"]
        counts = [int(g.prod()) // image_processor.merge_size ** 2 for g in grid]
    if tokens is None:
        ids, labels = _token_ids(sample, tokenizer, counts, train_on_prompt)
    elif tokens.image_tokens != counts:
        raise DataError(f"sample {sample.id!r}: its images give {counts} image tokens, the cached token ids hold "
                        f"{tokens.image_tokens}; an image changed during the run?")
    else:
        ids, labels = tokens.input_ids, tokens.labels
    out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
    if pixel_values is not None:
        out.update(pixel_values=pixel_values, image_grid_thw=grid)
    return out


def token_length(sample: Sample, tokenizer, image_processor, image_root: str | Path = ".", *,
                 max_pixels: int | None = None, min_pixels: int | None = None) -> int:
    """len(encode(...)["input_ids"]) without decoding any image: sizes come from the file headers. The
    samplers need every sample's length before training; encoding every image up front would not scale."""
    counts = image_counts(sample, image_processor, image_root, max_pixels, min_pixels)
    return len(_token_ids(sample, tokenizer, counts)[0])


def _token_ids(sample: Sample, tokenizer, counts: list[int], train_on_prompt: bool = False) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []

    def add(text: str, learn: bool):
        t = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(t)
        labels.extend(t if learn or train_on_prompt else [IGNORE] * len(t))

    turns = sample.turns if sample.turns[0][0] == "system" else [("system", DEFAULT_SYSTEM)] + sample.turns
    img = iter(counts)
    for role, text in turns:
        if "<image>" in text:
            parts = text.split("<image>")
            text = parts[0] + "".join("<|vision_start|>" + IMAGE_PAD * next(img) + "<|vision_end|>" + p for p in parts[1:])
        add(f"<|im_start|>{role}\n", False)
        add(text + "<|im_end|>", role == "assistant")
        add("\n", False)
    return ids, labels
