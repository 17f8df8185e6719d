"""The bad-input catalogue (issue 5): every case is one command line that must fail with one line naming the
file / key / option and what was expected, a non-zero exit, no traceback (unless --debug), and no output
directory left behind that looks complete (neither the final name nor the temporary sibling).

The commands run in-process through click's CliRunner (the same ``main`` the ``mm-convert`` script runs, with
stdout and stderr captured apart) to keep the catalogue fast; test_crash.py runs real subprocesses. The table in
docs/errors.md lists these cases; ``MM_CONVERT_ERRORS_MD=path pytest tests/test_failsafe.py`` rewrites it from
the messages actually printed.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mm_convert import manifest as manifest_mod
from mm_convert.cli import main
from mm_convert.testing import tiny_config_dict

CONV = "Qwen2_5_VLConverter"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "errors.md"


class Payload:
    """A pickle that runs code when loaded without weights_only: it creates the file ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@dataclass
class Env:
    tmp: Path
    sources: dict

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def hf(self, which="tiny") -> Path:
        d = self.tmp / f"hf_{which}"
        if not d.exists():
            shutil.copytree(self.sources[which], d)
        return d

    def mm(self, which="mm") -> Path:
        d = self.tmp / which
        if not d.exists():
            shutil.copytree(self.sources[which], d)
        return d

    def hf_to_mm(self, hf=None, llm="[4]", vit="[4]", tp=1, out=None, extra=(), conv=CONV):
        return [conv, "hf_to_mm", "--cfg.mm_dir", out or self.out, "--cfg.hf_config.hf_dir", hf or self.hf(),
                "--cfg.parallel_config.llm_pp_layers", llm, "--cfg.parallel_config.vit_pp_layers", vit,
                "--cfg.parallel_config.tp_size", tp, "-q", *extra]

    def mm_to_hf(self, mm=None, extra=()):
        return [CONV, "mm_to_hf", "--cfg.mm_dir", mm or self.mm(), "--cfg.save_hf_dir", self.out, "-q", *extra]


@dataclass
class Case:
    id: str
    what: str
    setup: Callable[[Env], list]
    needle: str
    code: int = 2
    out_may_exist: bool = False   # the case is about an existing output: it must be left as it was


CASES: list[Case] = []


def case(id, what, needle, code=2, out_may_exist=False):
    def deco(fn):
        CASES.append(Case(id, what, fn, needle, code, out_may_exist))
        return fn
    return deco


def _edit_config(d: Path, fn) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(f: Path, fn) -> None:
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


def _shard(mm: Path, rank="mp_rank_01_001") -> Path:
    return mm / "release" / rank / "model_optim_rng.pt"


# ---- HF input -------------------------------------------------------------------------------------------
@case("config_missing", "HF dir without config.json", "config.json: missing")
def _(e):
    (e.hf() / "config.json").unlink()
    return e.hf_to_mm()


@case("config_not_json", "config.json is not JSON", "config.json: not valid JSON")
def _(e):
    (e.hf() / "config.json").write_text("{ not json")
    return e.hf_to_mm()


@case("config_not_qwen2_5_vl", "config.json of another model (model_type llama)", "model_type is 'llama', expected")
def _(e):
    _edit_config(e.hf(), lambda c: c.update(model_type="llama"))
    return e.hf_to_mm()


@case("config_no_vision", "Qwen2.5-VL model_type but no vision_config", "vision_config missing")
def _(e):
    _edit_config(e.hf(), lambda c: c.pop("vision_config"))
    return e.hf_to_mm()


@case("hf_dir_not_a_directory", "--cfg.hf_config.hf_dir names a file", "--cfg.hf_config.hf_dir")
def _(e):
    f = e.tmp / "afile"
    f.write_text("x")
    return e.hf_to_mm(hf=f)


@case("no_weights", "HF dir with config.json but no safetensors", "no model.safetensors or model.safetensors.index.json")
def _(e):
    (e.hf() / "model.safetensors").unlink()
    return e.hf_to_mm()


