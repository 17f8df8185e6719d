"""The command lines users type (the seeds' forms), --config YAML, plan, verify and --help."""
from __future__ import annotations

import subprocess
import sys

import torch

from helpers import assert_same_tensors, load_hf_tensors, load_mm_shards


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mm_convert.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_help_lists_converters_and_commands():
    p = cli("--help")
    assert p.returncode == 0 and "Qwen2_5_VLConverter" in p.stdout
    p = cli("Qwen2_5_VLConverter", "--help")
    for c in ("hf_to_mm", "mm_to_hf", "resplit", "verify", "plan", "check_logits"):
        assert c in p.stdout
    p = cli("Qwen2_5_VLConverter", "hf_to_mm", "--help")
    for o in ("--cfg.mm_dir", "--cfg.hf_config.hf_dir", "--cfg.parallel_config.llm_pp_layers", "--cfg.parallel_config.tp_size"):
        assert o in p.stdout


def test_seed_command_lines_nested_flat_and_glued(tiny_hf, conv, tmp_path):
    hf = tiny_hf(dtype="bfloat16")
    # the form of the 2025 article: nested lists, separate values
    p = cli("Qwen2_5_VLConverter", "hf_to_mm", "--cfg.mm_dir", tmp_path / "a", "--cfg.hf_config.hf_dir", hf,
            "--cfg.parallel_config.llm_pp_layers", "[[1,3]]", "--cfg.parallel_config.vit_pp_layers", "[[4,0]]",
            "--cfg.parallel_config.tp_size", "2")
    assert p.returncode == 0, p.stderr
    # the older form: flat lists, and the value glued to the option as in `--cfg.mm_dir"ckpt/..."`
    p = cli("Qwen2_5_VLConverter", "hf_to_mm", f"--cfg.mm_dir{tmp_path / 'b'}", f"--cfg.hf_config.hf_dir{hf}",
            "--cfg.parallel_config.llm_pp_layers", "[1,3]", "--cfg.parallel_config.vit_pp_layers", "[4,0]",
            "--cfg.parallel_config.tp_size", "2", "--quiet")
    assert p.returncode == 0, p.stderr
    assert p.stdout == ""
    a, b = load_mm_shards(tmp_path / "a"), load_mm_shards(tmp_path / "b")
    for k in a:
        assert_same_tensors(a[k]["model"], b[k]["model"], k)
    assert conv.verify(hf, tmp_path / "a").ok


def test_mm_to_hf_and_resplit_cli_and_yaml_config(tiny_hf, tmp_path):
    hf = tiny_hf()
    (tmp_path / "c.yaml").write_text(
        f"cfg:\n  mm_dir: {tmp_path / 'mm'}\n  hf_config:\n    hf_dir: {hf}\n"
        f"  parallel_config:\n    tp_size: 2\n    llm_pp_layers: [[0, 4]]\n    vit_pp_layers: [[2, 2]]\n")
    p = cli("Qwen2_5_VLConverter", "hf_to_mm", "--config", tmp_path / "c.yaml")
    assert p.returncode == 0, p.stderr
    p = cli("Qwen2_5_VLConverter", "resplit", "--cfg.source_dir", tmp_path / "mm", "--cfg.target_dir", tmp_path / "mm2",
            "--cfg.target_parallel_config.llm_pp_layers", "[1,1,1,1]", "--cfg.target_parallel_config.vit_pp_layers", "[4,0,0,0]")
    assert p.returncode == 0, p.stderr
    p = cli("Qwen2_5_VLConverter", "mm_to_hf", "--cfg.mm_dir", tmp_path / "mm2", "--cfg.save_hf_dir", tmp_path / "back",
            "--cfg.hf_config.hf_dir", hf, "--cfg.parallel_config.llm_pp_layers", "[1,1,1,1]",
            "--cfg.parallel_config.vit_pp_layers", "[4,0,0,0]", "--cfg.parallel_config.tp_size", "1")
    assert p.returncode == 0, p.stderr
    assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(tmp_path / "back"))
    # a YAML key the command does not have is named
    (tmp_path / "bad.yaml").write_text("mm_dir: x\nhf_config: {hf_dir: y}\nparallel_config: {tp: 2}\n")
    p = cli("Qwen2_5_VLConverter", "hf_to_mm", "--config", tmp_path / "bad.yaml")
    assert p.returncode != 0 and "parallel_config.tp" in p.stderr


