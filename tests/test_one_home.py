"""Model knowledge lives in mm_convert/models/ only: no string in the engine, the formats, the CLI or the
runtime names a family's tensors or tells families apart. The forbidden strings are derived from the specs
themselves (every HF and MM tensor name of every family's tiny configs, its model types, transformers classes
and converter names), so a family added later is covered too. Docstrings (prose) are not scanned."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from mm_convert.converter import BoundModel
from mm_convert.formats.hf import from_legacy
from mm_convert.layout import ParallelLayout
from mm_convert.models import FAMILIES
from mm_convert.testing import tiny_config_dict

REPO = Path(__file__).resolve().parent.parent
GENERIC = {"weight", "bias"}


def _fragments(name: str) -> set[str]:
    """Dotted pairs of a tensor name's non-numeric segments (``attn.qkv``, ``self_attn.q_proj``), and its
    segments that are identifiers of their own (``embed_tokens``, ``gate_up_proj``)."""
    parts = name.split(".")
    out = {f"{a}.{b}" for a, b in zip(parts, parts[1:]) if not a.isdigit() and not b.isdigit()
           and not {a, b} <= GENERIC and not (a in GENERIC or b in GENERIC)}
    out |= {p for p in parts if "_" in p and not p.isdigit()}
    return out


def forbidden() -> dict[str, str]:
    """fragment -> the family it belongs to."""
    out: dict[str, str] = {}
    for spec in FAMILIES:
        names = set()
        for variant in spec.TINY:
            cfg = spec.config_from_hf(tiny_config_dict(spec.NAME, variant), "tiny")
            model = BoundModel(spec, cfg)
            for n in model.shapes:  # the legacy name and its spelling in every key scheme
                names |= {n, *(from_legacy(n, s, spec.KEY_SCHEMES) for s in spec.KEY_SCHEMES)}
            layout = ParallelLayout.create(1, [cfg.text.num_layers], [cfg.vision.depth])
            names |= {t.key for f in model.plan(layout, {n: None for n in model.shapes}) for t in f.tensors}
        frags = set().union(*map(_fragments, names))
        frags |= set(spec.MODEL_TYPES) | {c for pair in spec.HF_CLASSES.values() for c in pair}
        frags |= {spec.CONVERTER, getattr(spec, "DCP_CONVERTER", spec.CONVERTER), spec.NAME}
        for f in frags:
            out.setdefault(f, spec.NAME)
    # Megatron's own TransformerLayer vocabulary (every family's and the torch_dist format's), and the two
    # top-level modules of MindSpeed-MM's VLM tree (its model.json keys), not a family's
    for generic in ("image_encoder", "text_decoder", "self_attention", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "input_layernorm",
                    "pre_mlp_layernorm", "final_layernorm", "layer_norm", "local_experts", "word_embeddings",
                    "output_layer", "self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                    "mlp.linear_fc2", "mlp.experts", "experts.local_experts", "decoder.layers", "decoder.final_layernorm",
                    "embedding.word_embeddings"):
        out.pop(generic, None)
    return out


def _strings(path: Path):
    """(line, text) of every string constant that is not a docstring."""
    tree = ast.parse(path.read_text())
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docs.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def sources() -> list[Path]:
    files = [p for p in (REPO / "mm_convert").rglob("*.py") if "models" not in p.relative_to(REPO / "mm_convert").parts]
    return sorted(files + list((REPO / "train").rglob("*.py")))


def test_no_family_knowledge_outside_models():
    bad = forbidden()
    pattern = re.compile("|".join(sorted(map(re.escape, bad), key=len, reverse=True)))
    found = []
    for path in sources():
        for line, text in _strings(path):
            for m in pattern.finditer(text):
                # a match must be a whole name part (not "qkv" inside "linear_qkv")
                lo, hi = m.span()
                if (lo == 0 or not (text[lo - 1].isalnum() or text[lo - 1] == "_")) and \
                        (hi == len(text) or not (text[hi].isalnum() or text[hi] == "_")):
                    found.append(f"{path.relative_to(REPO)}:{line}: {m.group()!r} ({bad[m.group()]})")
    assert not found, "family knowledge outside mm_convert/models/:\n" + "\n".join(found)


def test_the_scan_catches_a_family_name():
    """The derived list holds the names the rule is about (so the test above cannot pass vacuously)."""
    bad = forbidden()
    for name in ("visual.blocks", "embed_tokens", "gate_up_proj", "deepstack_merger_list", "merger.ln_q",
                 "qwen2_5_vl", "qwen3_vl_moe", "Qwen2VLForConditionalGeneration", "Qwen3VLMegatronConverter",
                 "image_encoder.projector", "deepstack_layer"):
        assert name in bad, name
