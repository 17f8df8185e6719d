"""Saves written the way Megatron / MindSpeed-MM training writes them (torch.save of args as an
argparse.Namespace with enums and dtypes, numpy and Python RNG state, an optimizer dict, TransformerEngine
``_extra_state`` as io.BytesIO, VPP ``model0/model1``, ``distrib_optim.pt`` beside, ``iter_0000100``) are read
without running code: mm_to_hf gives the HF tensors bit for bit, resplit equals hf_to_mm to the target, verify
passes, the runtime loads them. The same files with one global that would run code are refused in one line,
nothing runs (marker file) and nothing is written."""
from __future__ import annotations

import argparse
import io
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import assert_same_tensors, load_hf_tensors
from mm_convert.cli import main
from mm_convert.formats import safe_pickle
from mm_convert.formats.mm import MMReader, load_torch_file

# importing megatron (its enums go into the args below) adds torch safe globals for the whole process; restored
# after this module like test_megatron_load does
from test_megatron_load import _undo_megatron_safe_globals  # noqa: E402,F401

ITERATION = 100
LAYOUTS = {
    "tp2_pp2": dict(tp_size=2, llm_pp_layers=[[1, 3]], vit_pp_layers=[[4, 0]]),
    "tp2_pp2_vpp2": dict(tp_size=2, llm_pp_layers=[[0, 1], [1, 2]], vit_pp_layers=[[4, 0], [0, 0]]),
}


def _megatron_args(tp: int, pp: int):
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend
    return argparse.Namespace(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=None,
        num_layers=4, hidden_size=64, params_dtype=torch.bfloat16, main_grads_dtype=torch.float32,
        model_type=ModelType.encoder_or_decoder, attention_backend=AttnBackend.auto, data_path=["a", "b"],
        save="/ckpt/save", lr=1e-5, seq_length=1024, ckpt_format="torch")


def _rng_state():
    return [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),
             "rng_tracker_states": {"model-parallel-rng": torch.zeros(16, dtype=torch.uint8)}}]


def _with_extra_state(sd: dict) -> dict:
    """TransformerEngine layers add ``<module>._extra_state`` (io.BytesIO) after each linear's parameters."""
    out = {}
    for k, v in sd.items():
        out[k] = v
        if k.endswith(".weight") and (".linear_" in k or "output_layer" in k):
            out[k[: -len("weight")] + "_extra_state"] = io.BytesIO(b"fp8 meta " + k.encode())
    return out


