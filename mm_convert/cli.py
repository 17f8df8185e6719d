"""mm-convert: command line over the Python API (mm_convert/converter.py); each command calls one method.

    mm-convert Qwen2_5_VLConverter hf_to_mm --cfg.mm_dir OUT --cfg.hf_config.hf_dir HF \
        --cfg.parallel_config.llm_pp_layers [[1,10,10,7]] --cfg.parallel_config.vit_pp_layers [[32,0,0,0]] \
        --cfg.parallel_config.tp_size 1

Options use the dotted ``--cfg.*`` names of MindSpeed-MM's converter; ``--config file.yaml`` supplies the
same keys (``mm_dir``, ``hf_config: {hf_dir}``, ``parallel_config: {...}``, optionally under ``cfg:``).
Every command is one click command below, shared by the converter groups (``ctx.obj``: the group's converter
class); ``plan`` runs a writing command's own function with ``dry_run=True``.
"""
from __future__ import annotations

import functools
import os
import signal
import sys
import traceback
from pathlib import Path

import click

from .converter import CONVERTERS, Result, VerifyReport
from .errors import MMConvertError, Terminated
from .layout import LayoutOptions

LAYOUT_HELP = {
    "tp_size": "tensor-parallel size (LLM; also the vision encoder unless vit_tp_size is set)",
    "vit_tp_size": "tensor-parallel size of the vision encoder; 0 = same as tp_size; must divide tp_size",
    "llm_pp_layers": "LLM layers per pipeline stage: [1,10,10,7] or nested per virtual chunk [[0,1],[1,2]]",
    "vit_pp_layers": "vision layers per stage, same shape as llm_pp_layers; vision comes first, e.g. [[32,0,0,0]]",
    "ep_size": "expert-parallel size (MoE models): each MoE layer's experts split evenly over EP ranks, "
               "shards mp_rank_TT[_PPP]_EEE",
    "make_vocab_size_divisible_by": "Megatron's vocabulary padding: zero rows pad the embedding and output layer to a "
                                    "multiple of N x tp_size (read off the shards of an MM source; checked if given)",
}
LAYOUT_DEFAULTS = {"tp_size": 1, "vit_tp_size": 0, "ep_size": 1}  # where a command builds the layout
WRITING = ("hf_to_mm", "mm_to_hf", "resplit", "hf_to_dcp", "dcp_to_hf")  # the commands plan dry-runs


# ---- options ---------------------------------------------------------------------------------------------
def _cfg(dotted: str, param: str, *aliases: str, **kw):
    """A ``--cfg.<dotted>`` option stored in ``param`` (also a key of --config files). ``aliases``: other
    spellings of the option (MindSpeed-MM's own names where they differ)."""
    return click.option(f"--cfg.{dotted}", *aliases, param, **kw)


def _cfg_keys(command: click.Command) -> dict[str, str]:
    """The command's ``--cfg.*`` options: dotted key -> parameter name."""
    return {opt[len("--cfg."):]: p.name for p in command.params for opt in p.opts if opt.startswith("--cfg.")}


def _layout_options(dotted: str, param: str, defaults: bool):
    """The five ``--cfg.<dotted>.*`` options, handed to the command as one LayoutOptions in ``param``
    (``defaults``: tp 1, vision TP as tp, ep 1 where not given, for a layout the command builds)."""
    def deco(f):
        @functools.wraps(f)
        def command(**kw):
            kw[param] = LayoutOptions(**{key: kw.pop(f"{param}_{key}") for key in LAYOUT_HELP})
            return f(**kw)
        for key in reversed(list(LAYOUT_HELP)):
            default = LAYOUT_DEFAULTS.get(key) if defaults else None
            typ = int if key.endswith(("_size", "_by")) else str
            command = _cfg(f"{dotted}.{key}", f"{param}_{key}", type=typ, default=default,
                           show_default=default is not None, metavar="N" if typ is int else "LIST",
                           help=LAYOUT_HELP[key])(command)
        return command
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
    keys = _cfg_keys(ctx.command)
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


_overwrite = click.option("--overwrite", is_flag=True, help="replace an existing non-empty output directory as a whole")
_no_verify_source = click.option(
    "--no-verify-source", "no_verify_source", is_flag=True,
    help="skip the source check: by default the CRC-32 of every byte read from an MM shard is compared with the one "
         "torch's zip format stores with it (a few percent of CPU, no extra reads), and a mismatch stops the command "
         "before anything is renamed into place")
