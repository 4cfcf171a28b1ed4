"""`clt serve GRAPH.json`: the local web interface over attribution graphs (clt_forge/serve/).

`graph=` (or the first argument) is a graph JSON from `clt attribute` or a folder of them;
`features=` and `checkpoint=` override what each graph records. Intervention jobs keep
their queue and states in `<run folder>/cache`. Serves until Ctrl+C.
"""

from __future__ import annotations

from pathlib import Path

from clt_forge.config.schema import ServeConfig
from clt_forge.errors import CLTError
from clt_forge.runs import setup


def run(cfg: ServeConfig) -> Path:
    if not cfg.graph:
        raise CLTError(
            "clt serve needs a graph: `clt serve GRAPH.json` or graph=PATH "
            "(a graph JSON written by `clt attribute`, or a folder of them)."
        )
    if not Path(cfg.graph).exists():
        raise CLTError(f"graph={cfg.graph}: no such file or folder (a graph JSON from `clt attribute`, or a folder).")
    out = setup(cfg)
    from clt_forge.serve import launch_interface

    launch_interface(
        cfg.graph,
        features_path=cfg.features,
        checkpoint=cfg.checkpoint,
        host=cfg.host,
        port=cfg.port,
        block=True,
        cache_dir=out / "cache",
        threads=cfg.threads,
    )
    return out
