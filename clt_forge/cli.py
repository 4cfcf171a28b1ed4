"""The `clt` command: a Typer front over one Hydra app per stage.

Every stage takes Hydra overrides as trailing arguments (`clt cache model=gpt2 quant=int8`)
and Hydra's own flags (`--cfg job`, `-m`). Overrides are validated before Hydra runs, so a
wrong key or value exits with status 2 and one paragraph naming it.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from clt_forge.config import compose
from clt_forge.config.overrides import hydra_quote, quote_text_values
from clt_forge.errors import CLTError
from clt_forge.stages import STAGES, run_stage_task

app = typer.Typer(
    name="clt",
    help="Train cross-layer transcoders and read circuits off them: "
    "cache -> train -> autointerp -> attribute -> serve. "
    "Each stage takes Hydra overrides, e.g. `clt cache model=gpt2 quant=int8`.",
    no_args_is_help=True,
    epilog="Run `clt STAGE --help` for a stage's config groups and their options.",
    add_completion=False,
    pretty_exceptions_enable=False,
)

OVERRIDE_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}
# Keys users write that cannot be Python field names ("from" is a keyword).
ALIASES = {"finetune.from": "finetune.source"}
# Flags that stand for an override (`clt autointerp --dry-run` = `dry_run=true`).
FLAGS = {"--dry-run": "dry_run=true"}


def apply_aliases(overrides: list[str]) -> list[str]:
    out = []
    for override in overrides:
        if override in FLAGS:
            out.append(FLAGS[override])
            continue
        key, sep, value = override.partition("=")
        prefix = key[: len(key) - len(key.lstrip("+~"))]
        bare = key[len(prefix) :]
        out.append(f"{prefix}{ALIASES.get(bare, bare)}{sep}{value}" if sep else override)
    return out


def serve_positional(overrides: list[str]) -> list[str]:
    """`clt serve GRAPH.json ...`: a first argument that is not KEY=VALUE is the graph."""
    if not overrides or "=" in overrides[0] or overrides[0].startswith(("-", "+", "~")):
        return overrides
    return [f"graph={hydra_quote(overrides[0])}", *overrides[1:]]


def run_dir_overrides(overrides: list[str]) -> list[str]:
    """With out=PATH, Hydra's run directory is PATH and Hydra writes nothing into it, instead of
    leaving a runs/<stage>/<time>/.hydra folder beside every run (torchrun: one per rank)."""
    outs = [o.split("=", 1)[1] for o in overrides if o.startswith("out=")]
    if not outs or any(o.startswith(("hydra.run.dir=", "hydra.output_subdir=")) for o in overrides):
        return []
    return [f"hydra.run.dir={outs[-1]}", "hydra.output_subdir=null"]


def groups_help() -> str:
    lines = [f"{group}: {', '.join(options)}" for group, options in compose.all_groups().items()]
    return "\n\n".join(["Config groups (choose with GROUP=OPTION):", *lines])


def run_hydra_stage(
    stage: str,
    overrides: list[str],
    *,
    cfg: str | None = None,
    resolve: bool = False,
    package: str | None = None,
    multirun: bool = False,
    info: str | None = None,
) -> None:
    """Validate, then hand the stage to Hydra exactly as `python app.py OVERRIDES FLAGS` would."""
    import hydra

    if stage == "serve":
        overrides = serve_positional(overrides)
    overrides = quote_text_values(apply_aliases(overrides))
    try:
        compose.validate(stage, overrides, multirun)
    except CLTError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(err.exit_code) from None
    if multirun and cfg:
        # Hydra refuses --cfg with --multirun; print every job of the sweep instead.
        print_sweep(stage, overrides, cfg, resolve)
        return
    if not multirun:
        overrides = [*overrides, *run_dir_overrides(overrides)]
    compose.register_schemas()
    argv = [f"clt {stage}", *overrides]
    if cfg:
        argv += ["--cfg", cfg]
    if resolve:
        argv.append("--resolve")
    if package:
        argv += ["--package", package]
    if multirun:
        argv.append("--multirun")
    if info:
        argv += ["--info", info]
    task = hydra.main(config_path=str(compose.conf_dir()), config_name=stage, version_base="1.3")(run_stage_task(stage))
    saved_argv = sys.argv
    sys.argv = argv
    try:
        task()
    finally:
        sys.argv = saved_argv


def print_sweep(stage: str, overrides: list[str], cfg: str, resolve: bool) -> None:
    from omegaconf import OmegaConf

    if cfg != "job":
        typer.echo(f"clt {stage}: with --multirun only --cfg job can be printed (got --cfg {cfg})", err=True)
        raise typer.Exit(2)
    jobs = compose.split_jobs(overrides, multirun=True)
    for number, job in enumerate(jobs):
        typer.echo(f"# job {number} of {len(jobs)}: {' '.join(job)}")
        typer.echo(OmegaConf.to_yaml(compose.compose_stage(stage, job), resolve=resolve))


def _make_command(stage: str, summary: str) -> None:
    def command(
        overrides: Annotated[
            list[str] | None, typer.Argument(help="Hydra overrides, KEY=VALUE or GROUP=OPTION")
        ] = None,
        cfg: Annotated[
            str | None, typer.Option("--cfg", "-c", help="Print the composed config and exit: job, hydra or all")
        ] = None,
        resolve: Annotated[
            bool, typer.Option("--resolve", help="Resolve interpolations when printing with --cfg")
        ] = False,
        package: Annotated[str | None, typer.Option("--package", "-p", help="Print only this config package")] = None,
        multirun: Annotated[
            bool, typer.Option("--multirun", "-m", help="Sweep: one job per combination of comma-separated values")
        ] = False,
        info: Annotated[
            str | None, typer.Option("--info", help="Hydra information: all, config, defaults, ...")
        ] = None,
        prompt: Annotated[
            str | None, typer.Option("--prompt", help="attribute, demo: the text to attribute, taken as written")
        ] = None,
    ) -> None:
        extra = [f"prompt={hydra_quote(prompt)}"] if prompt is not None else []
        run_hydra_stage(
            stage,
            [*(overrides or []), *extra],
            cfg=cfg,
            resolve=resolve,
            package=package,
            multirun=multirun,
            info=info,
        )

    command.__doc__ = summary
    app.command(name=stage, context_settings=OVERRIDE_SETTINGS, help=f"{summary}\n\n{groups_help()}")(command)


for _stage, _summary in STAGES.items():
    _make_command(_stage, _summary)


def main() -> None:
    app()