_resume = click.option("--resume", is_flag=True,
                       help="continue an interrupted run: finished files whose size and sha256 match its journal "
                            "are kept (same plan only), the rest is redone")
_workers = click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
                        help="processes writing output files in parallel [default: the machine's cores; under "
                             "torchrun the ranks also split the files among themselves]")
_max_shard_size = _cfg("max_shard_size", "max_shard_size", default="5GB", show_default=True, metavar="SIZE",
                       help="largest safetensors file (e.g. 5GB, 500MB, 2GiB)")


def _run(debug: bool, fn):
    """Call into the API; errors become one line on stderr and a non-zero exit (traceback with --debug)."""
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


def _converter(**kw):
    """The converter class of the group this command runs under, made with ``kw``."""
    return click.get_current_context().obj(**kw)


def _writes(f):
    """A writing command: ``f(conv, dry_run=..., **options) -> Result``. Run as itself it writes (progress bar,
    summary); run by ``plan`` with ``dry_run=True`` it writes nothing and prints the plan (``verbose``: every
    tensor's pieces)."""
    @_overwrite
    @_resume
    @functools.wraps(f)
    def command(*, workers, quiet, debug, dry_run: bool = False, verbose: bool = False, **options):
        conv = _converter(progress=not quiet and not dry_run, workers=workers)
        r = _run(debug, lambda: f(conv, dry_run=dry_run, **options))
        _print_result(r, quiet and not dry_run, verbose=verbose, dry_run=dry_run)
    return command


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
                    src = ", ".join(f"zeros[{','.join(f'{s}:{s + n}' for s, n in zip(p.dst_start, p.shape))}]" if p.zero else
                                    f"{p.src.file + ':' if p.src.file else ''}{p.src.slot + '.' if p.src.slot else ''}{p.src.key}"
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


# ---- commands --------------------------------------------------------------------------------------------
@click.command("hf_to_mm")
@_cfg("mm_dir", "mm_dir", required=True, metavar="DIR", help="output MM checkpoint directory")
@_cfg("hf_config.hf_dir", "hf_dir", required=True, metavar="DIR", help="input Hugging Face checkpoint (config.json + safetensors)")
@_layout_options("parallel_config", "layout", defaults=True)
@_cfg("save_format", "save_format", default="torch", show_default=True, type=click.Choice(["torch", "torch_dist"]),
      help="torch: mp_rank_* shards in the layout given; torch_dist: Megatron's distributed checkpoint "
           "(global tensors, any TP / PP chosen when Megatron loads it)")
@_writes
@_workers
@_common
def hf_to_mm(conv, mm_dir, hf_dir, layout, save_format, overwrite, resume, dry_run) -> Result:
    """Convert an HF checkpoint into MM shards (release/mp_rank_*/model_optim_rng.pt), or with
    --cfg.save_format torch_dist into Megatron's torch_dist format (release/*.distcp + .metadata).

    Every tensor is placed by the layer lists and split by the TP size; the layout is checked against
    config.json first (sums, shapes, vision before LLM, TP divisibility)."""
    return conv.hf_to_mm(hf_dir, mm_dir, layout, save_format=save_format, overwrite=overwrite, resume=resume,
                         dry_run=dry_run)


@click.command("mm_to_hf")
@_cfg("mm_dir", "mm_dir", required=True, metavar="DIR", help="input MM checkpoint (release or a training save)")
@_cfg("save_hf_dir", "save_hf_dir", required=True, metavar="DIR", help="output Hugging Face directory")
@_cfg("hf_config.hf_dir", "hf_dir", metavar="DIR",
      help="original HF directory: config, tokenizer, processor and chat template are copied from it "
           "(optional when mm_dir was written by mm_convert, which records the config)")
@_layout_options("parallel_config", "layout", defaults=False)
@_max_shard_size
@_writes
@_no_verify_source
@_workers
@_common
def mm_to_hf(conv, mm_dir, save_hf_dir, hf_dir, layout, max_shard_size, overwrite, resume, no_verify_source,
             dry_run) -> Result:
    """Convert MM shards back to HF safetensors (sharded, with an index), keeping dtypes and the key scheme.

    The layout is read off the shards; --cfg.parallel_config.* values, if given, are checked against it."""
    return conv.mm_to_hf(mm_dir, save_hf_dir, hf_dir, layout, max_shard_size=max_shard_size, overwrite=overwrite,
                         resume=resume, verify_source=not no_verify_source, dry_run=dry_run)


@click.command("resplit")
@_cfg("source_dir", "source_dir", required=True, metavar="DIR", help="input MM checkpoint")
@_cfg("target_dir", "target_dir", required=True, metavar="DIR", help="output MM checkpoint")
@_cfg("hf_config.hf_dir", "hf_dir", metavar="DIR", help="HF directory for config.json (optional when source_dir was written by mm_convert)")
@_layout_options("source_parallel_config", "source_layout", defaults=False)
@_layout_options("target_parallel_config", "layout", defaults=True)
@_writes
@_no_verify_source
@_workers
@_common
def resplit(conv, source_dir, target_dir, hf_dir, source_layout, layout, overwrite, resume, no_verify_source,
            dry_run) -> Result:
    """Reshard MM shards to another TP / PP / virtual-pipeline layout directly, without HF files in between.

    The source layout is read off its shards (--cfg.source_parallel_config.* values are checked against it)."""
    return conv.resplit(source_dir, target_dir, layout, source_layout=source_layout, hf_dir=hf_dir,
                        overwrite=overwrite, resume=resume, verify_source=not no_verify_source, dry_run=dry_run)


@click.command("hf_to_dcp")
@_cfg("dcp_dir", "dcp_dir", "--dcp_dir", required=True, metavar="DIR",
      help="output DCP checkpoint directory (release/ + latest_checkpointed_iteration.txt)")
@_cfg("hf_config.hf_dir", "hf_dir", "--hf_dir", required=True, metavar="DIR",
      help="input Hugging Face checkpoint (config.json + safetensors)")
@_writes
@_workers
@_common
def hf_to_dcp(conv, dcp_dir, hf_dir, overwrite, resume, dry_run) -> Result:
    """Convert an HF checkpoint into MindSpeed-MM's FSDP2 checkpoint: a torch.distributed.checkpoint
    directory (release/.metadata + __K_0.distcp) of {"model": {...}, "checkpoint_version": 3.0}, the HF
    keys under the model prefix, fused expert tensors viewed 2-D."""
    return conv.hf_to_dcp(hf_dir, dcp_dir, overwrite=overwrite, resume=resume, dry_run=dry_run)


@click.command("dcp_to_hf")
@_cfg("dcp_dir", "dcp_dir", "--load_dir", required=True, metavar="DIR",
      help="input DCP checkpoint: the directory with latest_checkpointed_iteration.txt, or the iteration "
           "directory holding .metadata")
@_cfg("save_hf_dir", "save_hf_dir", "--save_dir", required=True, metavar="DIR", help="output Hugging Face directory")
@_cfg("hf_config.hf_dir", "hf_dir", "--model_assets_dir", metavar="DIR",
      help="original HF directory: config, tokenizer, processor and chat template are copied from it, and "
           "its weights' key scheme and expert layout are kept (optional when dcp_dir was written by mm_convert)")
@_max_shard_size
@_writes
@_workers
@_common
def dcp_to_hf(conv, dcp_dir, save_hf_dir, hf_dir, max_shard_size, overwrite, resume, dry_run) -> Result:
    """Convert MindSpeed-MM's FSDP2 checkpoint (DCP) back to HF safetensors (sharded, with an index):
    expert tensors back to 3-D, the model prefix stripped, every key checked against config.json."""
    return conv.dcp_to_hf(dcp_dir, save_hf_dir, hf_dir, max_shard_size=max_shard_size, overwrite=overwrite,
                          resume=resume, dry_run=dry_run)


@click.command("verify")
@_cfg("mm_dir", "mm_dir", required=True, metavar="DIR",
      help="checkpoint to check (an MM checkpoint, or without --cfg.hf_config.hf_dir any mm_convert output)")
@_cfg("hf_config.hf_dir", "hf_dir", metavar="DIR",
      help="HF checkpoint it was converted from; without it only the manifest (sizes, sha256) is checked")
@_layout_options("parallel_config", "layout", defaults=False)
@_common
def verify(mm_dir, hf_dir, layout, quiet, debug):
    """Check an output against its mm_convert_manifest.json (every file's size and sha256; the first mismatch
    is named) and, given the HF source, every MM tensor bit for bit, plus a coverage report naming any missing
    or unexpected key. Exits 1 on any difference."""
    conv = _converter(progress=not quiet)
    rep: VerifyReport = _run(debug, lambda: conv.verify(hf_dir, mm_dir, layout))
    for what, items in (("mismatched", rep.mismatched), ("missing", rep.missing), ("unexpected", rep.unexpected),
                        ("HF tensor not covered", rep.unused_hf)):
        for k in items:
            click.echo(f"{what}: {k}", err=True)
    if rep.manifest_error:
        click.echo(f"manifest mismatch: {rep.manifest_error}", err=True)
    click.echo(rep.summary(), err=not rep.ok)
    sys.exit(0 if rep.ok else 1)


class _GroupCommand(click.Choice):
    """A writing command of the converter group ``plan`` runs under (hf_to_dcp, dcp_to_hf only where the family
    has them): the choices are checked and shown as that group has them."""

    def _of(self, ctx: click.Context | None) -> click.Choice:
        while ctx is not None and not isinstance(ctx.command, click.Group):
            ctx = ctx.parent
        return click.Choice([c for c in self.choices if ctx is None or c in ctx.command.commands])

    def convert(self, value, param, ctx):
        return self._of(ctx).convert(value, param, ctx)

    def get_metavar(self, param, ctx=None):
        return self._of(ctx).get_metavar(param, ctx)


@click.command("plan", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                         "help_option_names": []})
@click.argument("command", type=_GroupCommand(WRITING))
@click.option("--verbose", "-v", is_flag=True, help="list every tensor and the source boxes it is made of")
@click.pass_context
def plan(ctx, command, verbose):
    """Dry run of hf_to_mm, mm_to_hf, resplit (hf_to_dcp, dcp_to_hf where the family has them; same options):
    per-file tensors and bytes; writes nothing.

    Example: mm-convert Qwen2_5_VLConverter plan hf_to_mm --cfg.mm_dir OUT --cfg.hf_config.hf_dir HF ..."""
    sub = ctx.parent.command.commands[command]
    sub_ctx = sub.make_context(command, list(ctx.args), parent=ctx)
    sub_ctx.invoke(sub.callback, **sub_ctx.params, dry_run=True, verbose=verbose)


