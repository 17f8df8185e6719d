"""Megatron's torch_dist format, against megatron-core itself (CPU, gloo, one process).

- A checkpoint written by ``dist_checkpointing.save`` (GPTModel with the local spec as the text decoder, the
  vision tensors as layer-stacked ShardedTensors the way a TransformerBlock shards them) converts to HF bit
  for bit, and resplits to a TP/PP layout equal to hf_to_mm's.
- hf_to_mm's ``torch_dist`` output loads with ``dist_checkpointing.load`` into a GPTModel whose state equals the
  HF weights, loads with ``torch.distributed.checkpoint.load`` into tensors of the declared shapes, and round-trips
  through mm_to_hf bit for bit.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from helpers import assert_same_tensors, load_hf_tensors, load_mm_shards
from mm_convert.formats import safe_pickle

pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron.core") is None,
                                reason="megatron-core is not installed")

PREFIX = "text_decoder."
LAYOUT = dict(tp_size=2, llm_pp_layers=[[1, 3]], vit_pp_layers=[[4, 0]])


# the gloo world, and the autouse restore of torch's safe-globals list that importing megatron changes
from test_megatron_load import _undo_megatron_safe_globals, megatron_world as world  # noqa: E402,F401


@pytest.fixture(scope="module")
def tiny(tiny_hf, tmp_path_factory):
    """(hf dir, tp1 pp1 MM state dict) of the tiny fp32 model."""
    from mm_convert import Qwen2_5_VLConverter
    hf = tiny_hf(dtype="float32")
    mm = tmp_path_factory.mktemp("dist_src") / "mm"
    Qwen2_5_VLConverter(progress=False).hf_to_mm(hf, mm, tp_size=1, llm_pp_layers=[[4]], vit_pp_layers=[[4]])
    return hf, load_mm_shards(mm)["mp_rank_00/model_optim_rng.pt"]["model"]


def _gpt(world, text_sd):
    from test_megatron_load import _build_gpt
    model = _build_gpt(world)
    result = model.load_state_dict({k[len(PREFIX):]: v for k, v in text_sd.items()}, strict=False)
    assert [k for k in result.missing_keys if not k.endswith("_extra_state")] == [] and not result.unexpected_keys
    return model


def _vision_sharded(sd):
    """Vision tensors as megatron shards them: per-layer tensors stacked on a leading axis under one key."""
    import re
    from megatron.core.dist_checkpointing import ShardedTensor
    layer = re.compile(r"^(image_encoder\.encoder\.blocks\.layers\.)(\d+)\.(.+)$")
    n = 1 + max(int(m.group(2)) for k in sd if (m := layer.match(k)))
    out = {}
    for k, v in sd.items():
        if not k.startswith("image_encoder."):
            continue
        m = layer.match(k)
        if m:
            out[k] = ShardedTensor.from_rank_offsets(m.group(1) + m.group(3), v, (0, int(m.group(2)), n),
                                                     replica_id=0, prepend_axis_num=1)
        else:
            out[k] = ShardedTensor.from_rank_offsets(k, v, replica_id=0)
    return out


def _cpu_only_save(monkeypatch):
    """megatron-core's torch_dist writer assumes CUDA (synchronize, current_device) and psutil; on this CPU-only
    machine those calls are made no-ops for the test's duration (they only wait for device copies)."""
    import megatron.core.dist_checkpointing.strategies.filesystem_async as fsa
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    if importlib.util.find_spec("psutil") is None:
        monkeypatch.setattr(fsa, "_process_memory", lambda: 0)


@pytest.mark.parametrize("singleton", [False, True], ids=["default", "singleton_local_shards"])
def test_megatron_saved_torch_dist_converts_to_hf(world, tiny, conv, tmp_path, monkeypatch, singleton):
    """(singleton_local_shards: megatron stores the gated fc1 as two keys, linear_fc1.weight_w / _v.)"""
    from megatron.core import dist_checkpointing
    _cpu_only_save(monkeypatch)
    hf, sd = tiny
    model = _gpt(world, {k: v for k, v in sd.items() if k.startswith(PREFIX)})
    metadata = {"singleton_local_shards": True} if singleton else None
    sharded = {**model.sharded_state_dict(prefix=PREFIX, metadata=metadata), **_vision_sharded(sd)}
    ckpt = tmp_path / "megatron_dist"
    ckpt.mkdir()
    dist_checkpointing.save(sharded, str(ckpt))
    with open(ckpt / ".metadata", "rb") as fh:
        stored = safe_pickle.SafeUnpickler(fh).load().fields()["state_dict_metadata"]
    assert any(k.endswith("linear_fc1.weight_w") for k in stored) == singleton
    conv.mm_to_hf(ckpt, tmp_path / "back", hf_dir=hf)
    assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(tmp_path / "back"), "megatron torch_dist -> HF")
    assert conv.verify(hf, ckpt).ok
    conv.resplit(ckpt, tmp_path / "re", hf_dir=hf, **LAYOUT)
    conv.hf_to_mm(hf, tmp_path / "direct", **LAYOUT)
    re, direct = load_mm_shards(tmp_path / "re"), load_mm_shards(tmp_path / "direct")
    assert list(re) == list(direct)
    for f in direct:
        assert_same_tensors(re[f]["model"], direct[f]["model"], f)


