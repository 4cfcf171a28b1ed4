"""Label an existing graph JSON's feature nodes with explanations from a feature database.

`clt attribute features=DB` labels nodes while it writes the graph; this does the same for a
graph written before the features were explained (`clt demo` attributes first, so autointerp
explains exactly the graph's features). The file is rewritten atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from clt_forge.artifacts.features import read_explanations
from clt_forge.errors import CLTError

__all__ = ["label_graph"]

FEATURE = "cross layer transcoder"


def label_graph(graph: str | Path, features: str | Path) -> int:
    """Set `clerp` of every feature node from `features` and record the database in the
    metadata; returns how many nodes got an explanation."""
    path = Path(graph)
    try:
        document = json.loads(path.read_text())
        nodes = document["nodes"]
    except (OSError, ValueError, KeyError) as err:
        raise CLTError(f"{path}: not a graph JSON from `clt attribute` ({err}).") from None
    labels = read_explanations(features)
    labelled = 0
    for node in nodes:
        if node.get("feature_type") != FEATURE:
            continue
        layer, index = int(node["layer"]), int(node["node_id"].split("_")[1])
        node["clerp"] = labels.get((layer, index), node.get("clerp", ""))
        labelled += bool(node["clerp"])
    document["metadata"]["features"] = str(Path(features).resolve())
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(json.dumps(document))
    os.replace(scratch, path)
    return labelled