@case("index_names_missing_file", "shard file named in the index is missing", "missing; model.safetensors.index.json lists it")
def _(e):
    hf = e.hf("sharded")
    sorted(hf.glob("model-*.safetensors"))[-1].unlink()
    return e.hf_to_mm(hf=hf)


@case("index_names_missing_tensor", "the index places a tensor in a file that does not hold it", "which model.safetensors.index.json places there")
def _(e):
    hf = e.hf("sharded")
    idx = json.loads((hf / "model.safetensors.index.json").read_text())
    wm = idx["weight_map"]
    k = "model.norm.weight"
    others = sorted(set(wm.values()) - {wm[k]})
    wm[k] = others[0]
    (hf / "model.safetensors.index.json").write_text(json.dumps(idx))
    return e.hf_to_mm(hf=hf)


@case("truncated_safetensors", "safetensors file cut short", "model.safetensors:")
def _(e):
    f = e.hf() / "model.safetensors"
    os.truncate(f, f.stat().st_size - 1000)
    return e.hf_to_mm()


def _rewrite_header(f: Path, fn, tail: bytes = b"") -> None:
    """Rewrite a safetensors file's JSON header through ``fn`` (data bytes kept), optionally with bytes appended."""
    import struct
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    fn(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    f.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:] + tail)


@case("safetensors_header_wrong_size", "a header entry whose byte span does not fit its dtype x shape",
      "but F32 x [64] needs 256")
def _(e):
    def shrink(h):
        h["model.norm.weight"]["data_offsets"][1] -= 4
    _rewrite_header(e.hf() / "model.safetensors", shrink)
    return e.hf_to_mm()


@case("safetensors_header_overlap", "two header entries sharing bytes (the next one moved back)", "an overlap")
def _(e):
    def overlap(h):
        spans = sorted((v["data_offsets"][0], k) for k, v in h.items() if k != "__metadata__")
        key = spans[1][1]
        h[key]["data_offsets"] = [o - 4 for o in h[key]["data_offsets"]]
    _rewrite_header(e.hf() / "model.safetensors", overlap)
    return e.hf_to_mm()


@case("safetensors_trailing_bytes", "bytes after the last tensor the header describes", "bytes after the last tensor")
def _(e):
    _rewrite_header(e.hf() / "model.safetensors", lambda h: None, tail=b"\0" * 16)
    return e.hf_to_mm()


@case("corrupt_safetensors_header", "safetensors header overwritten with garbage", "not a readable safetensors file")
def _(e):
    f = e.hf() / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.seek(8)
        fh.write(b"#" * 40)
    return e.hf_to_mm()


@case("tensor_wrong_shape", "a tensor of the wrong shape for config.json", "model.norm.weight has shape [63], config.json expects [64]")
def _(e):
    _edit_tensors(e.hf() / "model.safetensors", lambda sd: sd.update({"model.norm.weight": sd["model.norm.weight"][:63].clone()}))
    return e.hf_to_mm()


@case("tensor_missing", "a tensor the config needs is absent", "tensor model.layers.3.mlp.up_proj.weight is missing")
def _(e):
    _edit_tensors(e.hf() / "model.safetensors", lambda sd: sd.pop("model.layers.3.mlp.up_proj.weight"))
    return e.hf_to_mm()