def test_plan_writes_nothing_and_lists_shards(tiny_hf, tmp_path):
    p = cli("Qwen2_5_VLConverter", "plan", "hf_to_mm", "--cfg.mm_dir", tmp_path / "mm", "--cfg.hf_config.hf_dir", tiny_hf(),
            "--cfg.parallel_config.llm_pp_layers", "[[1,3]]", "--cfg.parallel_config.vit_pp_layers", "[[4,0]]",
            "--cfg.parallel_config.tp_size", "2", "--verbose")
    assert p.returncode == 0, p.stderr
    assert "mp_rank_01_001/model_optim_rng.pt" in p.stdout and "nothing written" in p.stdout
    assert "model.layers.0.self_attn.k_proj.weight" in p.stdout  # verbose: source boxes named
    assert not (tmp_path / "mm").exists()


def test_verify_names_a_tampered_tensor(tiny_hf, conv, tmp_path):
    hf = tiny_hf()
    conv.hf_to_mm(hf, tmp_path / "mm", tp_size=2, llm_pp_layers=[4], vit_pp_layers=[4])
    assert cli("Qwen2_5_VLConverter", "verify", "--cfg.mm_dir", tmp_path / "mm", "--cfg.hf_config.hf_dir", hf).returncode == 0
    path = tmp_path / "mm" / "release" / "mp_rank_01" / "model_optim_rng.pt"
    sd = torch.load(path, weights_only=True)
    sd["model"]["text_decoder.decoder.layers.2.mlp.linear_fc2.weight"][0, 0] += 1
    sd["model"]["text_decoder.extra.weight"] = torch.zeros(2)
    del sd["model"]["text_decoder.decoder.final_layernorm.weight"]
    torch.save(sd, path)
    p = cli("Qwen2_5_VLConverter", "verify", "--cfg.mm_dir", tmp_path / "mm", "--cfg.hf_config.hf_dir", hf)
    assert p.returncode == 1
    assert "mismatched: mp_rank_01/model_optim_rng.pt:model.text_decoder.decoder.layers.2.mlp.linear_fc2.weight" in p.stderr
    assert "unexpected: mp_rank_01/model_optim_rng.pt:model.text_decoder.extra.weight" in p.stderr
    assert "missing: mp_rank_01/model_optim_rng.pt:model.text_decoder.decoder.final_layernorm.weight" in p.stderr


def test_existing_output_refused_unless_overwrite(tiny_hf, tmp_path):
    hf = tiny_hf()
    (tmp_path / "mm").mkdir()
    (tmp_path / "mm" / "stale.pt").write_text("old")
    args = ["Qwen2_5_VLConverter", "hf_to_mm", "--cfg.mm_dir", tmp_path / "mm", "--cfg.hf_config.hf_dir", hf, "-q"]
    p = cli(*args)
    assert p.returncode == 2 and "--overwrite" in p.stderr
    p = cli(*args, "--overwrite")
    assert p.returncode == 0, p.stderr
    assert not (tmp_path / "mm" / "stale.pt").exists()


