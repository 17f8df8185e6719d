"""Outputs (issue 5): the checksummed manifest, verify against it, --overwrite replacing an output as a whole,
--resume keeping only journaled files that still match (and only for the same plan), sources never written,
and no unsafe unpickling anywhere in the package."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mm_convert.cli import main
from mm_convert.manifest import MANIFEST, check_manifest, start_journal

CONV = "Qwen2_5_VLConverter"
LAYOUT = dict(tp_size=2, llm_pp_layers=[1, 3], vit_pp_layers=[4, 0])


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _stat_tree(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


@pytest.fixture(scope="module")
def made(tiny_hf, tmp_path_factory):
    from mm_convert import Qwen2_5_VLConverter
    conv = Qwen2_5_VLConverter(progress=False)
    hf = tiny_hf()
    root = tmp_path_factory.mktemp("failsafe_out")
    hf_tree = _stat_tree(hf)
    conv.hf_to_mm(hf, root / "mm", **LAYOUT)
    conv.mm_to_hf(root / "mm", root / "hf_back", hf_dir=hf, max_shard_size="300KB")
    assert _stat_tree(hf) == hf_tree, "hf_to_mm / mm_to_hf wrote into a source"
    return hf, root


def test_manifest_records_version_command_layout_source_and_sha256(made):
    hf, root = made
    m = json.loads((root / "mm" / MANIFEST).read_text())
    assert m["tool"] == "mm_convert" and m["version"] and m["command"] == "hf_to_mm"
    assert m["layout"] == {"tp_size": 2, "vit_tp_size": 0, "llm_pp_layers": [[1, 3]], "vit_pp_layers": [[4, 0]]}
    assert m["source_identity"]["path"] == str(Path(hf).absolute())
    assert set(m["source_identity"]["files"]) == {"config.json", "model.safetensors"}
    assert re.fullmatch(r"[0-9a-f]{64}", m["plan"])
    on_disk = {str(p.relative_to(root / "mm")) for p in (root / "mm").rglob("*") if p.is_file()} - {MANIFEST}
    assert set(m["files"]) == on_disk and len(on_disk) == 5  # 4 shards + tracker
    for rel, e in m["files"].items():  # shard hashes were computed while writing: they must equal a re-read
        data = (root / "mm" / rel).read_bytes()
        assert e == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel
    h = json.loads((root / "hf_back" / MANIFEST).read_text())
    assert h["command"] == "mm_to_hf" and len([f for f in h["files"] if f.endswith(".safetensors")]) >= 2
    assert "model.safetensors.index.json" in h["files"] and "config.json" in h["files"]
    assert check_manifest(root / "hf_back") == (len(h["files"]), None)


@pytest.mark.parametrize("damage,needle", [
    ("flip", "sha256 differs from mm_convert_manifest.json"),
    ("truncate", "bytes, mm_convert_manifest.json records"),
    ("delete", "missing; mm_convert_manifest.json lists it"),
    ("stray", "not listed in mm_convert_manifest.json"),
])
def test_verify_names_the_first_mismatch(made, tmp_path, damage, needle):
    hf, root = made
    mm = tmp_path / "mm"
    shutil.copytree(root / "mm", mm)
    shard = mm / "release" / "mp_rank_01_000" / "model_optim_rng.pt"
    if damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "delete":
        shard.unlink()
    else:
        shard = mm / "release" / "notes.txt"
        shard.write_text("hi")
    r = CliRunner().invoke(main, [CONV, "verify", "--cfg.mm_dir", str(mm)])
    assert r.exit_code == 1, r.stderr
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("manifest mismatch: "))
    assert str(shard) in line and needle in line, line
    assert "Traceback" not in r.stderr
    r = CliRunner().invoke(main, [CONV, "verify", "--cfg.mm_dir", str(mm), "--cfg.hf_config.hf_dir", str(hf)])
    assert r.exit_code in (1, 2) and str(shard) in r.stderr and "Traceback" not in r.stderr


def test_verify_accepts_intact_outputs(made):
    hf, root = made
    for d in ("mm", "hf_back"):
        r = CliRunner().invoke(main, [CONV, "verify", "--cfg.mm_dir", str(root / d)])
        assert r.exit_code == 0 and "files match mm_convert_manifest.json" in r.stdout, r.stderr
    r = CliRunner().invoke(main, [CONV, "verify", "--cfg.mm_dir", str(root / "mm"), "--cfg.hf_config.hf_dir", str(hf)])
    assert r.exit_code == 0 and "bit for bit" in r.stdout and "5 files match" in r.stdout


def test_overwrite_replaces_the_whole_directory(made, conv, tmp_path):
    hf, root = made
    out = tmp_path / "mm"
    shutil.copytree(root / "mm", out)  # tp2 x pp2
    (out / "release" / "extra.bin").write_bytes(b"stale")
    conv.hf_to_mm(hf, out, tp_size=1, llm_pp_layers=[4], vit_pp_layers=[4], overwrite=True)
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == ["latest_checkpointed_iteration.txt", MANIFEST, "release/mp_rank_00/model_optim_rng.pt"]
    assert check_manifest(out)[1] is None
    assert [p.name for p in tmp_path.iterdir()] == ["mm"]  # no temp or old directory left beside it


def _interrupted(root: Path, target: Path, keep: list[str], corrupt: list[str], plan: str | None = None) -> Path:
    """Build what an interrupted run leaves: the temp dir with some journaled shards (``corrupt`` ones changed
    after they were journaled), an unjournaled half-written shard and no manifest."""
    tmp = target.parent / f".{target.name}.mm_convert-tmp"
    shutil.copytree(root, tmp)
    m = json.loads((tmp / MANIFEST).read_text())
    (tmp / MANIFEST).unlink()
    (tmp / "latest_checkpointed_iteration.txt").unlink(missing_ok=True)
    shards = sorted(r for r in m["files"] if r.endswith((".pt", ".safetensors")))
    start_journal(tmp, plan or m["plan"], {r: m["files"][r] for r in keep})
    for r in shards:
        if r not in keep:
            p = tmp / r
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])  # half-written, never journaled
    for r in corrupt:
        p = tmp / r
        data = bytearray(p.read_bytes())
        data[-100] ^= 1
        p.write_bytes(bytes(data))
    return tmp


def test_resume_keeps_matching_journaled_files_and_redoes_the_rest(made, conv, tmp_path):
    hf, root = made
    want = _files(root / "mm")
    target = tmp_path / "mm"
    keep = ["release/mp_rank_00_000/model_optim_rng.pt", "release/mp_rank_00_001/model_optim_rng.pt",
            "release/mp_rank_01_000/model_optim_rng.pt"]
    tmp = _interrupted(root / "mm", target, keep, corrupt=[keep[2]])
    kept_inode = (tmp / keep[0]).stat().st_ino
    r = conv.hf_to_mm(hf, target, **LAYOUT, resume=True)
    assert any("kept 2 finished files" in n and "wrote 2" in n for n in r.notes), r.notes
    assert _files(target) == want  # bit-identical to the uninterrupted run, manifest included
    assert (target / keep[0]).stat().st_ino == kept_inode  # really kept, not rewritten
    assert not tmp.exists()


def test_resume_of_another_plan_starts_over(made, conv, tmp_path):
    hf, root = made
    target = tmp_path / "mm"
    tmp = _interrupted(root / "mm", target, ["release/mp_rank_00_000/model_optim_rng.pt"], [], plan="0" * 64)
    r = conv.hf_to_mm(hf, target, **LAYOUT, resume=True)
    assert not any("resumed" in n for n in r.notes)
    assert _files(target) == _files(root / "mm") and not tmp.exists()


def test_resume_without_journal_or_flag_starts_over(made, conv, tmp_path):
    hf, root = made
    target = tmp_path / "mm"
    tmp = _interrupted(root / "mm", target, ["release/mp_rank_00_000/model_optim_rng.pt"], [])
    r = conv.hf_to_mm(hf, target, **LAYOUT)  # no --resume: the temp dir of the old run is discarded
    assert not any("resumed" in n for n in r.notes)
    assert _files(target) == _files(root / "mm") and not tmp.exists()


def test_resume_mm_to_hf(made, conv, tmp_path):
    hf, root = made
    want = _files(root / "hf_back")
    target = tmp_path / "hf"
    shards = sorted(r for r in want if r.endswith(".safetensors"))
    _interrupted(root / "hf_back", target, shards[:1], [])
    r = conv.mm_to_hf(root / "mm", target, hf_dir=hf, max_shard_size="300KB", resume=True)
    assert any("kept 1 finished files" in n for n in r.notes), r.notes
    assert _files(target) == want


def test_resume_resplit_and_sources_untouched(made, conv, tmp_path):
    hf, root = made
    src_tree = _stat_tree(root / "mm")
    clean = tmp_path / "clean"
    conv.resplit(root / "mm", clean, tp_size=1, llm_pp_layers=[2, 2], vit_pp_layers=[4, 0])
    target = tmp_path / "re"
    _interrupted(clean, target, ["release/mp_rank_00_001/model_optim_rng.pt"], [])
    r = conv.resplit(root / "mm", target, tp_size=1, llm_pp_layers=[2, 2], vit_pp_layers=[4, 0], resume=True)
    assert any("kept 1 finished files" in n for n in r.notes), r.notes
    assert _files(target) == _files(clean)
    assert _stat_tree(root / "mm") == src_tree


def test_no_unsafe_unpickling_in_the_package():
    """Every torch.load in mm_convert/ passes weights_only=True or the safe unpickler (safe_pickle.py); nothing
    calls pickle.load(s)."""
    pkg = Path(__file__).resolve().parent.parent / "mm_convert"
    for f in pkg.rglob("*.py"):
        text = f.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            safe = f.name == "safe_pickle.py" and "pickle_module=pickle_module" in m.group(1)
            assert "weights_only=True" in m.group(1) or safe, f"{f}: {m.group(0)}"
        assert not re.search(r"\bpickle\.loads?\(", text), f


def test_hashing_writer_large_blocks_reused_buffer_and_enospc(tmp_path):
    """Blocks >= 1 MiB are hashed on a helper thread while written; write() returns only when both are done,
    so a caller that refills its buffer right after gets the right sha256. ENOSPC names the file."""
    import errno
    import os

    import numpy as np

    from mm_convert.manifest import OutputWriteError, open_output
    buf = np.empty(3 << 19, np.uint8)
    want = hashlib.sha256()
    with open_output(tmp_path / "f.bin") as w:
        for i in range(5):
            buf[:] = i
            w.write(buf)
            want.update(buf.tobytes())
            buf[:] = 255  # reuse the buffer at once
        w.write(b"tail")
        want.update(b"tail")
    assert w.sha.hexdigest() == want.hexdigest() == hashlib.sha256((tmp_path / "f.bin").read_bytes()).hexdigest()

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, a):
            return getattr(self.fh, a)

    with pytest.raises(OutputWriteError, match=r"g\.bin: cannot write \(No space left on device\)"):
        with open_output(tmp_path / "g.bin") as w:
            w.fh = Full(w.fh)
            w.write(buf)
    assert not (tmp_path / "g.bin").exists()


def test_verify_streams_tensors_block_by_block(made, tmp_path, monkeypatch):
    """verify compares row blocks read from the files (no tensor built whole, so memory stays bounded) and still
    finds a change in the last byte of a tensor that spans many blocks."""
    import torch
    from mm_convert import Qwen2_5_VLConverter, execute
    hf, root = made
    mm = tmp_path / "mm"
    shutil.copytree(root / "mm", mm)
    (mm / MANIFEST).unlink()  # only the tensor comparison is under test here
    monkeypatch.setattr(execute, "CHUNK_BYTES", 64)
    built = []
    real = execute.materialize
    monkeypatch.setattr(execute, "materialize", lambda t, s: built.append(t.key) or real(t, s))
    fills = []
    real_fill = execute._Blocks.fill
    monkeypatch.setattr(execute._Blocks, "fill", lambda self, t, locs, r0, r1, out: fills.append(t.key) or
                        real_fill(self, t, locs, r0, r1, out))
    conv = Qwen2_5_VLConverter(progress=False)
    rep = conv.verify(hf, mm)
    assert rep.ok and rep.checked > 100 and built == []
    assert fills.count("text_decoder.embedding.word_embeddings.weight") > 100  # the embedding, block by block
    path = mm / "release" / "mp_rank_00_000" / "model_optim_rng.pt"
    sd = torch.load(path, weights_only=True)
    key = "text_decoder.embedding.word_embeddings.weight"
    assert sd["model"][key].nbytes > 64 * 100
    sd["model"][key].view(-1)[-1] += 1
    torch.save(sd, path)
    rep = conv.verify(hf, mm)
    assert rep.mismatched == [f"mp_rank_00_000/model_optim_rng.pt:model.{key}"] and not rep.ok and built == []


def test_no_verify_source_passes_a_flipped_byte_through(tiny_hf, conv, tmp_path):
    """--no-verify-source / verify_source=False is the opt-out: the same corrupt shard then converts (the
    corruption reaches the output), which is why the check is on by default."""
    from test_failsafe import _flip_tensor_byte

    from mm_convert.errors import CheckpointError

    mm = tmp_path / "mm"
    conv.hf_to_mm(tiny_hf(), mm, tp_size=2, llm_pp_layers=[1, 3], vit_pp_layers=[4, 0])
    _flip_tensor_byte(mm / "release" / "mp_rank_00_001" / "model_optim_rng.pt")
    with pytest.raises(CheckpointError, match="fails its CRC-32 check"):
        conv.mm_to_hf(mm, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    conv.mm_to_hf(mm, tmp_path / "b", verify_source=False)
    assert conv.verify(None, mm).manifest_error  # the manifest's sha256 names the file
