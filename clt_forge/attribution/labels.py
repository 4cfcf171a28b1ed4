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
from clt_forge.artifacts.graph import FEATURE, parse_node, read_graph

__all__ = ["label_graph"]


def label_graph(graph: str | Path, features: str | Path) -> int:
    """Set `clerp` of every feature node from `features` and record the database in the
    metadata; returns how many nodes got an explanation."""
    path = Path(graph)
    document = read_graph(path).data  # GraphFileError names the file and the problem
    labels = read_explanations(features)
    labelled = 0
    for node in document["nodes"]:
        if node["feature_type"] != FEATURE:
            continue
        layer, _, index = parse_node(node).layer_pos_feature
        node["clerp"] = labels.get((layer, index), node.get("clerp", ""))
        labelled += bool(node["clerp"])
    document["metadata"]["features"] = str(Path(features).resolve())
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(json.dumps(document))
    os.replace(scratch, path)
    return labelled
