"""The fine-tuning command line: Megatron's and MindSpeed-MM's flag names with their meanings, so the scripts
users run there (GPT_ARGS, MM_ARGS, OUTPUT_ARGS) run here unchanged.

Flags that tune kernels, fusions or services this runtime does not have are accepted and listed once at
start as having no effect here; a flag nobody knows stays an error naming it (argparse's).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mm_convert.errors import ConfigError

from .recompute import GRANULARITIES, METHODS, Recompute

# flag -> (takes a value, why it changes nothing here)
NO_EFFECT = {
    "--use-mcore-models": (False, "there is one model implementation"),
    "--use-flash-attn": (False, "attention kernels are picked by device"),
    "--use-fused-rmsnorm": (False, "no fused kernels on this device"),
    "--use-fused-swiglu": (False, "no fused kernels on this device"),
    "--use-fused-rotary-pos-emb": (False, "no fused kernels on this device"),
    "--no-masked-softmax-fusion": (False, "no fused kernels on this device"),
    "--no-gradient-accumulation-fusion": (False, "gradients accumulate in .grad"),
    "--sequence-parallel": (False, "activation memory layout only; results are the same"),
    "--overlap-grad-reduce": (False, "gradients are reduced after the backward"),
    "--overlap-param-gather": (False, "parameters are gathered after the step"),
    "--swiglu": (False, "the architecture comes from the checkpoint's config"),
    "--normalization": (True, "the architecture comes from the checkpoint's config"),
    "--tokenizer-type": (True, "the tokenizer is data.json's model_name_or_path"),
    "--context-parallel-algo": (True, "context parallel size is 1"),
    "--num-workers": (True, "samples are encoded in the training process"),
    "--mm-tool": (True, "no profiling tools here"),
    "--eval-interval": (True, "data.json names no validation set"),
    "--eval-iters": (True, "data.json names no validation set"),
    "--distributed-backend": (True, "the backend follows the device (gloo on CPU, nccl on CUDA, hccl on NPU)"),
}


def build_parser() -> argparse.ArgumentParser:
    a = argparse.ArgumentParser(prog="python -m mm_train.finetune", allow_abbrev=False,
                                description="Fine-tune on MM shards with Megatron / MindSpeed-MM's flags.")
    g = a.add_argument_group("data and model (MM_ARGS)")
    g.add_argument("--mm-data", "--data-config", dest="data_config", required=True, help="MindSpeed-MM data.json")
    g.add_argument("--mm-model", help="MindSpeed-MM model.json: pipeline_num_layers (checked against --load), "
                   "freeze of each module, the vision encoder's recomputation")
    g.add_argument("--seq-length", type=int, help="longest sample in tokens (image tokens included); longer ones are "
                   "bad samples; without --variable-seq-lengths, pp > 1 pads every micro-batch to it")
    g.add_argument("--variable-seq-lengths", action="store_true", help="micro-batches keep their own length "
                   "between pipeline stages (Megatron pads them to --seq-length otherwise)")
    g.add_argument("--packed-sequences", action="store_true",
                   help="each micro-batch's samples back to back without padding, attention inside each sample "
                        "(cu_seqlens) and positions restarting per sample; the same loss and gradients as padded "
                        "micro-batches, less compute (MindSpeed-MM's model.json text_decoder.use_remove_padding)")
    g.add_argument("--vocab-size", type=int, help="checked against the model's vocabulary")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=1,
                   help="checked: the checkpoint's vocabulary rows are vocab-size padded to a multiple of N x TP")
    g.add_argument("--skip-bad-samples", action="store_true",
                   help="train on the rest when samples are bad (missing / unreadable image, no assistant turn, "
                        "unknown role, too long): they are counted in the log and the save; by default the run stops "
                        "before training, listing them")
    g.add_argument("--train-vit", action="store_true", help="also train the vision encoder (model.json freeze)")
    g.add_argument("--freeze-projector", action="store_true", help="freeze the vision projector (model.json freeze)")
    g.add_argument("--freeze-llm", action="store_true", help="freeze the text decoder (model.json freeze)")

    g = a.add_argument_group("parallelism and optimizer (GPT_ARGS)")
    g.add_argument("--tensor-model-parallel-size", type=int, help="checked against the --load checkpoint's TP")
    g.add_argument("--pipeline-model-parallel-size", type=int, help="checked against the --load checkpoint's PP")
    g.add_argument("--context-parallel-size", type=int, default=1, help="1 (context parallelism is not implemented)")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=1)
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float)
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant"], default="cosine")
    g.add_argument("--lr-decay-iters", type=int)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="global gradient norm clip (0: off)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard the AdamW state over data-parallel ranks (ZeRO-1); saves gather it into distrib_optim.pt "
                   "beside each model_optim_rng.pt (Megatron's legacy format)")
    g.add_argument("--enable-dummy-optimizer", action="store_true",
                   help="let pipeline stages whose parameters are all frozen run (their optimizer has nothing to do)")
    g.add_argument("--recompute-granularity", choices=GRANULARITIES, help="the LLM's activation recomputation")
    g.add_argument("--recompute-method", choices=METHODS, help="full: uniform (chunks of N layers) or block "
                   "(the first N layers of each stage)")
    g.add_argument("--recompute-num-layers", type=int, help="full: the N of --recompute-method")
    g.add_argument("--pipeline-schedule", choices=["1f1b", "sequential", "gpipe"],
                   help="1f1b (the default when pp > 1): Megatron's 1F1B (interleaved with VPP): warm-up forwards, then "
                        "one forward / one backward, at most pp - stage micro-batches in flight; sequential (the default "
                        "at pp 1, where 1f1b is the same order): one micro-batch in flight, the stages take turns; gpipe: "
                        "all forwards, then all backwards (activations of every micro-batch held); results bit-identical")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (master weights and optimizer stay fp32)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="how long a collective waits for a peer before the run fails")
    g.add_argument("--nproc", type=int, help="start this many local ranks (instead of torchrun)")

    g = a.add_argument_group("checkpoints and logging (OUTPUT_ARGS)")
    g.add_argument("--load", required=True, help="MM checkpoint: converted (release) or a training save (latest "
                   "iteration)")
    g.add_argument("--save")
    g.add_argument("--save-interval", type=int, default=0)
    g.add_argument("--ckpt-format", choices=["torch"], default="torch", help="saves are mp_rank_* torch files")
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-save-rng", action="store_true")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--log-tps", action="store_true", help="log tokens per sample each iteration and the throughput "
                   "summary (step time, samples and tokens per second) at the end")
    g.add_argument("--log-json", help="rank 0 appends one JSON record per iteration here")

    g = a.add_argument_group("accepted, no effect here")
    for flag, (takes_value, why) in NO_EFFECT.items():
        dest = "noeffect_" + flag.lstrip("-").replace("-", "_")
        if takes_value:
            g.add_argument(flag, dest=dest, metavar="X", help=why)
        else:
            g.add_argument(flag, dest=dest, action="store_const", const=True, help=why)
    return a


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.context_parallel_size != 1:
        raise ConfigError(f"--context-parallel-size {args.context_parallel_size}: context parallelism is not "
                          f"implemented here; use 1 (and TP / PP / DP)")
    args.llm_recompute = Recompute.checked(args.recompute_granularity, args.recompute_method,
                                           args.recompute_num_layers, "--recompute-granularity/-method/-num-layers")
    args.vit_recompute = Recompute()
    args.mm_layout = None
    return args


def no_effect_flags(args) -> list[str]:
    """The flags given that change nothing here, with why (listed once at start)."""
    return [f"{flag} ({why})" for flag, (_, why) in NO_EFFECT.items()
            if getattr(args, "noeffect_" + flag.lstrip("-").replace("-", "_")) is not None]


def apply_model_json(args) -> None:
    """The seeds' model.json: each module's ``freeze`` (the flags can only unfreeze the vision encoder or freeze
    more), the vision encoder's recomputation (and the text decoder's, where the flags set none), and both
    modules' ``pipeline_num_layers`` (kept in ``args.mm_layout`` to check against the checkpoint), and the text
    decoder's ``use_remove_padding`` (packed sequences, as ``--packed-sequences``)."""
    if not args.mm_model:
        return
    where = args.mm_model
    doc = json.loads(Path(where).read_text())
    enc = doc.get("image_encoder", {})
    vit, proj, llm = enc.get("vision_encoder", {}), enc.get("vision_projector", {}), doc.get("text_decoder", {})
    if "freeze" in vit and not args.train_vit:
        args.train_vit = not vit["freeze"]
    args.freeze_projector = args.freeze_projector or bool(proj.get("freeze", False))
    args.freeze_llm = args.freeze_llm or bool(llm.get("freeze", False))
    args.packed_sequences = args.packed_sequences or bool(llm.get("use_remove_padding", False))
    args.vit_recompute = _module_recompute(vit, f"{where}: image_encoder.vision_encoder")
    if args.llm_recompute == Recompute():
        args.llm_recompute = _module_recompute(llm, f"{where}: text_decoder")
    if "pipeline_num_layers" in llm or "pipeline_num_layers" in vit:
        args.mm_layout = (llm.get("pipeline_num_layers"), vit.get("pipeline_num_layers"))


def _module_recompute(section: dict, where: str) -> Recompute:
    return Recompute.checked(section.get("recompute_granularity"), section.get("recompute_method"),
                             section.get("recompute_num_layers"), where)
