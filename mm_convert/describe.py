"""The name mapping of a family, as a table read off its spec: each MM tensor, the HF tensors it is made of,
the fusion, the TP split and where it lives. ``mm-convert <Converter> names`` prints it; docs/format.md holds
it for the published configs (``python -m mm_convert.describe``, markdown)."""
from __future__ import annotations

import argparse
import json

from .models import FAMILIES
from .plan import Rule

FUSIONS = {"concat": "concat", "qkv_groups": "GQA groups [q_g; k_g; v_g]", "qkv_heads": "per head [q_h; k_h; v_h]"}
SPLITS = {"replicate": "replicated", "split_dim0": "dim 0", "split_dim1": "dim 1"}


def rows(spec, cfg, pp_size: int = 2) -> list[tuple[str, str, str, str, str]]:
    """(MM name, HF names, fusion, TP split, placement) per rule; ``{i}`` is the layer (local in MM, global in
    HF), ``{e}`` the expert (local to its EP rank in MM, global in HF)."""
    views = spec.views(cfg, "hub")
    layer = cfg.text.moe_layers[0] if cfg.text.moe_layers else 0
    out = []
    for r in spec.rules(cfg, pp_size):
        hf = " + ".join(_hf_name(h, views, layer) for h in r.hf)
        fuse = FUSIONS[r.fuse[0]] if len(r.hf) > 1 or r.fuse[0] != "concat" else ""
        parts = len(r.hf) if r.tp == "split_dim0" and r.fuse[0] == "concat" else 0
        tp = SPLITS[r.tp] + (" (GLU: [gate_r; up_r])" if parts == 2 else f" (each of the {parts} parts: [part_r, ...])"
                             if parts > 2 else "")
        out.append((r.mm, hf, fuse, tp, _place(r, cfg)))
    return out


def _hf_name(name: str, views, layer: int) -> str:
    """A rule's HF name; for an expert's weight, the fused tensor it is a view of (hub layout)."""
    v = views.get(name.format(i=layer, e=0))
    if v is None:
        return name
    real = v.real.replace(f".{layer}.", ".{i}.", 1)
    rows, cols = v.shape
    box = f"[{{e}}, :, {v.start[1]}:{v.start[1] + rows}]" if v.transpose else f"[{{e}}, {v.start[0]}:{v.start[0] + rows}, :]"
    return f"{real}{box}{'ᵀ' if v.transpose else ''}"


def _place(r: Rule, cfg) -> str:
    where = {"first": "first stage of the module", "last": "last stage of the module", "layer": "per layer"}[r.place]
    if r.copy:
        where += " (copy of the tied embedding, pp > 1 only)"
    if r.layers is not None and r.place == "layer":
        moe = set(cfg.text.moe_layers)
        if r.layers == moe and moe:
            where = "per MoE layer"
        elif r.layers == set(range(cfg.text.num_layers)) - moe and r.module == "llm":
            where = "per dense layer"
        else:
            where = f"on {'vision block' if r.module == 'vit' else 'layer'} {', '.join(map(str, sorted(r.layers)))}"
    if r.experts:
        where += ", per expert (EP splits experts)"
    return where


def markdown(spec, cfg, title: str) -> str:
    lines = [f"### {title}", "", "| MM tensor | HF tensor(s) | fusion | TP split | placement |", "|---|---|---|---|---|"]
    lines += [f"| `{mm}` | {' + '.join(f'`{h}`' for h in hf.split(' + '))} | {fuse} | {tp} | {place} |"
              for mm, hf, fuse, tp, place in rows(spec, cfg)]
    return "\n".join(lines) + "\n"


def doc_configs():
    """(spec, size, config) per family: its first published size, and each later one with MM tensors the sizes
    before did not have (a mixture of experts, another vision block kind)."""
    from .testing import published_config_path

    for spec in FAMILIES:
        picked, names = [], set()
        for size in spec.PUBLISHED:
            cfg = spec.config_from_hf(json.loads(published_config_path(size, spec.NAME).read_text()), size)
            mm = {r.mm for r in spec.rules(cfg, 2)}
            if not picked or mm - names:
                picked.append((spec, size, cfg))
                names |= mm
        yield from picked


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.parse_args(argv)
    for spec, size, cfg in doc_configs():
        print(markdown(spec, cfg, f"{spec.NAME} ({size.replace('_', '-').upper()} config)"))


if __name__ == "__main__":
    main()
