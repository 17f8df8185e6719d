"""The shipped scripts as the articles use them: every finetune / inference script's argument lists (GPT_ARGS,
MM_ARGS, OUTPUT_ARGS, at their defaults) go through the runtime's own parsers, and the 7B fine-tuning script runs
end to end under torchrun on a tiny model (only sizes and paths set from the environment), its log read by the
articles' awk step."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mm_train import infer
from mm_train.args import apply_model_json, no_effect_flags, parse_args
from mm_train.config import ModelConfig, mm_pipeline_layers
from mm_train.toydata import make_caption_set

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from make_family_examples import FOLDERS, LAYOUTS, STEMS  # noqa: E402

SCRIPTS = [(fam, size) for fam in LAYOUTS for size in LAYOUTS[fam]]

STUB = """#!/bin/bash
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" > "$STUB_OUT"
"""


def torchrun_argv(script: Path, tmp_path: Path, env: dict | None = None) -> list[str]:
    """The script run as a user runs it, with torchrun replaced by a stub that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "torchrun").write_text(STUB)
    (bin_dir / "torchrun").chmod(0o755)
    out = tmp_path / "argv.json"
    run_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_OUT": str(out), **(env or {})}
    p = subprocess.run(["bash", str(script)], cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(out.read_text())


def split_torchrun(argv: list[str]) -> tuple[dict, str, list[str]]:
    """(torchrun's own options, the module, the module's arguments)."""
    m = argv.index("-m")
    opts = dict(zip(argv[:m:2], argv[1:m:2]))
    return opts, argv[m + 1], argv[m + 2:]


@pytest.mark.parametrize("fam,size", SCRIPTS, ids=[f"{f}-{s}" for f, s in SCRIPTS])
def test_finetune_script_arguments_parse(fam, size, tmp_path):
    tp, ep, llm, vit, _ = LAYOUTS[fam][size]
    folder, stem = ROOT / "examples" / FOLDERS[fam], f"{STEMS[fam]}_{size}"
    opts, module, rest = split_torchrun(torchrun_argv(folder / f"finetune_{stem}.sh", tmp_path))
    assert module == "mm_train.finetune"
    ranks = int(opts["--nproc_per_node"]) * int(opts["--nnodes"])
    assert ranks % (tp * len(llm)) == 0 and (ranks // (tp * len(llm))) % ep == 0, (ranks, tp, llm, ep)  # DP >= 1
    args = parse_args(rest)
    for flag in ("--variable-seq-lengths", "--use-distributed-optimizer", "--no-save-optim", "--no-save-rng",
                 "--no-load-optim", "--no-load-rng", "--log-tps"):
        assert flag in rest
    assert args.variable_seq_lengths and args.use_distributed_optimizer and args.log_tps and args.no_save_optim
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (tp, len(llm))
    assert {f.split(" ")[0] for f in no_effect_flags(args)} >= {"--use-flash-attn", "--use-fused-rmsnorm"}
    args.mm_model = str(ROOT / args.mm_model)
    apply_model_json(args)
    assert args.mm_layout == (llm, vit)
    assert args.vit_recompute.granularity == "full" and not args.train_vit
    cfg = ModelConfig.from_mm(json.loads(Path(args.mm_model).read_text()))
    assert args.vocab_size == cfg.text.vocab_size


@pytest.mark.parametrize("fam,size", SCRIPTS, ids=[f"{f}-{s}" for f, s in SCRIPTS])
def test_inference_script_arguments_parse(fam, size, tmp_path):
    tp, ep, llm, _, repo = LAYOUTS[fam][size]
    folder, stem = ROOT / "examples" / FOLDERS[fam], f"{STEMS[fam]}_{size}"
    opts, module, rest = split_torchrun(torchrun_argv(folder / f"inference_{stem}.sh", tmp_path))
    assert module == "mm_train.infer"
    assert int(opts["--nproc_per_node"]) * int(opts["--nnodes"]) == tp * len(llm) * ep  # the ranks infer starts
    args = infer.parse_args(rest)
    args.config = str(ROOT / args.config)
    s = infer.settings(args)
    assert (s["layout"].tp_size, s["layout"].pp_size, s["layout"].ep_size) == (tp, len(llm), ep)
    assert s["load"].endswith(repo) and mm_pipeline_layers(s["json"])[0] == llm


def test_a_wrong_pipeline_num_layers_is_refused_in_one_line(tmp_path):
    """model.json must describe the checkpoint the run loads; the error names both layouts and the fix."""
    from mm_convert.errors import LayoutError
    from mm_convert.layout import ParallelLayout
    from mm_train.finetune import check_layout_flags

    args = parse_args(["--mm-data", "d.json", "--load", "ckpt/mm", "--train-iters", "1",
                       "--mm-model", str(ROOT / "examples/qwen2.5vl/model_7b.json")])
    apply_model_json(args)
    cfg = ModelConfig.from_mm(json.loads(Path(args.mm_model).read_text()))
    check_layout_flags(args, cfg, ParallelLayout.create(1, [1, 10, 10, 7], [32, 0, 0, 0]), "Qwen2_5_VLConverter")
    with pytest.raises(LayoutError) as e:
        check_layout_flags(args, cfg, ParallelLayout.create(1, [12, 16], [32, 0]), "Qwen2_5_VLConverter")
    msg = str(e.value)
    assert "\n" not in msg and "[1, 10, 10, 7]" in msg and "[[12,16]]" in msg
    assert "resplit --cfg.source_dir ckpt/mm" in msg and "llm_pp_layers [1,10,10,7]" in msg


def test_unknown_flags_stay_errors():
    p = subprocess.run([sys.executable, "-m", "mm_train.finetune", "--mm-data", "d", "--load", "x", "--train-iters",
                        "1", "--use-flash-atten"], capture_output=True, text=True)
    assert p.returncode == 2 and "unrecognized arguments: --use-flash-atten" in p.stderr


def test_the_data_step_runs_with_the_articles_defaults(tmp_path):
    img = tmp_path / "data" / "COCO2017" / "train2017"
    img.mkdir(parents=True)
    (img / "a.jpg").write_bytes(b"jpg")
    turns = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]
    (tmp_path / "data" / "llava_instruct_150k.json").write_text(json.dumps(
        [{"id": "1", "image": "a.jpg", "conversations": turns}, {"id": "2", "image": "b.jpg", "conversations": turns}]))
    script = ROOT / "examples/qwen2vl/llava_instruct_2_mllm_demo_format.py"
    (tmp_path / "data" / "mllm_format_llava_instruct_data.json").touch()  # the articles' step (3): create it, then run
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = json.loads((tmp_path / "data" / "mllm_format_llava_instruct_data.json").read_text())
    assert out == [{"id": "1", "conversations": turns, "image": "COCO2017/train2017/a.jpg"}]
    again = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_7b_script_runs_end_to_end(tmp_path):
    """The 7B script under torchrun on CPU (2 ranks, tp1 pp2 of the tiny model, vision frozen as model_7b.json
    has it): it trains, saves, logs the articles' line and summary. About 40 s: two torchrun ranks."""
    from mm_convert import Qwen2_5_VLConverter
    from mm_convert.testing import make_tiny_hf_checkpoint
    from mm_train.config import to_mm
    from mm_train.launch import free_port

    hf = make_tiny_hf_checkpoint(tmp_path / "hf", dtype="float32")
    llm, vit = [1, 3], [4, 0]
    Qwen2_5_VLConverter(progress=False).hf_to_mm(hf, tmp_path / "mm", tp_size=1, llm_pp_layers=llm, vit_pp_layers=vit)
    cfg = ModelConfig.from_hf(hf)
    model = json.loads((ROOT / "examples/qwen2.5vl/model_7b.json").read_text())  # the shipped settings ...
    tiny = to_mm(cfg, llm, vit)  # ... on the tiny model's sizes
    for part in ("vision_encoder", "vision_projector"):
        model["image_encoder"][part] = {**model["image_encoder"][part], **tiny["image_encoder"][part]}
    model["text_decoder"] = {**model["text_decoder"], **tiny["text_decoder"]}
    (tmp_path / "model.json").write_text(json.dumps(model))
    data = make_caption_set(tmp_path / "data", 8, hf)
    env = {"NPUS_PER_NODE": "2", "PP": "2", "GRAD_ACC_STEP": "2", "TRAIN_ITERS": "3", "SAVE_INTERVAL": "3",
           "MASTER_PORT": str(free_port()), "LOAD_PATH": str(tmp_path / "mm"), "SAVE_PATH": str(tmp_path / "save"),
           "MM_DATA": str(data), "MM_MODEL": str(tmp_path / "model.json"), "VOCAB_SIZE": str(cfg.text.vocab_size),
           "SEQ_LEN": "512", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    p = subprocess.run(["bash", str(ROOT / "examples/qwen2.5vl/finetune_qwen2_5_vl_7b.sh")], cwd=tmp_path,
                       env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert "iteration        3/       3" in out and "tokens per sample:" in out, out[-3000:]
    assert "[args] accepted, no effect here: --use-mcore-models" in out
    assert (tmp_path / "save" / "iter_0000003").is_dir()
    trainer = [[line for line in out.splitlines() if line.startswith(k)] for k in
               ("Elapsed Time Per iteration", "Average Samples per Second")]
    assert all(len(lines) == 2 for lines in trainer), out[-2000:]  # the trainer's summary, then the script's awk
    step_times = [float(line.split(":")[1]) for line in trainer[0]]
    assert step_times[0] > 0 and abs(step_times[0] - step_times[1]) <= 0.1 + 1e-3 * step_times[0]
    assert any(line.startswith("Consumed Tokens per Second") for line in out.splitlines())
