"""mm-convert: command line over the Python API (mm_convert/converter.py); each command calls one method.

    mm-convert Qwen2_5_VLConverter hf_to_mm --cfg.mm_dir OUT --cfg.hf_config.hf_dir HF \
        --cfg.parallel_config.llm_pp_layers [[1,10,10,7]] --cfg.parallel_config.vit_pp_layers [[32,0,0,0]] \
        --cfg.parallel_config.tp_size 1

Options use the dotted ``--cfg.*`` names of MindSpeed-MM's converter; ``--config file.yaml`` supplies the
same keys (``mm_dir``, ``hf_config: {hf_dir}``, ``parallel_config: {...}``, optionally under ``cfg:``).
"""
from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path

import click

from .converter import CONVERTERS, Result, VerifyReport
from .errors import MMConvertError, Terminated

LAYOUT_HELP = {
    "tp_size": "tensor-parallel size (LLM; also the vision encoder unless vit_tp_size is set)",
    "vit_tp_size": "tensor-parallel size of the vision encoder; 0 = same as tp_size; must divide tp_size",
    "llm_pp_layers": "LLM layers per pipeline stage: [1,10,10,7] or nested per virtual chunk [[0,1],[1,2]]",
    "vit_pp_layers": "vision layers per stage, same shape as llm_pp_layers; vision comes first, e.g. [[32,0,0,0]]",
    "ep_size": "expert-parallel size (MoE models): each MoE layer's experts split evenly over EP ranks, "
               "shards mp_rank_TT[_PPP]_EEE",
}


def _cfg(dotted: str, param: str, *aliases: str, **kw):
    """A ``--cfg.<dotted>`` option stored in ``param``; remembered for --config files. ``aliases``: other
    spellings of the option (MindSpeed-MM's own names where they differ)."""
    def deco(f):
        f.__dict__.setdefault("_cfg_keys", {})[dotted] = param
        return click.option(f"--cfg.{dotted}", *aliases, param, **kw)(f)
    return deco


