"""Graph files for `clt serve`: which files may be opened, and loading one with a clear error.

A `GraphLibrary` is rooted at one folder (the folder given, or the folder of the graph file
given). It lists the `*.json` files directly in it and opens only those: a name from a
request is never joined into a path until it has been found in that listing, so `../x`
or an absolute path cannot reach another file. Loading checks the structure `clt serve`
relies on (Neuronpedia's graph schema, docs/formats.md) and raises `GraphFileError`
naming the file and the first problem found.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clt_forge.errors import CLTError

__all__ = ["EMBEDDING", "ERROR", "FEATURE", "LOGIT", "GraphDocument", "GraphFileError", "GraphLibrary", "load_graph"]

FEATURE = "cross layer transcoder"
ERROR = "mlp reconstruction error"
EMBEDDING = "embedding"
LOGIT = "logit"
NODE_KINDS = (FEATURE, ERROR, EMBEDDING, LOGIT)
MAX_BYTES = 512 * 1024 * 1024  # a graph JSON larger than this is refused rather than parsed


class GraphFileError(CLTError):
    """A graph file that cannot be shown: unreadable, not JSON, or not a graph."""


@dataclass
class GraphDocument:
    """One graph JSON as written by `clt attribute` (metadata, qParams, nodes, links)."""

    path: Path
    data: dict[str, Any]
    nodes_by_id: dict[str, dict[str, Any]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.nodes_by_id = {node["node_id"]: node for node in self.nodes}

    @property
    def metadata(self) -> dict[str, Any]:
        return self.data["metadata"]

    @property
    def nodes(self) -> list[dict[str, Any]]:
        return self.data["nodes"]

    @property
    def links(self) -> list[dict[str, Any]]:
        return self.data["links"]

    @property
    def slug(self) -> str:
        return str(self.metadata.get("slug") or self.path.stem)

    @property
    def prompt_tokens(self) -> list[str]:
        return list(self.metadata["prompt_tokens"])

    @property
    def supernodes(self) -> list[list[str]]:
        return list(self.data.get("qParams", {}).get("supernodes", []))

    @property
    def n_layers(self) -> int:
        """Layers of the model: logit nodes sit at layer n_layers + 1 (circuit-tracer's convention)."""
        logit_layers = [int(n["layer"]) for n in self.nodes if n["feature_type"] == LOGIT]
        if logit_layers:
            return max(logit_layers) - 1
        inner = [int(n["layer"]) for n in self.nodes if n["feature_type"] in (FEATURE, ERROR)]
        return max(inner, default=-1) + 1


def load_graph(path: Path) -> GraphDocument:
    """Read and check one graph JSON; `GraphFileError` names the file and the problem."""
    try:
        size = path.stat().st_size
    except OSError as err:
        raise GraphFileError(f"{path}: cannot read the graph file ({err.strerror}).") from None
    if size > MAX_BYTES:
        raise GraphFileError(f"{path}: {size / 1e6:.0f} MB is larger than the {MAX_BYTES / 1e6:.0f} MB a graph may be.")
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as err:
        raise GraphFileError(
            f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}). "
            "A graph file is written by `clt attribute`."
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise GraphFileError(f"{path}: cannot read the graph file ({err}).") from None
    check_graph(data, path)
    return GraphDocument(path, data)