def test_our_torch_dist_loads_in_megatron_and_dcp(world, tiny, conv, tmp_path):
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import load as dcp_load
    from mm_convert.formats.dist import global_key, read_metadata
    hf, sd = tiny
    out = tmp_path / "ours"
    conv.hf_to_mm(hf, out, save_format="torch_dist")
    it = out / "release"
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    # megatron-core loads it into a freshly initialised GPTModel (other weights than the converted ones)
    torch.manual_seed(123)
    model = _gpt(world, {k: torch.randn_like(v) for k, v in sd.items() if k.startswith(PREFIX)})
    loaded = dist_checkpointing.load(model.sharded_state_dict(prefix=PREFIX), str(it))
    model.load_state_dict({k[len(PREFIX):]: v for k, v in loaded.items() if not k.endswith("_extra_state")},
                          strict=False)
    want = {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}
    got = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert_same_tensors(got, want, "megatron load of our torch_dist")
    # plain DCP: every global tensor of the declared shape, the stacked layers equal to the MM tensors
    md = read_metadata(it)
    state = {k: torch.empty(g.shape, dtype=g.dtype) for k, g in md.items()}
    dcp_load(state, checkpoint_id=str(it))
    for k, v in sd.items():  # (the names are megatron's, checked by its load above)
        gkey, layer = global_key(k)
        assert torch.equal(state[gkey][layer] if layer is not None else state[gkey], v), k
    assert len(state) == len({global_key(k)[0] for k in sd})
    conv.mm_to_hf(out, tmp_path / "back", hf_dir=hf)
    assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(tmp_path / "back"), "ours torch_dist -> HF")


def test_cli_save_format_torch_dist_and_back(tiny, tmp_path):
    """The command line: hf_to_mm --cfg.save_format torch_dist, then mm_to_hf of it; a wrong value is one line."""
    from click.testing import CliRunner
    from mm_convert.cli import main
    hf, _ = tiny
    run = CliRunner().invoke
    r = run(main, ["Qwen2_5_VLConverter", "hf_to_mm", "--cfg.mm_dir", str(tmp_path / "d"), "--cfg.hf_config.hf_dir",
                   str(hf), "--cfg.save_format", "torch_dist", "--quiet"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "d" / "release").iterdir()) == [
        ".metadata", "__0_0.distcp", "__objects.distcp", "common.pt", "metadata.json"]
    r = run(main, ["Qwen2_5_VLConverter", "mm_to_hf", "--cfg.mm_dir", str(tmp_path / "d"),
                   "--cfg.save_hf_dir", str(tmp_path / "back"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(tmp_path / "back"), "cli torch_dist")
    r = run(main, ["Qwen2_5_VLConverter", "hf_to_mm", "--cfg.mm_dir", str(tmp_path / "e"), "--cfg.hf_config.hf_dir",
                   str(hf), "--cfg.save_format", "dcp"])
    assert r.exit_code == 2 and "--cfg.save_format" in r.output and not (tmp_path / "e").exists()


def test_torch_dist_record_corrupt_metadata_is_one_line(tiny, conv, tmp_path):
    """A .metadata whose record range points outside its file, and a .metadata naming a code global: refused,
    naming the file."""
    import pickle
    from mm_convert.errors import CheckpointError
    hf, _ = tiny
    conv.hf_to_mm(hf, tmp_path / "d", save_format="torch_dist")
    it = tmp_path / "d" / "release"
    data = it.joinpath("__0_0.distcp").read_bytes()
    it.joinpath("__0_0.distcp").write_bytes(data[: len(data) // 2])  # truncated records file
    with pytest.raises(CheckpointError, match="__0_0.distcp: chunk of .* not a readable tensor record|outside its record"):
        conv.mm_to_hf(tmp_path / "d", tmp_path / "back", hf_dir=hf)
    assert not (tmp_path / "back").exists()

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))
    it.joinpath(".metadata").write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(CheckpointError, match=r"\.metadata: refused, its pickle names __builtin__.print"):
        conv.mm_to_hf(tmp_path / "d", tmp_path / "back", hf_dir=hf)
