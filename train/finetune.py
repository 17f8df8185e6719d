"""Fine-tune a Qwen-VL model on MM shards: ``torchrun --nproc-per-node N -m mm_train.finetune --data-config data.json
--load ckpt/mm_path/... --save out ...`` (or ``python -m mm_train.finetune --nproc N ...`` to start the ranks here).

World = DP x TP x PP; TP and PP (and VPP) are read off the ``--load`` checkpoint, DP is what is left. Each
iteration runs ``global_batch / (micro_batch * DP)`` micro-batches per DP rank (gradient accumulation), sums
gradients over DP, clips the global norm, and steps AdamW with linear warmup + cosine (or constant/linear)
decay. The loss is the token mean over the global batch. Saves go to ``--save`` every ``--save-interval``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from .batch import label_tokens, to_device
from .config import ModelConfig
from mm_convert.errors import ConfigError, LayoutError, MMConvertError

from .args import apply_model_json, no_effect_flags, parse_args
from .batch import pad_to
from .data import load_data_config
from .dataset import Data
from .optimizer import make_optimizer

__all__ = ["apply_model_json", "parse_args", "main", "cli"]


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
    from .parallel import pick_backend

    apply_model_json(args)
    torch.manual_seed(args.seed)
    dc = load_data_config(args.data_config)
    rank0 = int(os.environ.get("RANK", 0)) == 0
    if rank0 and no_effect_flags(args):
        print(f"[args] accepted, no effect here: {'; '.join(no_effect_flags(args))}", flush=True)
    if args.save:  # every rank, before anything is read: a crash during a save is undone (races are harmless)
        for line in saving.recover(args.save):
            if rank0:
                print(f"[save] {line}", flush=True)
    cfg = ModelConfig.from_hf(dc.model_name_or_path)
    converter = converter_for(read_hf_config(dc.model_name_or_path)[0], progress=False)
    layout = converter.layout_of(args.load, dc.model_name_or_path, "--load")
    check_layout_flags(args, cfg, layout, type(converter).__name__)
    world = int(os.environ.get("WORLD_SIZE", 1))
    mp = layout.tp_size * layout.pp_size
    if world % mp or world < mp:
        raise LayoutError(f"world size {world} is not a multiple of tp {layout.tp_size} x pp {layout.pp_size}")
    dp = world // mp
    per_step = args.micro_batch_size * dp
    if args.global_batch_size % per_step:
        raise ConfigError(f"--global-batch-size {args.global_batch_size} is not a multiple of micro batch x DP = {per_step}")
    n_micro = args.global_batch_size // per_step
    schedule = args.pipeline_schedule or ("1f1b" if layout.pp_size > 1 else "sequential")
    if not dist.is_initialized():
        backend, _ = pick_backend()
        dist.init_process_group(backend, timeout=timedelta(minutes=args.distributed_timeout_minutes))
    tm = TrainModel(cfg, layout, args.load, dp_size=dp, train_vit=args.train_vit, train_projector=not args.freeze_projector,
                    train_llm=not args.freeze_llm, recompute={"vision": args.vit_recompute, "llm": args.llm_recompute})
    ps = tm.ps
    check_trainable(args, tm)
    fixed = args.seq_length if layout.pp_size > 1 and not args.variable_seq_lengths else None
    if fixed and args.packed_sequences:  # a packed micro-batch holds up to micro-batch-size samples in one row
        fixed *= args.micro_batch_size
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
    timings: list[tuple[float, int]] = []  # (ms, real tokens) per iteration, for the --log-tps summary
    while it < args.train_iters:
        t0 = time.perf_counter()
        lr = learning_rate(args, it)
        for g in opt.param_groups:
            g["lr"] = lr
        steps = [data.next_step() for _ in range(n_micro)]
        batches = [[pad_to(data.batch(mb), fixed) for mb in step] for step in steps]  # [micro][dp rank]
        denom = float(sum(label_tokens(b) for micro in batches for b in micro))  # the global batch's targets
        real = sum(data.lengths[i] for step in steps for mb in step for i in mb)  # no padding
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=ps.device)
        if schedule == "gpipe":
            ctxs = [tm.forward(to_device(micro[ps.dp_rank], ps.device), denom, autocast) for micro in batches]
            outs = [tm.backward(c) for c in ctxs]
        elif schedule == "1f1b":
            outs = tm.train_step([micro[ps.dp_rank] for micro in batches], denom, autocast, "1f1b",
                                 prepare=lambda b: to_device(b, ps.device))
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
        timings.append((ms, real))
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
    if args.log_tps and ps.rank == 0:
        for line in throughput_summary(timings, args.global_batch_size):
            print(line, flush=True)


def throughput_summary(timings: list[tuple[float, int]], global_batch: int) -> list[str]:
    """What MindSpeed-MM's scripts compute from the log at the end of a run: the mean step time (the first,
    warm-up iteration left out when there are others), samples and tokens per second."""
    runs = timings[1:] or timings
    ms = sum(t for t, _ in runs) / len(runs)
    per_sample = sum(n for _, n in runs) / (len(runs) * global_batch)
    sps = global_batch * 1000 / ms
    return [f"Elapsed Time Per iteration: {ms:.1f}", f"Average Samples per Second: {sps:.3f}",
            f"Consumed Tokens per Second: {sps * per_sample:.3f}"]


def check_layout_flags(args, cfg, layout, converter: str) -> None:
    """The flags and model.json that describe the layout must describe the --load checkpoint's: one line
    naming both, and the resplit command that makes the checkpoint fit."""
    from mm_convert.layout import ParallelLayout

    for flag, want, have in (("--tensor-model-parallel-size", args.tensor_model_parallel_size, layout.tp_size),
                             ("--pipeline-model-parallel-size", args.pipeline_model_parallel_size, layout.pp_size)):
        if want is not None and want != have:
            raise LayoutError(f"{flag} {want}, but {args.load} is laid out with {have}; resplit it first")
    if args.mm_layout is not None:
        llm = args.mm_layout[0] or [cfg.text.num_layers]
        vit = args.mm_layout[1] or [cfg.vision.depth]
        want = ParallelLayout.create(layout.tp_size, llm, vit, layout.vit_tp_size, ep_size=layout.ep_size)
        if (want.llm_pp_layers, want.vit_pp_layers) != (layout.llm_pp_layers, layout.vit_pp_layers):
            have = {k: _flat(v) for k, v in layout.to_dict().items()}
            raise LayoutError(
                f"{args.mm_model}: pipeline_num_layers text_decoder {llm} / vision_encoder {vit}, but {args.load} "
                f"is laid out llm_pp_layers {have['llm_pp_layers']} / vit_pp_layers {have['vit_pp_layers']}; fix "
                f"model.json or run: mm-convert {converter} resplit --cfg.source_dir {args.load} --cfg.target_dir "
                f"{str(args.load).rstrip('/')}_resplit --cfg.target_parallel_config.tp_size {layout.tp_size} "
                f"--cfg.target_parallel_config.llm_pp_layers {_flat(llm)} "
                f"--cfg.target_parallel_config.vit_pp_layers {_flat(vit)}")
    vocab = layout.vocab_rows(cfg.text.vocab_size)  # the checkpoint's rows: padded where its shards are
    if args.vocab_size is None and args.make_vocab_size_divisible_by > 1:  # Megatron pads the tokenizer's vocabulary
        args_vocab = cfg.text.vocab_size
    else:
        args_vocab = args.vocab_size
    if args_vocab is not None:
        step = args.make_vocab_size_divisible_by * layout.tp_size
        padded = -(-args_vocab // step) * step
        if padded != vocab:
            raise ConfigError(f"--vocab-size {args_vocab} padded to a multiple of --make-vocab-size-divisible-by "
                              f"{args.make_vocab_size_divisible_by} x tp {layout.tp_size} is {padded}, but the model "
                              f"has {vocab} vocabulary rows")


def _flat(layers) -> str:
    return json.dumps(layers).replace(" ", "")


def check_trainable(args, tm) -> None:
    """Megatron's rule: a pipeline stage whose parameters are all frozen has nothing to optimize and needs
    --enable-dummy-optimizer (the articles' advice for frozen vision stages); every rank learns the verdict."""
    ps = tm.ps
    frozen = torch.tensor([0 if tm.parameters() else 1], device=ps.device)
    dist.all_reduce(frozen)
    if frozen.item() and not args.enable_dummy_optimizer:
        stages = [torch.zeros_like(frozen) for _ in range(ps.world_size)]
        dist.all_gather(stages, torch.tensor([0 if tm.parameters() else 1], device=ps.device))
        which = sorted({(r // ps.tp_size) % ps.pp_size for r, t in enumerate(stages) if t.item()})
        raise ConfigError(f"pipeline stage(s) {which} hold only frozen parameters (see model.json's freeze and "
                          f"pipeline_num_layers): add --enable-dummy-optimizer, or unfreeze a module they hold")


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