def check_graph(data: Any, path: Path) -> None:
    """The structure `clt serve` relies on; raises on the first problem, naming where it is."""

    def fail(problem: str) -> None:
        raise GraphFileError(f"{path}: {problem}. Expected a graph JSON from `clt attribute` (docs/formats.md).")

    if not isinstance(data, dict):
        fail(f"the top level is a {type(data).__name__}, not an object with metadata, qParams, nodes and links")
    for key, kind in (("metadata", dict), ("nodes", list), ("links", list)):
        if key not in data:
            fail(f"missing key '{key}'")
        if not isinstance(data[key], kind):
            fail(f"'{key}' is a {type(data[key]).__name__}, not a {kind.__name__}")
    tokens = data["metadata"].get("prompt_tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        fail("metadata.prompt_tokens must be a list of strings (the prompt's tokens, BOS first)")
    seen: dict[str, int] = {}
    for i, node in enumerate(data["nodes"]):
        if not isinstance(node, dict):
            fail(f"nodes[{i}] is not an object")
        fields: tuple[tuple[str, type[Any]], ...] = (("node_id", str), ("feature_type", str), ("ctx_idx", int))
        for key, kind in fields:
            if not isinstance(node.get(key), kind) or isinstance(node.get(key), bool):
                fail(f"nodes[{i}].{key} must be a {kind.__name__} (got {node.get(key)!r})")
        if node["feature_type"] not in NODE_KINDS:
            fail(f"nodes[{i}].feature_type {node['feature_type']!r} is not one of {', '.join(map(repr, NODE_KINDS))}")
        layer = node.get("layer")
        if isinstance(layer, bool) or not isinstance(layer, str | int) or not (layer == "E" or str(layer).isdigit()):
            fail(f"nodes[{i}].layer {layer!r} is neither 'E' nor a layer number")
        if not 0 <= node["ctx_idx"] < max(len(tokens), 1):
            fail(f"nodes[{i}].ctx_idx {node['ctx_idx']} is outside the prompt ({len(tokens)} tokens)")
        if node["feature_type"] == FEATURE and len(node["node_id"].split("_")) != 3:
            fail(f"nodes[{i}].node_id {node['node_id']!r} is not LAYER_FEATURE_POSITION")
        if node["node_id"] in seen:
            fail(f"nodes[{i}].node_id {node['node_id']!r} repeats nodes[{seen[node['node_id']]}]")
        seen[node["node_id"]] = i
    for i, link in enumerate(data["links"]):
        if not isinstance(link, dict):
            fail(f"links[{i}] is not an object")
        for end in ("source", "target"):
            if link.get(end) not in seen:
                fail(f"links[{i}].{end} {link.get(end)!r} is not a node id")
        weight = link.get("weight")
        if not isinstance(weight, int | float) or isinstance(weight, bool) or not math.isfinite(weight):
            fail(f"links[{i}].weight must be a finite number (got {weight!r})")
    supernodes = data.get("qParams", {}).get("supernodes", []) if isinstance(data.get("qParams"), dict) else None
    if supernodes is None or not isinstance(supernodes, list):
        fail("qParams must be an object whose supernodes is a list of [name, node_id, ...] lists")
    for i, group in enumerate(supernodes or []):
        if not isinstance(group, list) or not group or not all(isinstance(x, str) for x in group):
            fail(f"qParams.supernodes[{i}] must be a list of strings: [name, node_id, ...]")


class GraphLibrary:
    """The graph files `clt serve` may open: the `*.json` files directly inside one folder."""

    def __init__(self, graph: str | Path) -> None:
        path = Path(graph).expanduser()
        if path.is_dir():
            self.root = path.resolve()
            self.default: str | None = None
        elif path.is_file():
            self.root = path.resolve().parent
            self.default = path.name
        else:
            raise CLTError(f"graph={graph}: no such file or folder (a graph JSON from `clt attribute`, or a folder).")
        if self.default is None and not self.names():
            raise CLTError(f"graph={graph}: the folder has no graph files (*.json); run `clt attribute` first.")
        self._cache: dict[str, tuple[tuple[int, int], GraphDocument]] = {}

    def names(self) -> list[str]:
        """Graph file names in the folder, sorted."""
        return sorted(p.name for p in self.root.glob("*.json") if p.is_file())

    def first(self) -> str:
        return self.default or self.names()[0]

    def path(self, name: str) -> Path:
        """The file called `name` in the folder; anything else is refused."""
        if name not in self.names():
            raise GraphFileError(f"{name!r} is not a graph file in {self.root} (choose one of the listed graphs).")
        return self.root / name

    def load(self, name: str) -> GraphDocument:
        """The graph `name`, parsed once per version of the file (mtime and size)."""
        path = self.path(name)
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self._cache.get(name)
        if cached and cached[0] == stamp:
            return cached[1]
        document = load_graph(path)
        self._cache[name] = (stamp, document)
        return document

    def saved(self, name: str, document: GraphDocument) -> None:
        """`document` was just written to its file by us: remember it as that file's current version."""
        stat = document.path.stat()
        self._cache[name] = ((stat.st_mtime_ns, stat.st_size), document)

    def sibling(self, document: GraphDocument, file_name: str) -> Path | None:
        """A file recorded by name in a graph's metadata (the raw graph), only if it lies beside it."""
        if not file_name or Path(file_name).name != file_name:
            return None
        candidate = document.path.parent / file_name
        return candidate if candidate.is_file() and candidate.resolve().parent == self.root else None