@case("unknown_extra_tensor", "a tensor that is not part of Qwen2.5-VL", "unexpected tensor model.layers.0.mlp.extra.weight")
def _(e):
    _edit_tensors(e.hf() / "model.safetensors", lambda sd: sd.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    return e.hf_to_mm()


@case("mixed_dtypes_hf", "one tensor in bfloat16, the rest float32", "model.norm.weight is bfloat16, the other tensors are float32")
def _(e):
    _edit_tensors(e.hf() / "model.safetensors", lambda sd: sd.update({"model.norm.weight": sd["model.norm.weight"].bfloat16()}))
    return e.hf_to_mm()


@case("layer_sum_off", "LLM layer list sums to 3, config has 4", "--cfg.parallel_config.llm_pp_layers [[1,2]] sums to 3")
def _(e):
    return e.hf_to_mm(llm="[1,2]", vit="[4,0]")


@case("llm_before_vision", "an LLM layer placed before the last vision layer", "vision encoder must come before the LLM")
def _(e):
    return e.hf_to_mm(llm="[1,3]", vit="[2,2]")


@case("tp_not_dividing_heads", "tp 3 with 4 attention heads", "--cfg.parallel_config.tp_size 3 does not divide the num_attention_heads (4)")
def _(e):
    return e.hf_to_mm(tp=3)


@case("tp_not_dividing_kv_heads", "tp 4 with 2 key-value heads", "num_key_value_heads (2)")
def _(e):
    return e.hf_to_mm(tp=4)


@case("tp_not_dividing_ffn", "tp 2 with intermediate_size 97", "intermediate_size (97)")
def _(e):
    return e.hf_to_mm(hf=e.hf("ffn97"), tp=2)


@case("tp_not_dividing_vocab", "tp 2 with vocab_size 321", "vocab_size (321)")
def _(e):
    return e.hf_to_mm(hf=e.hf("vocab321"), tp=2)


@case("ep_on_dense_model", "--cfg.parallel_config.ep_size 2 for a dense model", "ep_size 2: this Qwen2.5-VL model has no experts")
def _(e):
    return e.hf_to_mm(extra=["--cfg.parallel_config.ep_size", "2"])


@case("ep_not_dividing_experts", "ep 3 with 8 experts (Qwen3-VL MoE)", "ep_size 3 does not divide the num_experts (8)")
def _(e):
    return e.hf_to_mm(hf=e.hf("moe"), conv="Qwen3VLMegatronConverter", extra=["--cfg.parallel_config.ep_size", "3"])


@case("wrong_family_converter", "a Qwen3-VL checkpoint given to Qwen2_5_VLConverter", "model_type is 'qwen3_vl_moe', expected one of ['qwen2_5_vl']")
def _(e):
    return e.hf_to_mm(hf=e.hf("moe"))


# ---- MM input -------------------------------------------------------------------------------------------
@case("tracker_wrong_iteration", "latest_checkpointed_iteration.txt names an iteration that is not there",
      "names iteration '5000' but")
def _(e):
    (e.mm() / "latest_checkpointed_iteration.txt").write_text("5000\n")
    return e.mm_to_hf()


@case("tracker_garbage", "latest_checkpointed_iteration.txt holds neither 'release' nor a number",
      "holds 'latest'; expected 'release' or an iteration number")
def _(e):
    (e.mm() / "latest_checkpointed_iteration.txt").write_text("latest\n")
    return e.mm_to_hf()


@case("tracker_missing", "MM dir without latest_checkpointed_iteration.txt", "latest_checkpointed_iteration.txt: missing")
def _(e):
    (e.mm() / "latest_checkpointed_iteration.txt").unlink()
    return e.mm_to_hf()


@case("missing_mp_rank_dir", "one mp_rank directory of a tp2 x pp2 checkpoint removed",
      "mp_rank_01_001/model_optim_rng.pt: missing; the checkpoint has tp=2 pp=2")
def _(e):
    shutil.rmtree(e.mm() / "release" / "mp_rank_01_001")
    return e.mm_to_hf()


@case("shard_from_other_layout", "a tp1 shard copied over a tp2 rank",
      "linear_proj.weight has shape [64, 64], expected [64, 32] for this layout and config")
def _(e):
    mm = e.mm()
    (mm / "mm_convert_manifest.json").unlink()  # a hand-assembled dir has no manifest
    shutil.copyfile(_shard(e.mm("mm_tp1pp2"), "mp_rank_00_001"), _shard(mm))
    return e.mm_to_hf(extra=["--cfg.hf_config.hf_dir", e.hf()])


@case("truncated_shard_manifest", "MM shard cut short (the manifest records its size)",
      "mp_rank_01_001/model_optim_rng.pt: 1000 bytes, mm_convert_manifest.json records")
def _(e):
    os.truncate(_shard(e.mm()), 1000)
    return e.mm_to_hf()


@case("truncated_shard", "MM shard cut short, no manifest", "mp_rank_01_001/model_optim_rng.pt: not a readable torch checkpoint, truncated or corrupt")
def _(e):
    mm = e.mm()
    (mm / "mm_convert_manifest.json").unlink()
    os.truncate(_shard(mm), 1000)
    return e.mm_to_hf(extra=["--cfg.hf_config.hf_dir", e.hf()])


@case("corrupt_shard", "MM shard's zip directory overwritten (same size)", "mp_rank_01_001/model_optim_rng.pt: not a readable torch checkpoint")
def _(e):
    f = _shard(e.mm())
    with open(f, "r+b") as fh:
        fh.seek(-200, os.SEEK_END)
        fh.write(b"\xff" * 200)
    return e.mm_to_hf()


@case("pickle_needs_code", "MM shard whose pickle would run code (crafted payload)",
      "refused, its pickle names __builtin__.getattr, which is neither tensor data nor a data-only object")
def _(e):
    mm = e.mm()
    marker = e.tmp / "PWNED"
    sd = torch.load(_shard(mm), weights_only=True)
    sd["args"] = Payload(str(marker))
    torch.save(sd, _shard(mm))
    (mm / "mm_convert_manifest.json").unlink()
    e.marker = marker
    return e.mm_to_hf(extra=["--cfg.hf_config.hf_dir", e.hf()])


@case("mixed_dtypes_mm", "one MM tensor in bfloat16, the rest float32",
      "is bfloat16, the other tensors are float32; expected one dtype throughout")
def _(e):
    mm = e.mm()
    sd = torch.load(_shard(mm), weights_only=True)
    k = "text_decoder.decoder.final_layernorm.weight"
    sd["model"][k] = sd["model"][k].bfloat16()
    torch.save(sd, _shard(mm))
    (mm / "mm_convert_manifest.json").unlink()
    return e.mm_to_hf(extra=["--cfg.hf_config.hf_dir", e.hf()])


@case("mm_without_config", "MM dir without manifest and no --cfg.hf_config.hf_dir", "no mm_convert_manifest.json with the model config")
def _(e):
    (e.mm() / "mm_convert_manifest.json").unlink()
    return e.mm_to_hf()


def _flip_tensor_byte(shard: Path) -> None:
    """One byte flipped inside the largest tensor storage record of a torch zip shard (its size unchanged). On
    the pipeline's last stage that is the TP-split output layer, which every conversion reads from each rank (a
    replicated tensor, like stage 0's patch embedding, is read from TP rank 0 only: a flip in another rank's copy
    is not passed on, and verify's manifest check is what finds it)."""
    from mm_convert.integrity import zip_records
    rec = max((r for r in zip_records(str(shard)) if "/data/" in r.name), key=lambda r: r.size)
    with open(shard, "r+b") as fh:
        fh.seek(rec.start + 5)
        b = fh.read(1)
        fh.seek(rec.start + 5)
        fh.write(bytes([b[0] ^ 0x40]))


@case("mm_flipped_byte", "one byte flipped in a tensor's data of a shard that has a manifest (sizes match)",
      "fails its CRC-32 check")
def _(e):
    _flip_tensor_byte(_shard(e.mm(), "mp_rank_00_001"))
    return e.mm_to_hf()


@case("mm_flipped_byte_no_manifest", "the same in a checkpoint without a manifest (as Megatron writes them)",
      "fails its CRC-32 check")
def _(e):
    (e.mm() / "mm_convert_manifest.json").unlink()
    _flip_tensor_byte(_shard(e.mm(), "mp_rank_01_001"))
    return e.mm_to_hf(extra=["--cfg.hf_config.hf_dir", e.hf()])


@case("resplit_flipped_byte", "resplit of a shard with one byte flipped in a tensor's data", "fails its CRC-32 check")
def _(e):
    _flip_tensor_byte(_shard(e.mm(), "mp_rank_01_001"))
    return [CONV, "resplit", "--cfg.source_dir", e.mm(), "--cfg.target_dir", e.out, "--cfg.target_parallel_config.tp_size",
            "1", "--cfg.target_parallel_config.llm_pp_layers", "[4]", "--cfg.target_parallel_config.vit_pp_layers", "[4]", "-q"]


@case("layout_mismatch", "--cfg.parallel_config.tp_size 1 given for a tp2 checkpoint", "does not match the shards")
def _(e):
    return e.mm_to_hf(extra=["--cfg.parallel_config.tp_size", "1"])


@case("bad_max_shard_size", "--cfg.max_shard_size not a size", "--cfg.max_shard_size 'lots': expected a size")
def _(e):
    return e.mm_to_hf(extra=["--cfg.max_shard_size", "lots"])


@case("verify_corrupt_file", "verify: a shard's bytes changed after conversion (same size)",
      "manifest mismatch: ", code=1, out_may_exist=True)
def _(e):
    mm = e.mm()
    f = _shard(mm)
    with open(f, "r+b") as fh:
        fh.seek(f.stat().st_size // 2)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([b[0] ^ 1]))
    e.expect_in = "mp_rank_01_001/model_optim_rng.pt: sha256 differs from mm_convert_manifest.json"
    return [CONV, "verify", "--cfg.mm_dir", mm]


@case("verify_no_manifest", "verify without HF dir on a directory that has no manifest",
      "mm_convert_manifest.json: missing; expected the manifest")
def _(e):
    mm = e.mm()
    (mm / "mm_convert_manifest.json").unlink()
    return [CONV, "verify", "--cfg.mm_dir", mm]


# ---- output location ------------------------------------------------------------------------------------
@case("output_inside_source", "output directory inside the HF source", "overlaps the source")
def _(e):
    hf = e.hf()
    e.watch = hf
    return e.hf_to_mm(out=hf / "mm")


@case("source_inside_output", "resplit target that contains the source", "overlaps the source")
def _(e):
    mm = e.mm()
    return [CONV, "resplit", "--cfg.source_dir", mm, "--cfg.target_dir", mm.parent, "--overwrite", "-q"]


@case("output_exists", "non-empty output directory without --overwrite", "exists and is not empty; pass --overwrite", out_may_exist=True)
def _(e):
    e.out.mkdir()
    (e.out / "old.txt").write_text("keep me")
    return e.hf_to_mm()


@case("output_is_a_file", "output path is an existing file", "exists and is not a directory", out_may_exist=True)
def _(e):
    e.out.write_text("keep me")
    return e.hf_to_mm()


@case("output_under_a_file", "output parent is a regular file (cannot be created)", "is not a directory; expected a directory path to write under")
def _(e):
    (e.tmp / "blocker").write_text("x")
    e.alt_out = e.tmp / "blocker" / "out"
    return e.hf_to_mm(out=e.alt_out)


@case("read_only_location", "output in a location the process may not write (/sys; tests run as root, where chmod "
      "does not stop writes)", "cannot write in /sys (Operation not permitted)")
def _(e):
    e.alt_out = Path("/sys/mm_convert_failsafe_out")
    return e.hf_to_mm(out=e.alt_out)


@case("disk_full", "ENOSPC while writing a shard (simulated: the file object's write raises ENOSPC after 300 kB)",
      "cannot write (No space left on device)", code=2)
def _(e):
    real_open = open

    class Full:
        def __init__(self, fh):
            self.fh, self.n = fh, 0

        def __getattr__(self, a):
            return getattr(self.fh, a)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return self.fh.__exit__(*a)

        def write(self, b):
            self.n += len(memoryview(b).cast("B"))
            if self.n > 300_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.fh.write(b)

    e.patch = (manifest_mod, "open", lambda p, mode="r", *a, **k: Full(real_open(p, mode, *a, **k)) if "b" in mode else real_open(p, mode, *a, **k))
    return e.hf_to_mm(tp=2)


@case("concurrent_run", "a second run to an output another run is writing (its temporary directory is locked)",
      "another mm-convert process is writing it")
def _(e):
    import fcntl
    tmp = e.tmp / ".out.mm_convert-tmp"
    tmp.mkdir()
    (tmp / "part.pt").write_bytes(b"in progress")
    e.other = os.open(tmp, os.O_RDONLY)
    fcntl.flock(e.other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return e.hf_to_mm(extra=["--resume"])


# ---- the runner -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sources(tiny_hf, tmp_path_factory):
    from mm_convert import Qwen2_5_VLConverter
    from mm_convert.testing.synthetic import write_synthetic_checkpoint
    conv = Qwen2_5_VLConverter(progress=False)
    root = tmp_path_factory.mktemp("failsafe_src")
    from mm_convert.testing import make_tiny_hf_checkpoint
    src = {"tiny": tiny_hf(), "sharded": tiny_hf(sharded=True),
           "moe": make_tiny_hf_checkpoint(root / "moe", family_name="Qwen3-VL", variant="moe")}
    for name, over in (("ffn97", {"intermediate_size": 97}), ("vocab321", {"vocab_size": 321})):
        (root / f"{name}.json").write_text(json.dumps(tiny_config_dict(**over)))
        src[name] = write_synthetic_checkpoint(root / f"{name}.json", root / name, dtype=torch.float32)
    src["mm"] = root / "mm"
    conv.hf_to_mm(src["tiny"], src["mm"], tp_size=2, llm_pp_layers=[1, 3], vit_pp_layers=[4, 0])
    src["mm_tp1pp2"] = root / "mm_tp1pp2"
    conv.hf_to_mm(src["tiny"], src["mm_tp1pp2"], tp_size=1, llm_pp_layers=[1, 3], vit_pp_layers=[4, 0])
    return src


MESSAGES: dict[str, tuple[str, int]] = {}


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input(c: Case, sources, tmp_path, monkeypatch):
    e = Env(tmp_path, sources)
    args = [str(a) for a in c.setup(e)]
    if getattr(e, "patch", None):
        monkeypatch.setattr(*e.patch, raising=False)
    watched = {n: _tree(Path(sources[n])) for n in ("tiny", "mm")}
    before = _tree(e.watch) if getattr(e, "watch", None) else None
    out_before = _tree(e.out) if e.out.is_dir() else (e.out.read_text() if e.out.is_file() else None)

    r = CliRunner().invoke(main, args)

    assert r.exit_code == c.code, (r.exit_code, r.stdout, r.stderr, r.exception)
    assert isinstance(r.exception, SystemExit) or (r.exception is None and c.code == 0), repr(r.exception)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr + r.stdout
    if c.code == 2:
        assert len(err) == 1 and err[0].startswith("mm-convert: error: "), r.stderr
        assert c.needle in err[0], err[0]
        line = err[0]
    else:
        line = next(ln for ln in err if c.needle in ln)
        assert getattr(e, "expect_in", "") in line, line
    MESSAGES[c.id] = (line, r.exit_code)
    # nothing left that looks like an output
    out = getattr(e, "alt_out", e.out)
    if c.out_may_exist:
        after = _tree(out) if out.is_dir() else (out.read_text() if out.is_file() else None)
        if c.id != "verify_corrupt_file":
            assert after == out_before
    else:
        assert not out.exists(), sorted(out.rglob("*"))
    if getattr(e, "other", None) is not None:  # the other run's directory is left alone
        assert (tmp_path / ".out.mm_convert-tmp" / "part.pt").read_bytes() == b"in progress"
        os.close(e.other)
    else:
        assert not (out.parent / f".{out.name}.mm_convert-tmp").exists()
        assert not list(tmp_path.glob(".*mm_convert-*"))
    # sources are never written to
    for n, t in watched.items():
        assert _tree(Path(sources[n])) == t
    if before is not None:
        assert _tree(e.watch) == before
    if c.id == "pickle_needs_code":
        assert not e.marker.exists(), "the payload ran"


def test_debug_shows_traceback(sources, tmp_path):
    e = Env(tmp_path, sources)
    r = CliRunner().invoke(main, [str(a) for a in e.hf_to_mm(llm="[1,2]", vit="[4,0]", extra=["--debug"])])
    assert r.exit_code == 2 and "Traceback" in r.stderr and "mm-convert: error: " in r.stderr


def test_payload_is_live_and_never_runs(sources, tmp_path):
    """The crafted payload does run under a plain unpickler (so the test means something), and not under ours."""
    from mm_convert.errors import CheckpointError
    from mm_convert.formats.mm import load_torch_file
    f, marker = tmp_path / "evil.pt", tmp_path / "PWNED"
    torch.save({"model": {"w": torch.zeros(2)}, "x": Payload(str(marker))}, f)
    with pytest.raises(CheckpointError, match="refused, its pickle names __builtin__.getattr"):
        load_torch_file(f)
    assert not marker.exists()
    torch.load(f, weights_only=False)  # the unsafe way: the payload runs
    assert marker.exists()


def test_catalogue_is_documented():
    """docs/errors.md lists every case (at least 25), and MM_CONVERT_ERRORS_MD regenerates its table."""
    assert len(CASES) + 1 >= 25  # + the SIGINT case of test_crash.py
    target = os.environ.get("MM_CONVERT_ERRORS_MD")
    if target and len(MESSAGES) == len(CASES):
        _write_table(Path(target))
    text = DOCS.read_text()
    for c in CASES:
        assert f"`{c.id}`" in text, f"docs/errors.md does not list {c.id}"
    assert "`interrupted_sigint`" in text


def _write_table(path: Path) -> None:
    rows = ["| case | bad input | message (one line on stderr) | exit |", "|---|---|---|---|"]
    for c in CASES:
        msg, code = MESSAGES[c.id]
        msg = msg.replace(str(Path("/tmp")), "/tmp").replace("|", "\\|")
        import re
        msg = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/ ]+?/", "…/", msg)
        msg = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/", "…/", msg)
        rows.append(f"| `{c.id}` | {c.what} | `{msg}` | {code} |")
    rows.append("| `interrupted_sigint` | SIGINT (Ctrl-C) while writing (tests/test_crash.py) | "
                "`mm-convert: interrupted; nothing was written at the destination (finished files are kept for --resume)` | 130 |")
    text = path.read_text() if path.exists() else ""
    start, end = "<!-- catalogue:start -->", "<!-- catalogue:end -->"
    table = start + "\n" + "\n".join(rows) + "\n" + end
    if start in text and end in text:
        text = text[: text.index(start)] + table + text[text.index(end) + len(end):]
    else:
        text += "\n" + table + "\n"
    path.write_text(text)


def test_real_process_sample(sources, tmp_path):
    """A sample of the catalogue through the real entry point (a separate Python process): same one line,
    same exit code, no traceback, nothing left."""
    import subprocess
    import sys
    by_id = {c.id: c for c in CASES}
    for cid in ("truncated_safetensors", "pickle_needs_code"):
        d = tmp_path / cid
        d.mkdir()
        e = Env(d, sources)
        c = by_id[cid]
        args = [str(a) for a in c.setup(e)]
        p = subprocess.run([sys.executable, "-m", "mm_convert.cli", *args], capture_output=True, text=True)
        assert p.returncode == c.code, p.stderr
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("mm-convert: error: ") and c.needle in lines[0], p.stderr
        assert not e.out.exists() and not list(d.glob(".*mm_convert-*"))
        if cid == "pickle_needs_code":
            assert not e.marker.exists()
