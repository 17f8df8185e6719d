"""examples/qwen2.5vl training files: model/data jsons in the seeds' shape that our loaders read, scripts that
parse and point at them, and the tiny end-to-end example running on CPU."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mm_train.config import ModelConfig, mm_pipeline_layers
from mm_train.data import load_data_config
from mm_train.finetune import apply_model_json, parse_args
from mm_train.recompute import Recompute

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
    assert (args.train_vit, args.freeze_projector, args.freeze_llm, args.vit_recompute, args.llm_recompute) == \
        (False, False, False, Recompute("full", "uniform", 1), Recompute())
    dc = load_data_config(EX / f"data_{size}.json")
    assert dc.sampler_type == "BucketBatchSampler" and size.upper() in dc.model_name_or_path
    script = (EX / f"finetune_qwen2_5_vl_{size}.sh").read_text()
    subprocess.run(["bash", "-n", str(EX / f"finetune_qwen2_5_vl_{size}.sh")], check=True)
    assert f"model_{size}.json" in script and f"data_{size}.json" in script and "-m mm_train.finetune" in script
    assert f"TP=${{TP:-{infer['tensor_model_parallel_size']}}}\n" in script
    assert f"PP=${{PP:-{len(infer['text_decoder']['pipeline_num_layers'])}}}\n" in script


@pytest.mark.parametrize("family_args", [[], ["--family", "Qwen3-VL", "--variant", "moe", "--ep", "2"]],
                         ids=["qwen2.5vl", "qwen3vl-moe-ep2"])
def test_tiny_end_to_end_example(tmp_path, family_args):
    out = subprocess.run([sys.executable, str(EX.parent / "tiny_finetune_example.py"), "--workdir", str(tmp_path),
                          "--pp", "2", "--iters", "6", *family_args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "iteration        6/       6" in out.stdout and "after:" in out.stdout
    assert (tmp_path / "save" / "iter_0000006").is_dir() and list((tmp_path / "hf_finetuned").glob("*.safetensors"))


def _family_examples():
    sys.path.insert(0, str(EX.parent))
    from make_family_examples import FOLDERS, LAYOUTS, STEMS
    return [(fam, size, FOLDERS[fam], STEMS[fam], *LAYOUTS[fam][size]) for fam in LAYOUTS for size in LAYOUTS[fam]]


@pytest.mark.parametrize("fam,size,folder,stem,tp,ep,llm,vit,repo", _family_examples(),
                         ids=[f"{f}-{s}" for f, s, *_ in _family_examples()])
def test_family_examples_describe_the_published_models(fam, size, folder, stem, tp, ep, llm, vit, repo):
    """Each family's per-size examples: the inference and model jsons describe the published config's model,
    their layout fits it (sums, TP / EP divisibility), and the scripts parse and use that layout."""
    from mm_convert.testing import published_config_path
    from mm_convert.layout import ParallelLayout
    from mm_train.model import check_divisible

    d = EX.parent / folder
    stem = f"{stem}_{size}"
    infer = json.loads((d / f"inference_{stem}.json").read_text())
    model = json.loads((d / f"model_{size}.json").read_text())
    hf = ModelConfig.from_hf(published_config_path(size, fam))
    for doc in (infer, model):
        got = ModelConfig.from_mm(doc)
        assert (got.vision, got.text, got.image_token_id, got.family) == (hf.vision, hf.text, hf.image_token_id, fam)
    assert mm_pipeline_layers(infer) == (llm, vit) == mm_pipeline_layers(model)
    check_divisible(hf, ParallelLayout.create(tp, llm, vit, ep_size=ep))
    assert infer.get("expert_model_parallel_size", 1) == ep
    for script in (f"convert_{stem}.sh", f"finetune_{stem}.sh"):
        subprocess.run(["bash", "-n", str(d / script)], check=True)
    convert = (d / f"convert_{stem}.sh").read_text()
    assert f"tp_size {tp}" in convert and f"llm_pp_layers [{','.join(map(str, llm))}]" in convert
    assert (f"ep_size {ep}" in convert) == (ep > 1) and repo in convert
    assert f"TP=${{TP:-{tp}}}\n" in (d / f"finetune_{stem}.sh").read_text()
    assert load_data_config(d / f"data_{size}.json").model_name_or_path.endswith(repo)


def test_runtime_is_not_shadowed_by_a_users_train_py(tmp_path):
    """The runtime imports as mm_train: from a working directory holding a train.py (and a train/ folder), the
    fine-tune example and python -m mm_train.finetune --help still run ours."""
    (tmp_path / "train.py").write_text("raise SystemExit('the user train.py was imported')\n")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "__init__.py").write_text("raise SystemExit('the user train package was imported')\n")
    p = subprocess.run([sys.executable, "-m", "mm_train.finetune", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0 and "--data-config" in p.stdout, p.stderr
    out = subprocess.run([sys.executable, str(EX.parent / "tiny_finetune_example.py"), "--workdir", str(tmp_path / "w"),
                          "--iters", "2", "--samples", "4"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "after:" in out.stdout