def test_check_logits_cli(tiny_hf, conv, tmp_path):
    hf = tiny_hf()
    conv.hf_to_mm(hf, tmp_path / "mm", tp_size=2, llm_pp_layers=[4], vit_pp_layers=[4])
    p = cli("Qwen2_5_VLConverter", "check_logits", "--cfg.mm_dir", tmp_path / "mm", "--cfg.hf_config.hf_dir", hf,
            "--cfg.parallel_config.tp_size", "2")
    assert p.returncode == 0, p.stderr
    assert "max abs logit difference" in p.stdout
    # another model's weights under the same shapes: far above tolerance, a non-zero exit naming the difference
    from mm_convert.testing import make_tiny_hf_checkpoint
    other = make_tiny_hf_checkpoint(tmp_path / "other", seed=1)
    p = cli("Qwen2_5_VLConverter", "check_logits", "--cfg.mm_dir", tmp_path / "mm", "--cfg.hf_config.hf_dir", other)
    assert p.returncode != 0
    assert "mm-convert: error:" in p.stderr and "tolerance" in p.stderr


def test_moe_family_command_lines_with_expert_parallelism(tmp_path):
    """Qwen3VLMegatronConverter from the command line: hf_to_mm at tp2 ep2, plan of a resplit to ep 4, the
    resplit itself, mm_to_hf back bit for bit, verify, and check_logits with the layout read off the shards.
    About 20-25 s: seven CLI processes (each imports torch), check_logits starting its two EP ranks."""
    from mm_convert.testing import make_tiny_hf_checkpoint

    hf = make_tiny_hf_checkpoint(tmp_path / "hf", family_name="Qwen3-VL", variant="moe", expert_layout="hub")
    conv = "Qwen3VLMegatronConverter"
    p = cli(conv, "hf_to_mm", "--cfg.mm_dir", tmp_path / "mm", "--cfg.hf_config.hf_dir", hf,
            "--cfg.parallel_config.llm_pp_layers", "[4]", "--cfg.parallel_config.vit_pp_layers", "[4]",
            "--cfg.parallel_config.tp_size", "2", "--cfg.parallel_config.ep_size", "2", "-q")
    assert p.returncode == 0, p.stderr
    assert sorted(load_mm_shards(tmp_path / "mm")) == [f"mp_rank_{t:02d}_{e:03d}/model_optim_rng.pt"
                                                       for t in range(2) for e in range(2)]
    p = cli(conv, "plan", "resplit", "--cfg.source_dir", tmp_path / "mm", "--cfg.target_dir", tmp_path / "mm4",
            "--cfg.target_parallel_config.llm_pp_layers", "[4]", "--cfg.target_parallel_config.vit_pp_layers", "[4]",
            "--cfg.target_parallel_config.tp_size", "1", "--cfg.target_parallel_config.ep_size", "4")
    assert p.returncode == 0, p.stderr
    assert "ep=2" in p.stdout and "ep=4" in p.stdout and "mp_rank_00_003" in p.stdout and not (tmp_path / "mm4").exists()
    p = cli(conv, "resplit", "--cfg.source_dir", tmp_path / "mm", "--cfg.target_dir", tmp_path / "mm4",
            "--cfg.target_parallel_config.llm_pp_layers", "[4]", "--cfg.target_parallel_config.vit_pp_layers", "[4]",
            "--cfg.target_parallel_config.tp_size", "1", "--cfg.target_parallel_config.ep_size", "4", "-q")
    assert p.returncode == 0, p.stderr
    p = cli(conv, "mm_to_hf", "--cfg.mm_dir", tmp_path / "mm4", "--cfg.save_hf_dir", tmp_path / "back",
            "--cfg.hf_config.hf_dir", hf, "-q")
    assert p.returncode == 0, p.stderr
    assert_same_tensors(load_hf_tensors(hf), load_hf_tensors(tmp_path / "back"))
    p = cli(conv, "verify", "--cfg.mm_dir", tmp_path / "mm4", "--cfg.hf_config.hf_dir", hf)
    assert p.returncode == 0 and "OK" in p.stdout + p.stderr, p.stderr
    p = cli(conv, "check_logits", "--cfg.mm_dir", tmp_path / "mm", "--cfg.hf_config.hf_dir", hf)
    assert p.returncode == 0, p.stderr
    assert "ep=2" in p.stdout and "max abs logit difference" in p.stdout