def make_training_save(release_dir: Path, out: Path, extra_global=None) -> Path:
    """Rewrite an MM release checkpoint as a Megatron training save at iteration 100 (torch.save, as Megatron
    does), optionally with ``extra_global`` (an object whose pickle names a global) under ``args``."""
    it = out / f"iter_{ITERATION:07d}"
    shards = sorted((release_dir / "release").glob("mp_rank_*/model_optim_rng.pt"))
    layout = MMReader(release_dir)
    tp, pp = layout.tp_size, layout.pp_size
    for shard in shards:
        obj = torch.load(shard, weights_only=True)
        slots = {k: _with_extra_state(v) for k, v in obj.items() if k.startswith("model")}
        args = _megatron_args(tp, pp)
        if len(slots) > 1:
            args.virtual_pipeline_model_parallel_size = len(slots)
        if extra_global is not None:
            args.hook = extra_global
        params = [t for sd in slots.values() for t in sd.values() if isinstance(t, torch.Tensor)]
        save = {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION, **slots,
                "optimizer": {"optimizer": {"state": {i: {"exp_avg": torch.zeros_like(p, dtype=torch.float32)}
                                                      for i, p in enumerate(params[:3])},
                                            "param_groups": [{"lr": 1e-5, "params": [0, 1, 2]}]},
                              "fp32_from_fp16_params": [[p.float() for p in params[:2]]]},
                "opt_param_scheduler": {"max_lr": 1e-5, "num_steps": 800, "decay_style": "cosine"},
                "rng_state": _rng_state(), "num_floating_point_operations_so_far": 1.5e12}
        target = it / shard.parent.name
        target.mkdir(parents=True)
        torch.save(save, target / "model_optim_rng.pt")
        torch.save({"param_state": {"exp_avg_sq": torch.ones(8)}, "buckets": [np.arange(4)]}, target / "distrib_optim.pt")
    (out / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    return out


@pytest.fixture(scope="module")
def saves(tiny_hf, tmp_path_factory):
    """layout -> (hf dir, training save dir), made once."""
    from mm_convert import Qwen2_5_VLConverter
    conv = Qwen2_5_VLConverter(progress=False)
    out = {}
    for name, layout in LAYOUTS.items():
        hf = tiny_hf(dtype="float32" if name == "tp2_pp2" else "bfloat16")
        root = tmp_path_factory.mktemp(f"train_{name}")
        conv.hf_to_mm(hf, root / "release_ckpt", **layout)
        out[name] = (hf, make_training_save(root / "release_ckpt", root / "save"))
    return out


def _shard(save: Path) -> Path:
    return next((save / f"iter_{ITERATION:07d}").glob("mp_rank_*/model_optim_rng.pt"))


def test_safe_loader_rebuilds_what_megatron_saves(saves):
    obj = load_torch_file(_shard(saves["tp2_pp2"][1]))
    args = obj["args"]
    assert isinstance(args, safe_pickle.SavedNamespace) and args.tensor_model_parallel_size == 2
    assert args.params_dtype is torch.bfloat16
    assert args.model_type.dotted == "megatron.core.enums.ModelType" and args.model_type.value == 1
    plain = args.to_namespace()
    assert isinstance(plain, argparse.Namespace) and not hasattr(plain, "model_type") and plain.num_layers == 4
    np_state = obj["rng_state"][0]["np_rng_state"]
    assert np_state[0] == "MT19937" and isinstance(np_state[1], np.ndarray) and np_state[1].dtype == np.uint32
    assert obj["rng_state"][0]["random_rng_state"][0] == 3
    extra = [v for k, v in obj["model"].items() if k.endswith("_extra_state")]
    assert extra and all(isinstance(v, safe_pickle.SavedBytes) and v.data.startswith(b"fp8 meta ") for v in extra)
    assert obj["iteration"] == ITERATION


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_mm_to_hf_of_training_save_is_bit_exact(saves, conv, tmp_path, name):
    hf, save = saves[name]
    conv.mm_to_hf(save, tmp_path / "back", hf_dir=hf)
    assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(tmp_path / "back"), name)
    assert conv.verify(hf, save).ok


@pytest.mark.parametrize("name,target", [("tp2_pp2", dict(tp_size=1, llm_pp_layers=[4], vit_pp_layers=[4])),
                                         ("tp2_pp2_vpp2", dict(tp_size=2, llm_pp_layers=[[2, 2]], vit_pp_layers=[[4, 0]]))])
def test_resplit_of_training_save_equals_hf_to_mm_and_keeps_iteration_and_args(saves, conv, tmp_path, name, target):
    hf, save = saves[name]
    conv.resplit(save, tmp_path / "re", hf_dir=hf, **target)
    conv.hf_to_mm(hf, tmp_path / "direct", **target)
    assert (tmp_path / "re" / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERATION)
    re_shards = sorted((tmp_path / "re" / f"iter_{ITERATION:07d}").glob("mp_rank_*/model_optim_rng.pt"))
    direct = sorted((tmp_path / "direct" / "release").glob("mp_rank_*/model_optim_rng.pt"))
    assert [p.parent.name for p in re_shards] == [p.parent.name for p in direct] and re_shards
    for a, b in zip(re_shards, direct):
        got, want = load_torch_file(a), torch.load(b, weights_only=True)
        slots = [k for k in want if k.startswith("model")]
        assert [k for k in got if k.startswith("model")] == slots
        for s in slots:
            assert_same_tensors(got[s], want[s], f"{a}:{s}")
        assert got["iteration"] == ITERATION
        args = got["args"]
        assert args.tensor_model_parallel_size == target["tp_size"]
        llm = target["llm_pp_layers"]
        assert args.pipeline_model_parallel_size == (len(llm[0]) if isinstance(llm[0], list) else len(llm))
        assert args.virtual_pipeline_model_parallel_size is None and args.num_layers == 4
    assert conv.verify(hf, tmp_path / "re").ok  # manifest and every tensor against HF


def test_runtime_loads_training_save(saves):
    """check_logits runs the bundled runtime (2 ranks x 2 stages) straight from the training save."""
    from mm_train.check_logits import check_logits
    hf, save = saves["tp2_pp2"]
    assert check_logits(save, hf, tolerance=1e-5, log=lambda s: None) <= 1e-5


