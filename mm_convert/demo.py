"""The embedded default job: a tiny Qwen2.5-VL checkpoint (bundled config, random weights) converted
HF -> MM tp2/pp2 -> resplit tp1/pp4 with virtual pipeline -> HF, then checked bit for bit and by logits.

    python -m mm_convert.demo [--workdir out/demo]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .models import DEFAULT


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="out/demo", help="where the checkpoints are written (replaced)")
    args = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from .converter import CONVERTERS
    from .execute import same_bits
    from .formats.hf import HFReader
    from .testing import make_tiny_hf_checkpoint

    con = Console(soft_wrap=True)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    hf, mm, mm2, back = work / "hf", work / "mm_tp2_pp2", work / "mm_tp1_pp2_vpp2", work / "hf_back"
    make_tiny_hf_checkpoint(hf, dtype="bfloat16", max_shard_size="100KB")
    conv = CONVERTERS[DEFAULT.CONVERTER](progress=False)
    steps = [
        conv.hf_to_mm(hf, mm, tp_size=2, llm_pp_layers=[[1, 3]], vit_pp_layers=[[4, 0]]),
        conv.resplit(mm, mm2, tp_size=1, llm_pp_layers=[[0, 1], [1, 2]], vit_pp_layers=[[4, 0], [0, 0]]),
        conv.mm_to_hf(mm2, back, hf_dir=hf, max_shard_size="100KB"),
    ]
    table = Table(title=f"mm_convert demo: tiny {DEFAULT.NAME} (bf16, bundled config)", title_justify="left")
    for c in ("step", "layout", "files", "tensors", "bytes"):
        table.add_column(c)
    for r in steps:
        table.add_row(r.command, r.layout, str(len(r.files)), str(r.tensors), f"{sum(f.nbytes for f in r.files):,}")
    con.print(table)

    rep1, rep2 = conv.verify(hf, mm), conv.verify(hf, mm2)
    a, b = HFReader(hf), HFReader(back)
    same_keys = set(a.names()) == set(b.names())
    diff = [n for n in a.names() if n not in b.names() or not same_bits(a.read(n), b.read(n))]
    logit_diff = _logit_diff(hf, back)
    ok = rep1.ok and rep2.ok and same_keys and not diff and logit_diff == 0.0
    con.print(f"verify HF vs {mm.name}: {rep1.summary()}")
    con.print(f"verify HF vs {mm2.name}: {rep2.summary()}")
    con.print(f"round trip HF -> MM -> resplit -> HF: {len(a.names())} tensors, key set {'equal' if same_keys else 'DIFFERENT'}, "
              f"{len(diff)} differ in bits")
    con.print(f"transformers logits, original vs round-tripped: max abs difference {logit_diff}")
    con.print(f"[bold {'green' if ok else 'red'}]{'PASS' if ok else 'FAIL'}[/] (outputs in {work})")
    return 0 if ok else 1


def _logit_diff(hf_a: Path, hf_b: Path) -> float:
    import torch
    import transformers
    model_cls = getattr(transformers, next(iter(DEFAULT.HF_CLASSES.values()))[1])
    ids = torch.arange(1, 17).unsqueeze(0)
    out = []
    for d in (hf_a, hf_b):
        m = model_cls.from_pretrained(d, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            out.append(m(input_ids=ids).logits)
    return (out[0] - out[1]).abs().max().item()


if __name__ == "__main__":
    sys.exit(main())
