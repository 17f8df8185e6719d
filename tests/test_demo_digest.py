"""The demo's conversions (and the other writing commands on tiny checkpoints) write the same bytes as recorded
in tests/data/demo_digest.json: a refactor of the write path must not change a single output byte.

Manifests are compared after dropping what legitimately differs between runs: absolute paths (made relative to
the work directory), source mtimes and sizes in the source identities (a source manifest's size follows its
paths), the plan id (a hash over those) and the tool version. Re-record (only for an intended output change):

    .venv/bin/python tests/test_demo_digest.py
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

DIGEST = Path(__file__).resolve().parent / "data" / "demo_digest.json"
MANIFEST = "mm_convert_manifest.json"


def _relative(value, work: Path):
    if isinstance(value, str) and value.startswith(str(work)):
        return Path(value).relative_to(work).as_posix()
    return value


def normalized_manifest(path: Path, work: Path) -> bytes:
    doc = json.loads(path.read_text())
    for k in ("plan", "version"):
        doc.pop(k, None)
    doc["source"] = _relative(doc.get("source"), work)
    for k in ("source_identity", "reference"):
        ident = doc.get(k)
        if isinstance(ident, dict):
            doc[k] = {"path": _relative(ident["path"], work), "files": sorted(ident["files"])}
    return json.dumps(doc, sort_keys=True).encode()


def digest(work: Path) -> dict[str, str]:
    """sha256 of every file under ``work`` (manifests normalized), by path relative to it."""
    out = {}
    for p in sorted(work.rglob("*")):
        if p.is_file():
            data = normalized_manifest(p, work) if p.name == MANIFEST else p.read_bytes()
            out[p.relative_to(work).as_posix()] = hashlib.sha256(data).hexdigest()
    return out


def run_conversions(work: Path) -> None:
    """The demo (HF -> MM tp2 pp2 -> resplit tp1 pp2 vpp2 -> HF), then torch_dist and, on a tiny Qwen3-VL MoE,
    EP shards, their resplit and the DCP round trip."""
    from mm_convert import Qwen2_5_VLConverter, Qwen3VLConverter
    from mm_convert.demo import main as demo
    from mm_convert.testing import make_tiny_hf_checkpoint

    assert demo(["--workdir", str(work / "demo")]) == 0
    Qwen2_5_VLConverter(progress=False).hf_to_mm(work / "demo" / "hf", work / "dist", save_format="torch_dist")
    moe = make_tiny_hf_checkpoint(work / "moe_hf", dtype="bfloat16", family_name="Qwen3-VL", variant="moe")
    conv = Qwen3VLConverter(progress=False)
    conv.hf_to_mm(moe, work / "moe_ep2", tp_size=2, ep_size=2, llm_pp_layers=[[1, 3]], vit_pp_layers=[[4, 0]])
    conv.resplit(work / "moe_ep2", work / "moe_tp1", tp_size=1, llm_pp_layers=[4], vit_pp_layers=[4])
    conv.mm_to_hf(work / "moe_tp1", work / "moe_back", hf_dir=moe, max_shard_size="100KB")
    conv.hf_to_dcp(moe, work / "moe_dcp")
    conv.dcp_to_hf(work / "moe_dcp", work / "moe_dcp_back", hf_dir=moe)


def test_outputs_match_recorded_digest(tmp_path):
    run_conversions(tmp_path)
    want = json.loads(DIGEST.read_text())
    have = digest(tmp_path)
    assert sorted(have) == sorted(want), (f"files differ: only now {sorted(set(have) - set(want))[:5]}, "
                                          f"only recorded {sorted(set(want) - set(have))[:5]}")
    changed = [k for k in want if have[k] != want[k]]
    assert not changed, f"{len(changed)} of {len(want)} files differ from {DIGEST.name} (first: {changed[:5]})"


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        run_conversions(Path(d))
        DIGEST.parent.mkdir(exist_ok=True)
        DIGEST.write_text(json.dumps(digest(Path(d)), indent=1, sort_keys=True) + "\n")
    print(f"recorded {DIGEST}", file=sys.stderr)