class UserHook:
    """A user's class whose unpickling has a side effect (its __setstate__ writes a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __setstate__(self, state):
        Path(state["marker"]).write_text("ran")


class _Reduce:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


GLOBALS = {
    "os.system": (lambda m: _Reduce(os.system, f"touch {m}"), "posix.system"),
    "builtins.exec": (lambda m: _Reduce(exec, f"open({str(m)!r}, 'w').write('ran')"), "__builtin__.exec"),
    "user class": (lambda m: UserHook(str(m)), "test_training_saves.UserHook"),
}


@pytest.mark.parametrize("what", list(GLOBALS))
def test_global_that_would_run_code_is_refused(saves, tmp_path, what):
    hf, _ = saves["tp2_pp2"]
    make_obj, dotted = GLOBALS[what]
    marker = tmp_path / "MARKER"
    save = make_training_save(saves["tp2_pp2"][1].parent / "release_ckpt", tmp_path / "evil", make_obj(marker))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["Qwen2_5_VLConverter", "mm_to_hf", "--cfg.mm_dir", str(save),
                                  "--cfg.save_hf_dir", str(out), "--cfg.hf_config.hf_dir", str(hf), "--quiet"])
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"refused, its pickle names {dotted}" in err[0] and "model_optim_rng.pt" in err[0], err[0]
    assert not marker.exists() and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary output left either


def test_safe_loader_other_data_training_saves_hold(tmp_path):
    """YAML-config runs save args as a SimpleNamespace; core >= 0.16 keeps a signal enum; MindSpeed keeps sets;
    graph-safe RNG keeps torch.Generator; paths, defaultdicts and numpy scalars appear too."""
    import collections
    import signal
    import types
    gen = torch.Generator()
    gen.manual_seed(3)
    obj = {"args": types.SimpleNamespace(exit_signal=signal.SIGTERM, noop_layers={1, 3}, save=Path("/a/b")),
           "d": collections.defaultdict(list, {"k": [1]}), "g": gen, "s": np.float32(2.5), "b": b"\x00\xff",
           "t": torch.arange(4, dtype=torch.int16)}
    torch.save(obj, tmp_path / "x.pt")
    got = safe_pickle.load(tmp_path / "x.pt")
    assert isinstance(got["args"], safe_pickle.SavedNamespace)
    assert got["args"].exit_signal.dotted == "signal.Signals" and got["args"].exit_signal.value == int(signal.SIGTERM)
    assert got["args"].noop_layers == {1, 3} and got["args"].save == "/a/b"
    assert dict(got["d"]) == {"k": [1]} and got["d"].default_factory is None
    assert got["g"].dotted == "torch.Generator" and got["s"] == np.float32(2.5) and got["b"] == b"\x00\xff"
    assert torch.equal(got["t"], obj["t"])


def test_finetune_loads_training_save_weights_only(saves, tmp_path, capfd):
    """`finetune --load` of a Megatron save (4 ranks, tp2 x pp2): its weights are loaded, its optimizer /
    scheduler / RNG (another trainer's formats) are not; training starts at iteration 0 and saves iteration 1.
    (About 15 s: four gloo ranks start and take one step.)"""
    from mm_train.finetune import main as finetune
    from mm_train.saving import is_own_save
    from mm_train.toydata import make_caption_set
    hf, save = saves["tp2_pp2"]
    assert not is_own_save(load_torch_file(_shard(save)))
    data = make_caption_set(tmp_path / "data", 4, hf)
    finetune([str(a) for a in ["--nproc", 4, "--data-config", data, "--load", save, "--train-iters", 1,
                               "--save", tmp_path / "out", "--global-batch-size", 1, "--micro-batch-size", 1,
                               "--lr", "0"]])
    assert "a training save of another trainer" in capfd.readouterr().out
    own = load_torch_file(next((tmp_path / "out" / "iter_0000001").glob("mp_rank_*/model_optim_rng.pt")))
    assert is_own_save(own) and own["iteration"] == 1
    # lr 0: the step changed nothing, so the save holds the Megatron save's weights exactly
    src = load_torch_file(_shard(save).parent.parent / next((tmp_path / "out" / "iter_0000001").glob("mp_rank_*")).name
                          / "model_optim_rng.pt")
    assert_same_tensors({k: v for k, v in own["model"].items()},
                        {k: v for k, v in src["model"].items() if not k.endswith("_extra_state")}, "weights")
