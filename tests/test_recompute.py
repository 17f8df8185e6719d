"""Activation recomputation with Megatron's meanings, for the LLM and the vision encoder: it changes what the
forward keeps (measured as the bytes autograd saves outside recomputed regions), never a gradient."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mm_convert.errors import ConfigError
from mm_convert.layout import ParallelLayout
from mm_train.model import ImageEncoder, StageModel, TextDecoder
from mm_train.parallel import Group, ParallelState
from mm_train.recompute import Recompute
from test_train_step import make_batch

POLICIES = {"full-uniform-1": Recompute("full", "uniform", 1), "full-uniform-3": Recompute("full", "uniform", 3),
            "full-block-2": Recompute("full", "block", 2), "selective": Recompute("selective")}


@pytest.fixture(scope="module")
def stage_and_batch(tiny_hf, tmp_path_factory):
    cfg, batch = make_batch(tiny_hf("float32"), tmp_path_factory.mktemp("recompute"))
    one = Group(None, 0, 1)
    ps = ParallelState(rank=0, world_size=1, tp_size=1, pp_size=1, device=torch.device("cpu"), tp=one, vit=one)
    torch.manual_seed(0)
    stage = StageModel(cfg, ParallelLayout.create(1, [4], [4]), 0, ps)
    for p in stage.parameters():
        p.data.normal_(0, 0.1)
        p.requires_grad_(True)
    return stage, {k: v for k, v in batch.items() if k != "attention_mask"}


def grads_and_saved_bytes(stage, batch, vision: Recompute, llm: Recompute):
    for m in stage.modules():
        if isinstance(m, ImageEncoder):
            m.recompute = vision
        if isinstance(m, TextDecoder):
            m.recompute = llm
    stage.zero_grad(set_to_none=True)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = stage({}, batch, None)["logits"]
    F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100).backward()
    return {n: p.grad.clone() for n, p in stage.named_parameters()}, saved[0]


@pytest.mark.parametrize("module", ["vision", "llm"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_recompute_changes_memory_not_gradients(stage_and_batch, module, policy):
    stage, batch = stage_and_batch
    ref, ref_bytes = grads_and_saved_bytes(stage, batch, Recompute(), Recompute())
    setting = {"vision": Recompute(), "llm": Recompute(), module: POLICIES[policy]}
    got, got_bytes = grads_and_saved_bytes(stage, batch, setting["vision"], setting["llm"])
    assert all(torch.equal(got[n], g) for n, g in ref.items()), [n for n, g in ref.items() if not torch.equal(got[n], g)]
    assert all(g.abs().max() > 0 for g in ref.values())
    assert got_bytes < ref_bytes, (policy, module, got_bytes, ref_bytes)


def test_megatron_meanings_of_the_methods():
    """uniform: chunks of N layers, each keeping only its input; block: the first N layers one by one."""
    assert Recompute("full", "uniform", 2).chunks(5) == [(range(0, 2), "full"), (range(2, 4), "full"),
                                                         (range(4, 5), "full")]
    assert Recompute("full", "block", 2).chunks(5) == [(range(0, 1), "full"), (range(1, 2), "full"),
                                                       (range(2, 5), "plain")]
    assert Recompute("full", "block", 9).chunks(3) == [(range(i, i + 1), "full") for i in range(3)] + \
        [(range(3, 3), "plain")]
    assert Recompute("selective").chunks(3) == [(range(3), "selective")]
    assert Recompute().chunks(3) == [(range(3), "plain")]


@pytest.mark.parametrize("args,message", [
    (("full", None, 2), "needs a recompute method"),
    (("full", "uniform", None), "number of layers >= 1"),
    (("selective", "uniform", None), "takes no recompute method"),
    (("some", None, None), "expected one of"),
])
def test_settings_are_checked_as_megatron_does(args, message):
    with pytest.raises(ConfigError, match=message):
        Recompute.checked(*args, where="--recompute-granularity")
