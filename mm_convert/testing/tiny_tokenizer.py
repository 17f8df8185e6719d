"""A tiny Qwen2-style tokenizer + Qwen2-VL image processor for the tiny checkpoint (no hub download).

``write_tiny_processor(out_dir)`` writes what ``AutoProcessor.from_pretrained(out_dir)`` needs offline:
a byte-level BPE tokenizer (ids 0..255 are the bytes, 256..299 a few fixed merges, 300..307 the Qwen
specials, matching the ids in ``mm_convert/data/tiny_qwen2_5_vl.json``), the Qwen2.5-VL chat template and
the image processor config (patch 14, merge 2, temporal 2, small pixel bounds so test images stay tiny).
Real checkpoints bring their own files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

SPECIAL_TOKENS = (  # ids 300.. in this order
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
FIRST_SPECIAL_ID = 300

# 44 fixed merges fill ids 256..299 so that the specials land on 300..307 (the tiny config's ids).
_MERGES = ("Ġ t", "Ġ a", "t h", "h e", "i n", "e r", "a n", "r e", "o n", "a t", "e n", "n d", "t i", "e s",
           "o r", "t e", "o f", "e d", "i s", "i t", "a l", "a r", "s t", "t o", "n t", "n g", "s e", "h a",
           "a s", "o u", "i o", "l e", "v e", "c o", "m e", "d e", "h i", "r i", "r o", "i c", "n e", "e a",
           "r a", "c e")

# The Qwen2.5-VL chat template: a default system turn, images/videos as <|vision_start|><|image_pad|>
# <|vision_end|> placeholders that the processor expands to the image's grid size.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Small pixel bounds: a 56x56 image gives a 4x4 patch grid (4 LLM tokens); nothing grows past 16x16 patches.
IMAGE_PROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "do_convert_rgb": True, "resample": 3,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "min_pixels": 56 * 56, "max_pixels": 224 * 224,
    "size": {"shortest_edge": 56 * 56, "longest_edge": 224 * 224},
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
}


def build_tokenizer(specials: tuple[str, ...] = SPECIAL_TOKENS):
    """The tiny tokenizer as a ``tokenizers.Tokenizer`` (byte-level BPE, ``specials`` at 300..)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}  # id == byte value
    merges = [tuple(m.split(" ")) for m in _MERGES]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    assert len(vocab) == FIRST_SPECIAL_ID, len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    assert [tok.token_to_id(t) for t in specials] == list(range(FIRST_SPECIAL_ID, FIRST_SPECIAL_ID + len(specials)))
    assert ByteLevel.alphabet() and len(alphabet) == 256
    return tok


def write_tiny_processor(out_dir: str | os.PathLike, processor_class: str, patch_size: int = 14,
                         family: dict | None = None) -> Path:
    """Write tokenizer, chat template and image/processor configs into ``out_dir`` (created if missing);
    ``processor_class`` and ``patch_size`` are the family's (its spec's HF_PROCESSOR, its vision patch);
    ``family``: the spec's TINY_PROCESSOR where the family has other special tokens, template and image processor
    (keys ``special_tokens``, ``extra_special_tokens``, ``chat_template``, ``image_processor``)."""
    if family:
        return _write_family_processor(Path(out_dir), processor_class, family)
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(), bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token=None, model_max_length=4096,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"  # what the published checkpoints name
    cfg["processor_class"] = processor_class
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    unit = patch_size * IMAGE_PROCESSOR["merge_size"]  # pixels per LLM token side
    improc = {**IMAGE_PROCESSOR, "processor_class": processor_class, "patch_size": patch_size,
              "min_pixels": (2 * unit) ** 2, "max_pixels": (8 * unit) ** 2,
              "size": {"shortest_edge": (2 * unit) ** 2, "longest_edge": (8 * unit) ** 2}}
    (out / "preprocessor_config.json").write_text(json.dumps(improc, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


def _write_family_processor(out: Path, processor_class: str, family: dict) -> Path:
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    specials = tuple(family["special_tokens"])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(specials), bos_token=None, eos_token=specials[2], pad_token=specials[0],
        unk_token=None, model_max_length=4096, extra_special_tokens=dict(family.get("extra_special_tokens", {})))
    tok.chat_template = family["chat_template"]
    tok.save_pretrained(out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg["processor_class"] = processor_class
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    improc = {**family["image_processor"], "processor_class": processor_class}
    (out / "preprocessor_config.json").write_text(json.dumps(improc, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(family["chat_template"])
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel pre-tokenization emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}
