"""examples/qwen2.5vl training files: model/data jsons in the seeds' shape that our loaders read, scripts that
parse and point at them, and the tiny end-to-end example running on CPU."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from train.config import ModelConfig, mm_pipeline_layers
from train.data import load_data_config
from train.finetune import apply_model_json, parse_args

EX = Path(__file__).resolve().parents[1] / "examples" / "qwen2.5vl"


@pytest.mark.parametrize("size", ["3b", "7b", "32b", "72b"])
def test_example_training_configs(size):
    model = json.loads((EX / f"model_{size}.json").read_text())
    infer = json.loads((EX / f"inference_qwen2_5_vl_{size}.json").read_text())
    a, b = ModelConfig.from_mm(model), ModelConfig.from_mm(infer)
    assert (a.vision, a.text, a.image_token_id) == (b.vision, b.text, b.image_token_id)
    assert mm_pipeline_layers(model) == mm_pipeline_layers(infer)
    args = parse_args(["--mm-data", "d.json", "--load", "x", "--train-iters", "1", "--mm-model", str(EX / f"model_{size}.json")])
    apply_model_json(args)
    assert (args.train_vit, args.freeze_projector, args.recompute_granularity, args.recompute_num_layers) == \
        (False, False, "full", 1)
    dc = load_data_config(EX / f"data_{size}.json")
    assert dc.sampler_type == "BucketBatchSampler" and size.upper() in dc.model_name_or_path
    script = (EX / f"finetune_qwen2_5_vl_{size}.sh").read_text()
    subprocess.run(["bash", "-n", str(EX / f"finetune_qwen2_5_vl_{size}.sh")], check=True)
    assert f"model_{size}.json" in script and f"data_{size}.json" in script and "-m train.finetune" in script
    assert f"TP={infer['tensor_model_parallel_size']}\n" in script
    assert f"PP={len(infer['text_decoder']['pipeline_num_layers'])}\n" in script


def test_tiny_end_to_end_example(tmp_path):
    out = subprocess.run([sys.executable, str(EX / "tiny_finetune_example.py"), "--workdir", str(tmp_path),
                          "--pp", "2", "--iters", "6"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "iteration        6/       6" in out.stdout and "after:" in out.stdout
    assert (tmp_path / "save" / "iter_0000006").is_dir() and list((tmp_path / "hf_finetuned").glob("*.safetensors"))
