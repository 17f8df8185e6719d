"""MindSpeed-MM's FSDP2 checkpoints (Qwen3VLConverter hf_to_dcp / dcp_to_hf): torch.distributed.checkpoint
directories of ``{"model": {"model." + hub key: tensor}, "checkpoint_version": 3.0}``, fused expert tensors
viewed 2-D [E * A, B] of their hub layout [E, A, B].

- hf_to_dcp then dcp_to_hf is bit-exact (dense tied; MoE with hub-layout and transformers-5 "linear" files, the
  latter in the legacy key scheme) and keeps the reference's key scheme and expert layout.
- The output, loaded by torch's own DCP (into empty tensors of the expected shapes, nested as MindSpeed-MM loads
  it; and with no state dict at all, as MindSpeed-MM's dcp_to_hf does), holds exactly the HF tensors, experts
  viewed 2-D, computed here from the HF files without the converter.
- A checkpoint written by torch's ``dcp.save`` (as MindSpeed-MM saves) converts to HF; a tied model's copy of the
  embeddings and other entries (optimizer state) are skipped.
- Bad inputs are one-line errors naming the file and key: truncated record file, missing / unexpected tensor,
  wrong shape, a family without the format; the CLI round trip (our and MindSpeed-MM's option names), plan.
"""
from __future__ import annotations

import pickle
import shutil
import warnings

import pytest
import torch

from helpers import assert_same_tensors, load_hf_tensors
from mm_convert import CONVERTERS
from mm_convert.errors import CheckpointError, ConfigError

# name -> make_tiny_hf_checkpoint arguments
MODELS = {
    "dense-tied": dict(variant="", dtype="float32", tied=True),
    "moe-hub-bf16": dict(variant="moe", dtype="bfloat16", expert_layout="hub"),
    "moe-linear-legacy": dict(variant="moe", dtype="float32", expert_layout="linear", scheme="legacy"),
}
FUSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from mm_convert.testing import make_tiny_hf_checkpoint
    cache = {}

    def make(name):
        if name not in cache:
            cache[name] = make_tiny_hf_checkpoint(tmp_path_factory.mktemp(name), family_name="Qwen3-VL", **MODELS[name])
        return cache[name]
    return make


@pytest.fixture(scope="module")
def dcp_out(hf, tmp_path_factory):
    """hf_to_dcp of each model, once."""
    cache = {}

    def make(name):
        if name not in cache:
            cache[name] = tmp_path_factory.mktemp("dcp_" + name) / "dcp"
            conv().hf_to_dcp(hf(name), cache[name])
        return cache[name]
    return make


def conv():
    return CONVERTERS["Qwen3VLConverter"](progress=False)


