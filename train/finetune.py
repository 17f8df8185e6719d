"""Fine-tune a Qwen-VL model on MM shards: ``torchrun --nproc-per-node N -m mm_train.finetune --data-config data.json
--load ckpt/mm_path/... --save out ...`` (or ``python -m mm_train.finetune --nproc N ...`` to start the ranks here).

World = DP x TP x PP; TP and PP (and VPP) are read off the ``--load`` checkpoint, DP is what is left. Each
iteration runs ``global_batch / (micro_batch * DP)`` micro-batches per DP rank (gradient accumulation), sums
gradients over DP, clips the global norm, and steps AdamW with linear warmup + cosine (or constant/linear)
decay. The loss is the token mean over the global batch. Saves go to ``--save`` every ``--save-interval``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .batch import label_tokens, to_device
from .config import ModelConfig
from mm_convert.errors import ConfigError, LayoutError, MMConvertError

from .data import load_data_config
from .dataset import Data
from .optimizer import make_optimizer


def parse_args(argv=None):
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = a.add_argument
    add("--data-config", "--mm-data", dest="data_config", required=True, help="MindSpeed-MM data.json")
    add("--tensor-model-parallel-size", type=int, help="checked against the --load checkpoint's TP")
    add("--pipeline-model-parallel-size", type=int, help="checked against the --load checkpoint's PP")
    add("--mm-model", help="MindSpeed-MM model.json (vision freeze / recomputation settings)")
    add("--load", required=True, help="MM checkpoint: converted (release) or a training save (latest iteration)")
    add("--save")
    add("--save-interval", type=int, default=0)
    add("--use-distributed-optimizer", action="store_true",
        help="shard the AdamW state over data-parallel ranks (ZeRO-1), saved per DP rank as distrib_optim.pt")
    add("--no-save-optim", action="store_true")
    add("--no-save-rng", action="store_true")
    add("--no-load-optim", action="store_true")
    add("--no-load-rng", action="store_true")
    add("--micro-batch-size", type=int, default=1)
    add("--global-batch-size", type=int, default=1)
    add("--train-iters", type=int, required=True)
    add("--lr", type=float, default=1e-5)
    add("--min-lr", type=float, default=0.0)
    add("--lr-warmup-iters", type=int, default=0)
    add("--lr-warmup-fraction", type=float)
    add("--lr-decay-style", choices=["cosine", "linear", "constant"], default="cosine")
    add("--lr-decay-iters", type=int)
    add("--weight-decay", type=float, default=0.0)
    add("--adam-beta1", type=float, default=0.9)
    add("--adam-beta2", type=float, default=0.999)
    add("--adam-eps", type=float, default=1e-8)
    add("--clip-grad", type=float, default=1.0)
    add("--pipeline-schedule", choices=["sequential", "gpipe"], default="sequential",
        help="sequential: one micro-batch in flight; gpipe: all forwards, then all backwards (stages overlap, "
             "activations of every micro-batch are held)")
    add("--bf16", action="store_true", help="bf16 autocast (master weights and optimizer stay fp32)")
    add("--seed", type=int, default=1234)
    add("--train-vit", action="store_true", help="also train the vision encoder (frozen by default)")
    add("--freeze-projector", action="store_true", help="freeze the vision projector (trained by default)")
    add("--recompute-granularity", choices=["full", "selective"], help="vision encoder recomputation")
    add("--recompute-num-layers", type=int, help="full: recompute this many blocks per stage (default all)")
    add("--log-interval", type=int, default=1)
    add("--log-tps", action="store_true", help="also log tokens per second")
    add("--log-json", help="rank 0 appends one JSON record per iteration here")
    add("--nproc", type=int, help="start this many local ranks (instead of torchrun)")
    add("--seq-length", type=int, help="longest sample in tokens (image tokens included); longer ones are bad samples")
    add("--skip-bad-samples", action="store_true",
        help="train on the rest when samples are bad (missing / unreadable image, no assistant turn, unknown role, "
             "too long): they are counted in the log and the save; by default the run stops before training, "
             "listing them")
    return a.parse_args(argv)


def apply_model_json(args) -> None:
    """The seeds' model.json: image_encoder.vision_encoder.{freeze, recompute_granularity, recompute_method,
    recompute_num_layers} and image_encoder.vision_projector.freeze."""
    if not args.mm_model:
        return
    enc = json.loads(Path(args.mm_model).read_text()).get("image_encoder", {})
    vit, proj = enc.get("vision_encoder", {}), enc.get("vision_projector", {})
    if "freeze" in vit and not args.train_vit:
        args.train_vit = not vit["freeze"]
    args.freeze_projector = args.freeze_projector or bool(proj.get("freeze", False))
    args.recompute_granularity = args.recompute_granularity or vit.get("recompute_granularity")
    if args.recompute_num_layers is None and vit.get("recompute_method") == "uniform":
        args.recompute_num_layers = vit.get("recompute_num_layers")


def learning_rate(args, it: int) -> float:
    """Linear warmup over the first iterations, then decay to min_lr by lr_decay_iters (Megatron's shape)."""
    warm = args.lr_warmup_iters
    if args.lr_warmup_fraction is not None:
        warm = int(args.lr_warmup_fraction * args.train_iters)
    if warm and it < warm:
        return args.lr * (it + 1) / warm
    if args.lr_decay_style == "constant":
        return args.lr
    total = (args.lr_decay_iters or args.train_iters) - warm
    frac = min(1.0, (it - warm) / max(1, total))
    coef = 0.5 * (1 + math.cos(math.pi * frac)) if args.lr_decay_style == "cosine" else 1 - frac
    return args.min_lr + (args.lr - args.min_lr) * coef


def train(args) -> None:
    from mm_convert.converter import converter_for

    from .config import read_hf_config

    from . import saving
    from .engine import TrainModel

    apply_model_json(args)
    torch.manual_seed(args.seed)
    dc = load_data_config(args.data_config)
    if args.save:  # every rank, before anything is read: a crash during a save is undone (races are harmless)
        for line in saving.recover(args.save):
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"[save] {line}", flush=True)
    cfg = ModelConfig.from_hf(dc.model_name_or_path)
    layout = converter_for(read_hf_config(dc.model_name_or_path)[0], progress=False).layout_of(
        args.load, dc.model_name_or_path, "--load")
    for flag, want, have in (("--tensor-model-parallel-size", args.tensor_model_parallel_size, layout.tp_size),
                             ("--pipeline-model-parallel-size", args.pipeline_model_parallel_size, layout.pp_size)):
        if want is not None and want != have:
            raise LayoutError(f"{flag} {want}, but {args.load} is laid out with {have}; resplit it first")
    world = int(os.environ.get("WORLD_SIZE", 1))
    mp = layout.tp_size * layout.pp_size
    if world % mp:
        raise LayoutError(f"world size {world} is not a multiple of tp {layout.tp_size} x pp {layout.pp_size}")
    dp = world // mp
    per_step = args.micro_batch_size * dp
    if args.global_batch_size % per_step:
        raise ConfigError(f"--global-batch-size {args.global_batch_size} is not a multiple of micro batch x DP = {per_step}")
    n_micro = args.global_batch_size // per_step
    tm = TrainModel(cfg, layout, args.load, dp_size=dp, train_vit=args.train_vit, train_projector=not args.freeze_projector,
                    recompute=args.recompute_granularity, recompute_layers=args.recompute_num_layers)
    ps = tm.ps
    opt = make_optimizer(args, tm)
    data = Data(args, cfg, dp, ps.dp_rank)
    state = saving.load(args.load, tm, opt, load_optim=not args.no_load_optim, load_rng=not args.no_load_rng)
    it = state["iteration"]
    consumed = (state["scheduler"] or {}).get("consumed_samples", 0)
    if state["data_state"]:
        data.restore(state["data_state"])
    autocast = torch.bfloat16 if args.bf16 else None
    log = None
    if ps.rank == 0 and args.log_json:
        log = open(args.log_json, "a")
    plain = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) or v is None}
    while it < args.train_iters:
        t0 = time.perf_counter()
        lr = learning_rate(args, it)
        for g in opt.param_groups:
            g["lr"] = lr
        steps = [data.next_step() for _ in range(n_micro)]
        batches = [[data.batch(mb) for mb in step] for step in steps]  # [micro][dp rank]
        denom = float(sum(label_tokens(b) for micro in batches for b in micro))  # the global batch's targets
        real = sum(data.lengths[i] for step in steps for mb in step for i in mb)  # no padding
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=ps.device)
        if args.pipeline_schedule == "gpipe":
            ctxs = [tm.forward(to_device(micro[ps.dp_rank], ps.device), denom, autocast) for micro in batches]
            outs = [tm.backward(c) for c in ctxs]
        else:
            outs = [tm.forward_backward(to_device(micro[ps.dp_rank], ps.device), denom, autocast) for micro in batches]
        for out in outs:
            if out is not None and ps.tp_rank == 0:
                loss_sum += out.double()
        tm.reduce_grads()
        norm = tm.clip_grads(args.clip_grad)
        opt.step()
        dist.all_reduce(loss_sum)  # only TP 0 of each replica's last stage contributed
        it += 1
        consumed += args.global_batch_size
        ms = (time.perf_counter() - t0) * 1000
        loss = loss_sum.item() / max(denom, 1)
        if log:  # every iteration
            log.write(json.dumps({"iteration": it, "loss": loss, "grad_norm": norm, "lr": lr, "ms": ms,
                                  "tokens_per_s": real / (ms / 1000), "consumed_samples": consumed}) + "\n")
            log.flush()
        if ps.rank == 0 and (it % args.log_interval == 0 or it == args.train_iters):
            line = (f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {it:8d}/{args.train_iters:8d} | consumed samples: {consumed:12d} | elapsed time per "
                    f"iteration (ms): {ms:.1f} | learning rate: {lr:.6E} | global batch size: {args.global_batch_size:5d}"
                    f" | loss: {loss:.6E} | grad norm: {norm:.3f} |")
            if args.log_tps:
                line += f" tokens per sample: {real / args.global_batch_size:.1f} | tokens/s: {real / (ms / 1000):.1f} |"
            print(line, flush=True)
        if args.save and (it == args.train_iters or (args.save_interval and it % args.save_interval == 0)):
            sched = {"iteration": it, "consumed_samples": consumed, "lr": lr}
            saving.save(args.save, it, tm, opt, sched, data.state(), plain,
                        save_optim=not args.no_save_optim, save_rng=not args.no_save_rng)
            if ps.rank == 0:
                print(f"saved checkpoint at iteration {it} to {args.save}", flush=True)
    if log:
        log.close()


def main(argv=None) -> None:
    args = parse_args(argv)
    if "RANK" not in os.environ:  # not under torchrun: start the ranks here (one by default)
        from .launch import launch_local
        argv = list(sys.argv[1:] if argv is None else argv)
        launch_local("mm_train.finetune", argv, args.nproc or 1, timeout=None, show_rank0=True)
        return
    from .launch import worker_main
    worker_main(train, args)


def cli(argv=None) -> None:
    """``python -m mm_train.finetune``: errors of the tool's own kinds (bad data, checkpoint, layout) are printed
    once (by rank 0 under torchrun), without a traceback, and exit 2."""
    try:
        main(argv)
    except MMConvertError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            for line in str(e).splitlines():
                print(f"mm_train.finetune: error: {line}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    cli()