def _layout_options(prefix: str, param_prefix: str, required_tp: bool):
    def deco(f):
        for key in reversed(list(LAYOUT_HELP)):
            default = None
            if required_tp and key == "tp_size":
                default = 1
            if required_tp and key == "vit_tp_size":
                default = 0
            if required_tp and key == "ep_size":
                default = 1
            typ = int if key.endswith("_size") else str
            f = _cfg(f"{prefix}.{key}", f"{param_prefix}{key}", type=typ, default=default, show_default=default is not None,
                     metavar="N" if typ is int else "LIST", help=LAYOUT_HELP[key])(f)
        return f
    return deco


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _load_config(ctx: click.Context, _param, value):
    if not value:
        return value
    import yaml
    try:
        doc = yaml.safe_load(Path(value).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise click.BadParameter(f"{value}: cannot read YAML ({e})")
    if not isinstance(doc, dict):
        raise click.BadParameter(f"{value}: expected a mapping of cfg keys")
    doc = doc.get("cfg", doc)
    keys = ctx.command.callback.__dict__.get("_cfg_keys", {})
    defaults = {}
    for dotted, v in _flatten(doc).items():
        if dotted not in keys:
            raise click.BadParameter(f"{value}: unknown key {dotted!r}; known: {', '.join(sorted(keys))}")
        defaults[keys[dotted]] = str(v) if isinstance(v, list) else v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _common(f):
    f = click.option("--debug", is_flag=True, help="show a traceback on errors")(f)
    f = click.option("--quiet", "-q", is_flag=True, help="no progress bar and no summary")(f)
    f = click.option("--config", type=click.Path(dir_okay=False), callback=_load_config, is_eager=True, expose_value=False,
                     help="YAML file with the same keys as the --cfg.* options (mm_dir, hf_config.hf_dir, parallel_config.*)")(f)
    return f


def _no_verify_source(f):
    return click.option("--no-verify-source", "no_verify_source", is_flag=True,
                        help="skip the source check: by default the CRC-32 of every byte read from an MM shard is "
                             "compared with the one torch's zip format stores with it (a few percent of CPU, no "
                             "extra reads), and a mismatch stops the command before anything is renamed into place")(f)


def _resume(f):
    return click.option("--resume", is_flag=True,
                        help="continue an interrupted run: finished files whose size and sha256 match its journal "
                             "are kept (same plan only), the rest is redone")(f)


def _workers(f):
    def keep(ctx, _param, value):
        ctx.meta["mm_convert.workers"] = value
        return value
    return click.option("--workers", type=click.IntRange(min=1), default=None, expose_value=False, callback=keep,
                        metavar="N", help="processes writing output files in parallel [default: the machine's cores; "
                                          "under torchrun the ranks also split the files among themselves]")(f)


def _run(ctx: click.Context, fn):
    """Call into the API; errors become one line on stderr and a non-zero exit (traceback with --debug)."""
    debug = ctx.params.get("debug")
    try:
        return fn()
    except MMConvertError as e:
        if debug:
            traceback.print_exc()
        click.echo(f"mm-convert: error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt as e:
        term = isinstance(e, Terminated)
        click.echo(f"mm-convert: {'terminated (SIGTERM)' if term else 'interrupted'}; nothing was written at the "
                   f"destination (finished files are kept for --resume)", err=True)
        sys.exit(143 if term else 130)
    except OSError as e:
        if debug:
            traceback.print_exc()
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        click.echo(f"mm-convert: error: {where}{e.strerror or e}", err=True)
        sys.exit(1)


def _print_result(r: Result, quiet: bool, verbose: bool = False, dry_run: bool = False) -> None:
    if quiet:
        return
    from rich.console import Console
    from rich.table import Table
    con = Console(soft_wrap=True)
    title = f"{'plan for ' if dry_run else ''}{r.command}: {r.layout}"
    table = Table(title=title, title_justify="left")
    for col in ("file", "tensors", "bytes"):
        table.add_column(col, justify="right" if col != "file" else "left")
    for f in r.files:
        n = sum(1 for _ in f.tensors)
        table.add_row(f.path, str(n), f"{f.nbytes:,}")
    con.print(table)
    if verbose:
        for f in r.files:
            con.print(f"[bold]{f.path}[/bold]")
            for slot, ts in f.slots.items():
                for t in ts:
                    src = ", ".join(f"{p.src.file + ':' if p.src.file else ''}{p.src.slot + '.' if p.src.slot else ''}{p.src.key}"
                                    f"[{','.join(f'{s}:{s + n}' for s, n in zip(p.src_start, p.shape))}]" for p in t.pieces)
                    con.print(f"  {(slot + '.') if slot else ''}{t.key} {list(t.shape)} {str(t.dtype).replace('torch.', '')} <- {src}")
    total = sum(f.nbytes for f in r.files)
    if dry_run:
        con.print(f"{len(r.files)} files, {r.tensors} tensors, {total / 1e9:.3f} GB would be written to {r.output}; nothing written")
    else:
        rate = total / r.seconds / 1e9 if r.seconds else 0.0
        con.print(f"wrote {r.output}: {len(r.files)} files, {r.tensors} tensors, {total / 1e9:.3f} GB in {r.seconds:.1f} s ({rate:.2f} GB/s)")
        for n in r.notes:
            con.print(n)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="mm_convert")
def main():
    """Convert and reshard multimodal checkpoints between Hugging Face safetensors and the
    MindSpeed-MM / Megatron tensor- and pipeline-parallel layout.

    \b
    Usage: mm-convert CONVERTER COMMAND [--cfg.* options]
    Converters:  {converters}
    Commands:    hf_to_mm, mm_to_hf, resplit, verify, plan, check_logits (and hf_to_dcp, dcp_to_hf: MindSpeed-MM's
                 FSDP2 checkpoints, for the converters whose family has them)
    Example:
      mm-convert Qwen2_5_VLConverter hf_to_mm --cfg.mm_dir ckpt/mm_path/Qwen2.5-VL-7B-Instruct \\
        --cfg.hf_config.hf_dir ckpt/hf_path/Qwen2.5-VL-7B-Instruct \\
        --cfg.parallel_config.llm_pp_layers [[1,10,10,7]] --cfg.parallel_config.vit_pp_layers [[32,0,0,0]] \\
        --cfg.parallel_config.tp_size 1
    """


def _make_group(name: str, cls) -> click.Group:
    @click.group(name=name, help=f"{cls.__doc__.strip()}\n\nRun `mm-convert {name} COMMAND --help` for a command's options.")
    def group():
        pass

    @group.command("hf_to_mm")
    @_cfg("mm_dir", "mm_dir", required=True, metavar="DIR", help="output MM checkpoint directory")
    @_cfg("hf_config.hf_dir", "hf_dir", required=True, metavar="DIR", help="input Hugging Face checkpoint (config.json + safetensors)")
    @_layout_options("parallel_config", "", True)
    @_cfg("save_format", "save_format", default="torch", show_default=True, type=click.Choice(["torch", "torch_dist"]),
          help="torch: mp_rank_* shards in the layout given; torch_dist: Megatron's distributed checkpoint "
               "(global tensors, any TP / PP chosen when Megatron loads it)")
    @click.option("--overwrite", is_flag=True, help="replace an existing non-empty output directory as a whole")
    @_resume
    @_workers
    @_common
    @click.pass_context
    def hf_to_mm(ctx, mm_dir, hf_dir, tp_size, vit_tp_size, llm_pp_layers, vit_pp_layers, ep_size, save_format, overwrite,
                 resume, quiet, debug):
        """Convert an HF checkpoint into MM shards (release/mp_rank_*/model_optim_rng.pt), or with
        --cfg.save_format torch_dist into Megatron's torch_dist format (release/*.distcp + .metadata).

        Every tensor is placed by the layer lists and split by the TP size; the layout is checked against
        config.json first (sums, shapes, vision before LLM, TP divisibility)."""
        conv = cls(progress=not quiet, workers=ctx.meta.get("mm_convert.workers"))
        r = _run(ctx, lambda: conv.hf_to_mm(hf_dir, mm_dir, tp_size, llm_pp_layers, vit_pp_layers, vit_tp_size,
                                            ep_size=ep_size, save_format=save_format, overwrite=overwrite, resume=resume))
        _print_result(r, quiet)

    @group.command("mm_to_hf")
    @_cfg("mm_dir", "mm_dir", required=True, metavar="DIR", help="input MM checkpoint (release or a training save)")
    @_cfg("save_hf_dir", "save_hf_dir", required=True, metavar="DIR", help="output Hugging Face directory")
    @_cfg("hf_config.hf_dir", "hf_dir", metavar="DIR",
          help="original HF directory: config, tokenizer, processor and chat template are copied from it "
               "(optional when mm_dir was written by mm_convert, which records the config)")
    @_layout_options("parallel_config", "", False)
    @_cfg("max_shard_size", "max_shard_size", default="5GB", show_default=True, metavar="SIZE",
          help="largest safetensors file (e.g. 5GB, 500MB, 2GiB)")
    @click.option("--overwrite", is_flag=True, help="replace an existing non-empty output directory as a whole")
    @_resume
    @_no_verify_source
    @_workers
    @_common
    @click.pass_context
    def mm_to_hf(ctx, mm_dir, save_hf_dir, hf_dir, tp_size, vit_tp_size, llm_pp_layers, vit_pp_layers, ep_size,
                 max_shard_size, overwrite, resume, no_verify_source, quiet, debug):
        """Convert MM shards back to HF safetensors (sharded, with an index), keeping dtypes and the key scheme.

        The layout is read off the shards; --cfg.parallel_config.* values, if given, are checked against it."""
        conv = cls(progress=not quiet, workers=ctx.meta.get("mm_convert.workers"))
        r = _run(ctx, lambda: conv.mm_to_hf(mm_dir, save_hf_dir, hf_dir, tp_size, llm_pp_layers, vit_pp_layers, vit_tp_size,
                                            ep_size=ep_size, max_shard_size=max_shard_size, overwrite=overwrite,
                                            verify_source=not no_verify_source,
                                            resume=resume))
        _print_result(r, quiet)

    @group.command("resplit")
    @_cfg("source_dir", "source_dir", required=True, metavar="DIR", help="input MM checkpoint")
    @_cfg("target_dir", "target_dir", required=True, metavar="DIR", help="output MM checkpoint")
    @_cfg("hf_config.hf_dir", "hf_dir", metavar="DIR", help="HF directory for config.json (optional when source_dir was written by mm_convert)")
    @_layout_options("source_parallel_config", "source_", False)
    @_layout_options("target_parallel_config", "", True)
    @click.option("--overwrite", is_flag=True, help="replace an existing non-empty output directory as a whole")
    @_resume
    @_no_verify_source
    @_workers
    @_common
    @click.pass_context
    def resplit(ctx, source_dir, target_dir, hf_dir, source_tp_size, source_vit_tp_size, source_llm_pp_layers,
                source_vit_pp_layers, source_ep_size, tp_size, vit_tp_size, llm_pp_layers, vit_pp_layers, ep_size, overwrite,
                resume, no_verify_source, quiet, debug):
        """Reshard MM shards to another TP / PP / virtual-pipeline layout directly, without HF files in between.

        The source layout is read off its shards (--cfg.source_parallel_config.* values are checked against it)."""
        conv = cls(progress=not quiet, workers=ctx.meta.get("mm_convert.workers"))
        r = _run(ctx, lambda: conv.resplit(source_dir, target_dir, tp_size, llm_pp_layers, vit_pp_layers, vit_tp_size,
                                           ep_size=ep_size, source_ep_size=source_ep_size, verify_source=not no_verify_source,
                                           source_tp_size=source_tp_size, source_llm_pp_layers=source_llm_pp_layers,
                                           source_vit_pp_layers=source_vit_pp_layers, source_vit_tp_size=source_vit_tp_size,
                                           hf_dir=hf_dir, overwrite=overwrite, resume=resume))
        _print_result(r, quiet)

    dcp = bool(getattr(cls.spec, "DCP_KEY_SCHEME", None))  # MindSpeed-MM's FSDP2 checkpoints (DCP directories)
    if dcp:
        @group.command("hf_to_dcp")
        @_cfg("dcp_dir", "dcp_dir", "--dcp_dir", required=True, metavar="DIR",
              help="output DCP checkpoint directory (release/ + latest_checkpointed_iteration.txt)")
        @_cfg("hf_config.hf_dir", "hf_dir", "--hf_dir", required=True, metavar="DIR",
              help="input Hugging Face checkpoint (config.json + safetensors)")
        @click.option("--overwrite", is_flag=True, help="replace an existing non-empty output directory as a whole")
        @_resume
        @_workers
        @_common
        @click.pass_context
        def hf_to_dcp(ctx, dcp_dir, hf_dir, overwrite, resume, quiet, debug):
            """Convert an HF checkpoint into MindSpeed-MM's FSDP2 checkpoint: a torch.distributed.checkpoint
            directory (release/.metadata + __K_0.distcp) of {"model": {...}, "checkpoint_version": 3.0}, the HF
            keys under the model prefix, fused expert tensors viewed 2-D."""
            conv = cls(progress=not quiet, workers=ctx.meta.get("mm_convert.workers"))
            r = _run(ctx, lambda: conv.hf_to_dcp(hf_dir, dcp_dir, overwrite=overwrite, resume=resume))
            _print_result(r, quiet)

        @group.command("dcp_to_hf")
        @_cfg("dcp_dir", "dcp_dir", "--load_dir", required=True, metavar="DIR",
              help="input DCP checkpoint: the directory with latest_checkpointed_iteration.txt, or the iteration "
                   "directory holding .metadata")
        @_cfg("save_hf_dir", "save_hf_dir", "--save_dir", required=True, metavar="DIR",
              help="output Hugging Face directory")
        @_cfg("hf_config.hf_dir", "hf_dir", "--model_assets_dir", metavar="DIR",
              help="original HF directory: config, tokenizer, processor and chat template are copied from it, and "
                   "its weights' key scheme and expert layout are kept (optional when dcp_dir was written by mm_convert)")
        @_cfg("max_shard_size", "max_shard_size", default="5GB", show_default=True, metavar="SIZE",
              help="largest safetensors file (e.g. 5GB, 500MB, 2GiB)")
        @click.option("--overwrite", is_flag=True, help="replace an existing non-empty output directory as a whole")
        @_resume
        @_workers
        @_common
        @click.pass_context
        def dcp_to_hf(ctx, dcp_dir, save_hf_dir, hf_dir, max_shard_size, overwrite, resume, quiet, debug):
            """Convert MindSpeed-MM's FSDP2 checkpoint (DCP) back to HF safetensors (sharded, with an index):
            expert tensors back to 3-D, the model prefix stripped, every key checked against config.json."""
            conv = cls(progress=not quiet, workers=ctx.meta.get("mm_convert.workers"))
            r = _run(ctx, lambda: conv.dcp_to_hf(dcp_dir, save_hf_dir, hf_dir, max_shard_size=max_shard_size,
                                                 overwrite=overwrite, resume=resume))
            _print_result(r, quiet)

    @group.command("verify")
    @_cfg("mm_dir", "mm_dir", required=True, metavar="DIR",
          help="checkpoint to check (an MM checkpoint, or without --cfg.hf_config.hf_dir any mm_convert output)")
    @_cfg("hf_config.hf_dir", "hf_dir", metavar="DIR",
          help="HF checkpoint it was converted from; without it only the manifest (sizes, sha256) is checked")
    @_layout_options("parallel_config", "", False)
    @_common
    @click.pass_context
    def verify(ctx, mm_dir, hf_dir, tp_size, vit_tp_size, llm_pp_layers, vit_pp_layers, ep_size, quiet, debug):
        """Check an output against its mm_convert_manifest.json (every file's size and sha256; the first mismatch
        is named) and, given the HF source, every MM tensor bit for bit, plus a coverage report naming any missing
        or unexpected key. Exits 1 on any difference."""
        conv = cls(progress=not quiet)
        rep: VerifyReport = _run(ctx, lambda: conv.verify(hf_dir, mm_dir, tp_size, llm_pp_layers, vit_pp_layers, vit_tp_size,
                                                          ep_size=ep_size))
        for what, items in (("mismatched", rep.mismatched), ("missing", rep.missing), ("unexpected", rep.unexpected),
                            ("HF tensor not covered", rep.unused_hf)):
            for k in items:
                click.echo(f"{what}: {k}", err=True)
        if rep.manifest_error:
            click.echo(f"manifest mismatch: {rep.manifest_error}", err=True)
        click.echo(rep.summary(), err=not rep.ok)
        sys.exit(0 if rep.ok else 1)

    @group.command("plan", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                             "help_option_names": []})
    @click.argument("command", type=click.Choice(["hf_to_mm", "mm_to_hf", "resplit"]
                                                 + (["hf_to_dcp", "dcp_to_hf"] if dcp else [])))
    @click.option("--verbose", "-v", is_flag=True, help="list every tensor and the source boxes it is made of")
    @click.pass_context
    def plan(ctx, command, verbose):
        """Dry run of hf_to_mm, mm_to_hf, resplit (hf_to_dcp, dcp_to_hf where the family has them; same options):
        per-file tensors and bytes; writes nothing.

        Example: mm-convert Qwen2_5_VLConverter plan hf_to_mm --cfg.mm_dir OUT --cfg.hf_config.hf_dir HF ..."""
        sub = group.commands[command]
        sub_ctx = sub.make_context(command, list(ctx.args), parent=ctx)
        p = sub_ctx.params
        conv = cls(progress=False)
        calls = {
            "hf_to_mm": lambda: conv.hf_to_mm(p["hf_dir"], p["mm_dir"], p["tp_size"], p["llm_pp_layers"], p["vit_pp_layers"],
                                              p["vit_tp_size"], ep_size=p["ep_size"], save_format=p["save_format"],
                                              dry_run=True),
            "mm_to_hf": lambda: conv.mm_to_hf(p["mm_dir"], p["save_hf_dir"], p["hf_dir"], p["tp_size"], p["llm_pp_layers"],
                                              p["vit_pp_layers"], p["vit_tp_size"], ep_size=p["ep_size"],
                                              max_shard_size=p["max_shard_size"], dry_run=True),
            "resplit": lambda: conv.resplit(p["source_dir"], p["target_dir"], p["tp_size"], p["llm_pp_layers"], p["vit_pp_layers"],
                                            p["vit_tp_size"], ep_size=p["ep_size"], source_ep_size=p["source_ep_size"],
                                            source_tp_size=p["source_tp_size"],
                                            source_llm_pp_layers=p["source_llm_pp_layers"],
                                            source_vit_pp_layers=p["source_vit_pp_layers"],
                                            source_vit_tp_size=p["source_vit_tp_size"], hf_dir=p["hf_dir"], dry_run=True),
            "hf_to_dcp": lambda: conv.hf_to_dcp(p["hf_dir"], p["dcp_dir"], dry_run=True),
            "dcp_to_hf": lambda: conv.dcp_to_hf(p["dcp_dir"], p["save_hf_dir"], p["hf_dir"],
                                                max_shard_size=p["max_shard_size"], dry_run=True),
        }
        r = _run(sub_ctx, calls[command])
        _print_result(r, False, verbose=verbose, dry_run=True)

    @group.command("check_logits")
    @_cfg("mm_dir", "mm_dir", required=True, metavar="DIR", help="MM checkpoint to run with the bundled runtime")
    @_cfg("hf_config.hf_dir", "hf_dir", required=True, metavar="DIR", help="HF checkpoint to run with transformers")
    @_layout_options("parallel_config", "", False)
    @click.option("--tolerance", type=float, default=1e-5, show_default=True, help="largest allowed max abs logit difference")
    @_common
    @click.pass_context
    def check_logits(ctx, mm_dir, hf_dir, tp_size, vit_tp_size, llm_pp_layers, vit_pp_layers, ep_size, tolerance, quiet,
                     debug):
        """Run transformers on the HF checkpoint and the bundled runtime (tp x pp local processes) on the MM
        checkpoint with the same image + text input; print the max abs logit difference, exit 1 above --tolerance."""
        def go():
            from mm_train.check_logits import check_logits as run_check
            return run_check(mm_dir, hf_dir, tp_size=tp_size, llm_pp_layers=llm_pp_layers, vit_pp_layers=vit_pp_layers,
                             tolerance=tolerance, vit_tp_size=vit_tp_size, ep_size=ep_size,
                             log=lambda s: None if quiet else click.echo(s))
        diff = _run(ctx, go)
        click.echo(f"max abs logit difference: {diff:.3e} (tolerance {tolerance:.1e})")

    return group