def hub_key(key: str) -> str:
    """An HF key in the hub scheme (legacy files: ``visual.*``, ``model.layers.*``)."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + key[len("model."):]
    return key


def expected_dcp(hf_dir, linear: bool) -> dict[str, torch.Tensor]:
    """The model entry of the DCP checkpoint, from the HF files: "model." + hub key; fused experts in the hub
    layout [E, A, B] (linear files: each expert transposed), viewed [E * A, B]."""
    out = {}
    for k, v in load_hf_tensors(hf_dir).items():
        if k.endswith(FUSED):
            v = (v.transpose(1, 2) if linear else v).contiguous().reshape(-1, v.shape[1] if linear else v.shape[2])
        out["model." + hub_key(k)] = v
    return out


def _quiet_dcp():
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_bit_exact_and_dcp_loads(hf, dcp_out, tmp_path, name):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    _quiet_dcp()
    src, out = hf(name), dcp_out(name)
    it = out / "release"
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert sorted(p.name for p in it.iterdir()) == [".metadata", "__0_0.distcp"]
    want = expected_dcp(src, MODELS[name].get("expert_layout") == "linear")
    if MODELS[name].get("tied"):
        assert "model.lm_head.weight" not in want
    # DCP's own reader: the keys, shapes and dtypes of the metadata
    md = FileSystemReader(str(it)).read_metadata()
    tensors = {k: m for k, m in md.state_dict_metadata.items() if hasattr(m, "size")}
    assert set(tensors) == {"model." + k for k in want} and set(md.state_dict_metadata) - set(tensors) == {"checkpoint_version"}
    for k, v in want.items():
        assert tuple(tensors["model." + k].size) == tuple(v.shape) and tensors["model." + k].properties.dtype == v.dtype, k
    # as MindSpeed-MM loads it: empty tensors of the expected shapes under "model", and checkpoint_version
    state = {"model": {k: torch.empty(v.shape, dtype=v.dtype) for k, v in want.items()}, "checkpoint_version": 0.0}
    dcp.load(state, checkpoint_id=str(it), no_dist=True)
    assert state["checkpoint_version"] == 3.0
    assert_same_tensors(state["model"], want, "dcp.load")
    # with no state dict (MindSpeed-MM's dcp_to_hf and torch's dcp_to_torch_save): the nesting from the metadata
    dcp_to_torch_save(str(it), str(tmp_path / "all.pt"))
    saved = torch.load(tmp_path / "all.pt", weights_only=True)
    assert set(saved) == {"model", "checkpoint_version"} and saved["checkpoint_version"] == 3.0
    assert_same_tensors(saved["model"], want, "dcp_to_torch_save")
    # back to HF, with the source as reference: same names (key scheme), expert layout and bits
    r = conv().dcp_to_hf(out, tmp_path / "back", hf_dir=src, max_shard_size="60KB")
    assert len(r.files) > 1 and (tmp_path / "back" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "back" / "tokenizer.json").is_file() and (tmp_path / "back" / "config.json").is_file()
    assert_same_tensors(load_hf_tensors(src), load_hf_tensors(tmp_path / "back"), name)
    assert conv().verify(None, tmp_path / "back").ok and conv().verify(None, out).ok  # manifests


def test_without_reference_weights_hub_layout_and_iteration_dir(hf, dcp_out, tmp_path):
    """No reference weights (config only, or the manifest's config): the hub's key scheme and expert layout;
    the iteration directory itself (MindSpeed-MM's load_dir) is accepted."""
    name = "moe-linear-legacy"
    src, out = hf(name), dcp_out(name)
    conv().dcp_to_hf(out / "release", tmp_path / "back")  # config from the manifest
    got = load_hf_tensors(tmp_path / "back")
    want = {hub_key(k): (v.transpose(1, 2).contiguous() if k.endswith(FUSED) else v)
            for k, v in load_hf_tensors(src).items()}
    assert_same_tensors(got, want, "hub layout")


def test_torch_saved_dcp_converts(hf, tmp_path):
    """A checkpoint saved by torch's dcp.save (MindSpeed-MM's save path): a tied model's lm_head copy and an
    optimizer entry beside the model are skipped."""
    import torch.distributed.checkpoint as dcp
    _quiet_dcp()
    name = "dense-tied"
    src = hf(name)
    model = expected_dcp(src, False)
    model["model.lm_head.weight"] = model["model.model.language_model.embed_tokens.weight"].clone()
    state = {"model": model, "checkpoint_version": 3.0,
             "optimizer": {"step": torch.tensor(7.0), "exp_avg": torch.zeros(3)}}
    dcp.save(state, checkpoint_id=str(tmp_path / "saved" / "release"), no_dist=True)
    (tmp_path / "saved" / "latest_checkpointed_iteration.txt").write_text("release")
    r = conv().dcp_to_hf(tmp_path / "saved", tmp_path / "back", hf_dir=src)
    assert any("lm_head" in n and "tied" in n for n in r.notes), r.notes
    assert_same_tensors(load_hf_tensors(src), load_hf_tensors(tmp_path / "back"), "torch-saved DCP")


def _edit_metadata(it, edit):
    """Rewrite ``.metadata`` (torch's own classes) through ``edit(metadata)``."""
    with open(it / ".metadata", "rb") as fh:
        md = pickle.load(fh)
    edit(md)
    (it / ".metadata").write_bytes(pickle.dumps(md))


def test_bad_inputs_are_one_line(hf, dcp_out, tmp_path):
    name = "moe-hub-bf16"
    src = hf(name)
    out = tmp_path / "d"
    shutil.copytree(dcp_out(name), out)
    it = out / "release"
    key = "model.model.model.language_model.layers.0.mlp.experts.gate_up_proj"  # stored key: "model." + inner key

    def refused(match, d=out, **kw):
        with pytest.raises((CheckpointError, ConfigError), match=match) as e:
            conv().dcp_to_hf(d, tmp_path / "back", **({"hf_dir": src} | kw))
        assert "\n" not in str(e.value)
        assert not (tmp_path / "back").exists()

    # truncated record file: the manifest's sizes, then (no manifest, e.g. MindSpeed-MM's own output) the records
    data = (it / "__0_0.distcp").read_bytes()
    (it / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    refused(r"__0_0.distcp: \d+ bytes, mm_convert_manifest.json records \d+")
    (out / "mm_convert_manifest.json").unlink()
    refused(r"__0_0.distcp: chunk of model\.model\..* (not a readable tensor record|outside its record)")
    (it / "__0_0.distcp").write_bytes(data)
    # no config anywhere
    refused(r"--cfg.dcp_dir .*: no mm_convert_manifest.json with the model config", hf_dir=None)
    # missing, unexpected, wrong shape (a config whose vocab differs)
    saved = (it / ".metadata").read_bytes()

    def drop(md):
        del md.state_dict_metadata[key]
        md.storage_data = {i: s for i, s in md.storage_data.items() if i.fqn != key}
    _edit_metadata(it, drop)
    refused(rf"\.metadata: tensor {key} is missing; expected by config.json \(4 layers")
    (it / ".metadata").write_bytes(saved)

    def extra(md):
        md.state_dict_metadata["model.model.extra.weight"] = md.state_dict_metadata[key]
        md.storage_data.update({type(i)("model.model.extra.weight", i.offset): s for i, s in md.storage_data.items()
                                if i.fqn == key})
    _edit_metadata(it, extra)
    refused(r"\.metadata: unexpected tensor model\.model\.extra\.weight; it is not part of a Qwen3-VL model")
    (it / ".metadata").write_bytes(saved)
    ref = tmp_path / "ref"
    ref.mkdir()
    import json
    cfg = json.loads((src / "config.json").read_text())
    (cfg.get("text_config") or cfg)["vocab_size"] += 64
    (ref / "config.json").write_text(json.dumps(cfg))
    refused(r"\.metadata: model\.model\.model\.language_model\.embed_tokens\.weight has shape \[\d+, \d+\], config.json "
            r"expects \[\d+, \d+\]", hf_dir=ref)
    conv().dcp_to_hf(out, tmp_path / "back", hf_dir=src)  # intact again
    assert_same_tensors(load_hf_tensors(src), load_hf_tensors(tmp_path / "back"))


def test_outputs_atomic_resume_and_families_without_dcp(hf, dcp_out, tmp_path):
    from mm_convert import Qwen2_5_VLConverter
    src, out = hf("dense-tied"), dcp_out("dense-tied")
    from mm_convert.errors import MMConvertError
    with pytest.raises(MMConvertError, match="--cfg.dcp_dir .*: exists and is not empty; pass --overwrite"):
        conv().hf_to_dcp(src, out)
    r = conv().hf_to_dcp(src, out, resume=True)
    assert r.bytes == 0 and "already complete" in r.notes[0]
    plan = conv().hf_to_dcp(src, tmp_path / "x", dry_run=True)
    assert [f.path for f in plan.files] == ["__0_0.distcp"] and not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match=r"Qwen2_5_VLConverter hf_to_dcp: Qwen2.5-VL has no FSDP2 / DCP checkpoint "
                                          r"layout \(hf_to_dcp and dcp_to_hf are for Qwen3VLConverter\)"):
        Qwen2_5_VLConverter(progress=False).hf_to_dcp(src, tmp_path / "y")
    with pytest.raises(ConfigError, match="has no FSDP2 / DCP"):
        Qwen2_5_VLConverter(progress=False).dcp_to_hf(out, tmp_path / "y")


def test_cli_round_trip_and_plan(hf, tmp_path, capsys):
    from mm_convert.cli import run
    src = hf("moe-hub-bf16")

    def cli(*args):
        with pytest.raises(SystemExit) as e:
            run([str(a) for a in args])
        return e.value.code

    assert cli("Qwen3VLConverter", "hf_to_dcp", "--cfg.hf_config.hf_dir", src, "--cfg.dcp_dir", tmp_path / "d",
               "--quiet") == 0
    assert cli("Qwen3VLConverter", "dcp_to_hf", "--cfg.dcp_dir", tmp_path / "d", "--cfg.save_hf_dir", tmp_path / "b",
               "--cfg.hf_config.hf_dir", src, "--quiet") == 0
    assert_same_tensors(load_hf_tensors(src), load_hf_tensors(tmp_path / "b"), "cli")
    # MindSpeed-MM's option names (its load_dir is the iteration directory)
    assert cli("Qwen3VLConverter", "hf_to_dcp", "--hf_dir", src, "--dcp_dir", tmp_path / "d2", "--quiet") == 0
    assert cli("Qwen3VLConverter", "dcp_to_hf", "--load_dir", tmp_path / "d2" / "release", "--save_dir",
               tmp_path / "b2", "--model_assets_dir", src, "--quiet") == 0
    assert_same_tensors(load_hf_tensors(src), load_hf_tensors(tmp_path / "b2"), "cli, MindSpeed-MM names")
    capsys.readouterr()
    assert cli("Qwen3VLConverter", "plan", "dcp_to_hf", "--cfg.dcp_dir", tmp_path / "d", "--cfg.save_hf_dir",
               tmp_path / "b3") == 0
    assert "would be written" in capsys.readouterr().out and not (tmp_path / "b3").exists()
    assert cli("Qwen3VLConverter", "dcp_to_hf", "--cfg.dcp_dir", tmp_path / "nope", "--cfg.save_hf_dir",
               tmp_path / "b4") == 2
    err = capsys.readouterr().err
    assert err.startswith("mm-convert: error: ") and err.count("\n") == 1
    assert cli("Qwen2_5_VLConverter", "hf_to_dcp", "--help") == 2  # no such command for a family without DCP


def test_chunked_save_of_two_ranks_converts(hf, tmp_path):
    """FSDP2 saves one chunk per rank (dim 0 shards) in a file per rank: written here record by record with
    torch.save and torch's own metadata classes (as DCP's FileSystemWriter does), then converted to HF."""
    import io
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, TensorProperties, TensorStorageMetadata)
    name = "moe-hub-bf16"
    src = hf(name)
    it = tmp_path / "fsdp" / "release"
    it.mkdir(parents=True)
    files = {r: io.BytesIO() for r in range(2)}
    sd_meta, storage = {}, {}

    def record(rank, obj) -> tuple[int, int]:
        buf = io.BytesIO()
        torch.save(obj, buf)
        pos = files[rank].tell()
        files[rank].write(buf.getvalue())
        return pos, len(buf.getvalue())

    for key, v in expected_dcp(src, False).items():
        fqn, chunks = "model." + key, []
        half = (v.shape[0] + 1) // 2
        for rank, (lo, hi) in enumerate([(0, half), (half, v.shape[0])]):
            if lo == hi:
                continue
            offsets = torch.Size((lo,) + (0,) * (v.dim() - 1))
            pos, n = record(rank, v[lo:hi].clone())
            chunks.append(ChunkStorageMetadata(offsets, torch.Size((hi - lo,) + tuple(v.shape[1:]))))
            storage[MetadataIndex(fqn, offsets)] = _StorageInfo(f"__{rank}_0.distcp", pos, n)
        sd_meta[fqn] = TensorStorageMetadata(TensorProperties(dtype=v.dtype), v.shape, chunks)
    pos, n = record(0, 3.0)
    sd_meta["checkpoint_version"] = BytesStorageMetadata()
    storage[MetadataIndex("checkpoint_version")] = _StorageInfo("__0_0.distcp", pos, n)
    for rank, buf in files.items():
        (it / f"__{rank}_0.distcp").write_bytes(buf.getvalue())
    (it / ".metadata").write_bytes(pickle.dumps(Metadata(state_dict_metadata=sd_meta, storage_data=storage)))
    (it.parent / "latest_checkpointed_iteration.txt").write_text("release")
    conv().dcp_to_hf(it.parent, tmp_path / "back", hf_dir=src)
    assert_same_tensors(load_hf_tensors(src), load_hf_tensors(tmp_path / "back"), "two-rank DCP")