@click.command("check_logits")
@_cfg("mm_dir", "mm_dir", required=True, metavar="DIR", help="MM checkpoint to run with the bundled runtime")
@_cfg("hf_config.hf_dir", "hf_dir", required=True, metavar="DIR", help="HF checkpoint to run with transformers")
@_layout_options("parallel_config", "layout", defaults=False)
@click.option("--tolerance", type=float, default=1e-5, show_default=True, help="largest allowed max abs logit difference")
@_common
def check_logits(mm_dir, hf_dir, layout, tolerance, quiet, debug):
    """Run transformers on the HF checkpoint and the bundled runtime (tp x pp local processes) on the MM
    checkpoint with the same image + text input; print the max abs logit difference, exit 1 above --tolerance."""
    def go():
        from mm_train.check_logits import check_logits as run_check
        return run_check(mm_dir, hf_dir, tp_size=layout.tp_size, llm_pp_layers=layout.llm_pp_layers,
                         vit_pp_layers=layout.vit_pp_layers, tolerance=tolerance, vit_tp_size=layout.vit_tp_size,
                         ep_size=layout.ep_size, log=lambda s: None if quiet else click.echo(s))
    diff = _run(debug, go)
    click.echo(f"max abs logit difference: {diff:.3e} (tolerance {tolerance:.1e})")


def _group(name: str, cls) -> click.Group:
    """The commands of one converter class (``ctx.obj`` in them); the FSDP2 ones where its family has them."""
    dcp = (hf_to_dcp, dcp_to_hf) if getattr(cls.spec, "DCP_KEY_SCHEME", None) else ()
    return click.Group(name, [hf_to_mm, mm_to_hf, resplit, *dcp, verify, plan, check_logits],
                       context_settings={"obj": cls},
                       help=f"{cls.__doc__.strip()}\n\nRun `mm-convert {name} COMMAND --help` for a command's options.")


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


for _name, _cls in CONVERTERS.items():
    main.add_command(_group(_name, _cls))
main.help = main.help.replace("{converters}", ", ".join(CONVERTERS))


def _split_glued(argv: list[str]) -> list[str]:
    """Accept ``--cfg.mm_dir"ckpt/..."`` as typed in some guides (the shell glues value to option)."""
    known = sorted({f"--cfg.{k}" for c in main.commands.values() for cmd in c.commands.values() for k in _cfg_keys(cmd)},
                   key=len, reverse=True)
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
