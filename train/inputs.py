"""Model inputs as users have them: a chat-templated prompt, an image turned into patches by transformers'
Qwen2-VL image processor, and the image placeholder expanded to one token per merged patch."""
from __future__ import annotations

import os

import torch

from .config import ModelConfig
from .positions import mrope_positions

IMAGE_TOKEN = "<|image_pad|>"


def load_processors(path: str | os.PathLike):
    """(tokenizer, image processor) from a checkpoint directory (the HF one: real checkpoints bring their files).

    AutoProcessor is not used on purpose: in transformers 5 it also builds the video processor, which needs
    torchvision; the tokenizer and the (PIL) image processor are all an image + text prompt needs."""
    from transformers import AutoImageProcessor, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)


def open_image(image):
    from PIL import Image

    return image if isinstance(image, Image.Image) else Image.open(image)


def build_inputs(tokenizer, image_processor, cfg: ModelConfig, prompt: str, image=None, *,
                 min_pixels: int | None = None, max_pixels: int | None = None) -> dict:
    """One user turn (optional image, then ``prompt``) with the generation prompt appended.

    Returns input_ids (1, S), mm_token_type_ids (1, S) (1 on image tokens, as transformers wants them),
    position_ids (3, 1, S) (mrope), rope_delta (int) and, with an image, pixel_values and image_grid_thw.
    Models whose images are fixed-size tiles (the InternViT block kind): ``build_tile_inputs``."""
    if cfg.vision.block == "intern":
        return build_tile_inputs(tokenizer, image_processor, cfg, prompt, image)
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    pixel_values = grid = None
    if image is not None:
        kwargs = {}
        if min_pixels or max_pixels:
            size = dict(image_processor.size)
            size.update({k: v for k, v in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)) if v})
            kwargs["size"] = size
        px = image_processor(images=[open_image(image).convert("RGB")], return_tensors="pt", **kwargs)
        pixel_values, grid = px["pixel_values"], px["image_grid_thw"]
        n = int(grid[0].prod()) // cfg.vision.spatial_merge_size ** 2
        if text.count(IMAGE_TOKEN) != 1:
            raise ValueError(f"the chat template produced {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} placeholders, expected 1")
        text = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * n)
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != cfg.image_token_id:
        raise ValueError(f"tokenizer's {IMAGE_TOKEN} id {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)} "
                         f"!= the model's image_token_id {cfg.image_token_id}")
    position_ids, delta = mrope_positions(input_ids, grid, cfg.image_token_id, cfg.vision.spatial_merge_size)
    out = {"input_ids": input_ids, "mm_token_type_ids": (input_ids == cfg.image_token_id).int(),
           "position_ids": position_ids, "rope_delta": delta}
    if image is not None:
        out.update(pixel_values=pixel_values, image_grid_thw=grid)
    return out


def hf_kwargs(inputs: dict) -> dict:
    """The same inputs as keyword arguments of the family's transformers model (those the inputs have)."""
    kw = {"input_ids": inputs["input_ids"], "attention_mask": torch.ones_like(inputs["input_ids"])}
    if inputs.get("mm_token_type_ids") is not None:
        kw["mm_token_type_ids"] = inputs["mm_token_type_ids"]
    if inputs.get("pixel_values") is not None:
        kw["pixel_values"] = inputs["pixel_values"]
        if inputs.get("image_grid_thw") is not None:
            kw["image_grid_thw"] = inputs["image_grid_thw"]
    return kw


def build_tile_inputs(tokenizer, image_processor, cfg: ModelConfig, prompt: str, image=None) -> dict:
    """InternVL's inputs, as its processor makes them: the image cropped into tiles of the vision tower's size
    (plus a thumbnail; GotOcr2's ``crop_to_patches``), the chat template's one image placeholder (the tokenizer's
    ``context_image_token``) expanded to ``start_image_token`` + image_seq_length placeholders per tile +
    ``end_image_token``; one position per token (1-D rope: the three rows of position_ids are equal).

    Returns input_ids (1, S), position_ids (3, 1, S), rope_delta 0 and, with an image, pixel_values (tiles, C, H, W)."""
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    ctx = tokenizer.context_image_token
    if tokenizer.convert_tokens_to_ids(ctx) != cfg.image_token_id:
        raise ValueError(f"tokenizer's {ctx} id {tokenizer.convert_tokens_to_ids(ctx)} != the model's image_token_id "
                         f"{cfg.image_token_id}")
    pixel_values = None
    if image is not None:
        px = image_processor(images=[open_image(image).convert("RGB")], crop_to_patches=True, return_tensors="pt")
        pixel_values = px["pixel_values"]
        if text.count(ctx) != 1:
            raise ValueError(f"the chat template produced {text.count(ctx)} {ctx} placeholders, expected 1")
        tiles = int(px["num_patches"][0]) if "num_patches" in px else pixel_values.shape[0]
        text = text.replace(ctx, tokenizer.start_image_token + ctx * (cfg.image_seq_length * tiles)
                            + tokenizer.end_image_token)
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    position_ids = torch.arange(input_ids.shape[1]).view(1, 1, -1).expand(3, 1, -1).clone()
    out = {"input_ids": input_ids, "position_ids": position_ids, "rope_delta": 0}
    if pixel_values is not None:
        out["pixel_values"] = pixel_values
    return out