for _name, _cls in CONVERTERS.items():
    main.add_command(_make_group(_name, _cls))
main.help = main.help.replace("{converters}", ", ".join(CONVERTERS))


def _split_glued(argv: list[str]) -> list[str]:
    """Accept ``--cfg.mm_dir"ckpt/..."`` as typed in some guides (the shell glues value to option)."""
    known = sorted({f"--cfg.{k}" for c in main.commands.values() for cmd in c.commands.values()
                    for k in cmd.callback.__dict__.get("_cfg_keys", {})}, key=len, reverse=True)
    out = []
    for a in argv:
        for k in known:
            if a.startswith(k) and len(a) > len(k) and a[len(k)] not in "=._":
                out += [k, a[len(k):]]
                break
        else:
            out.append(a)
    return out


def _on_sigterm(signum, frame):
    raise Terminated()


def run(argv=None):
    signal.signal(signal.SIGTERM, _on_sigterm)  # clean up like Ctrl-C (forked workers inherit it)
    main.main(args=_split_glued(list(sys.argv[1:] if argv is None else argv)), prog_name="mm-convert")


def entry() -> None:
    """The ``mm-convert`` command: :func:`run`, then exit without the interpreter's teardown, which after
    importing torch takes ~0.5 s here, for nothing: every output is complete, fsynced and renamed (or removed)
    before the command returns, and workers and process groups are gone. Only a normal exit (click's
    SystemExit) is shortened; a crash keeps Python's traceback and exit status."""
    try:
        run()
        code = 0
    except SystemExit as e:
        code = e.code
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
