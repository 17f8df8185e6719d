"""One training step against transformers (fp32): loss and every parameter's gradient (gathered over TP and
renamed by mm_to_hf) within 1e-5, at tp,pp = (1,1) and (2,2), with the vision encoder trained too."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mm_train.batch import collate
from mm_train.check_grads import engine_loss_and_grads, hf_loss_and_grads
from mm_train.config import ModelConfig
from mm_train.data import encode, parse_sample
from mm_train.inputs import load_processors
from mm_train.recompute import Recompute
from mm_convert.layout import ParallelLayout


def make_batch(hf_dir, tmp_path):
    """Two samples of different lengths, one with a non-square image and one text-only, right-padded."""
    from PIL import Image
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (56, 84, 3), np.uint8)).save(tmp_path / "a.png")
    tok, ip = load_processors(hf_dir)
    cfg = ModelConfig.from_hf(hf_dir)
    samples = [parse_sample({"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                                  {"from": "gpt", "value": "A red cat on a mat."}]}, "a"),
               parse_sample({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there."}]}, "b")]
    enc = [encode(s, tok, ip, tmp_path) for s in samples]
    batch = collate(enc, cfg)
    batch["attention_mask"] = torch.zeros_like(batch["input_ids"])
    for b, e in enumerate(enc):
        batch["attention_mask"][b, :len(e["input_ids"])] = 1
    return cfg, batch


RECOMPUTE = {None: None,  # both modules, with Megatron's meanings
             "full": {"vision": Recompute("full", "uniform", 2), "llm": Recompute("full", "uniform", 1)},
             "selective": {"vision": Recompute("selective"), "llm": Recompute("selective")},
             "block": {"vision": Recompute("full", "block", 2), "llm": Recompute("full", "block", 2)}}


@pytest.mark.parametrize("tp,llm,vit,tied,recompute,vit_tp", [
    (1, [4], [4], False, None, 0),
    (2, [1, 3], [4, 0], True, "full", 0),
    (1, [0, 4], [3, 1], False, "selective", 0),
    (1, [2, 2], [4, 0], False, "block", 0),
    (2, [[1, 1], [1, 1]], [[4, 0], [0, 0]], True, None, 0),  # virtual pipeline: 2 chunks per stage
    (2, [4], [4], False, None, 1)])  # vision encoder replicated over the LLM's 2 TP ranks
def test_step_equals_transformers(tp, llm, vit, tied, recompute, vit_tp, tiny_hf, conv, tmp_path):
    """(2,2) also has tied embeddings split over stages (their two copies' gradients are summed); the vision
    encoder's recomputation must not change a gradient; (1,2) splits the vision encoder over stages too."""
    hf = tiny_hf("float32", tied=tied)
    cfg, batch = make_batch(hf, tmp_path)
    assert (cfg.text.num_layers, cfg.vision.depth) == (4, 4)
    conv.hf_to_mm(hf, tmp_path / "mm", tp_size=tp, llm_pp_layers=llm, vit_pp_layers=vit, vit_tp_size=vit_tp)
    ref_loss, ref = hf_loss_and_grads(hf, batch)
    loss, got = engine_loss_and_grads(tmp_path / "mm", hf, cfg, ParallelLayout.create(tp, llm, vit, vit_tp), batch,
                                      recompute=RECOMPUTE[recompute])
    assert abs(loss - ref_loss) <= 1e-5, (loss, ref_loss)
    norm = got.pop("<grad_norm>").item()  # each distinct parameter counted once over TP, PP and tied copies
    ref_norm = torch.sqrt(sum(g.double().pow(2).sum() for g in ref.values())).item()
    assert abs(norm - ref_norm) <= 1e-5 * ref_norm, (norm, ref_norm)
    assert set(ref) == set(got)
    worst = max((got[n] - g).abs().max().item() for n, g in ref.items())
    assert worst <= 1e-5, {n: (got[n] - g).abs().max().item() for n, g in ref.items() if (got[n] - g).abs().max() > 1e-5}
    assert min(g.abs().max().item() for g in ref.values()) > 0  # every parameter gets a gradient
