"""Graph files for `clt serve`: which files may be opened, and opening one.

A `GraphLibrary` is rooted at one folder (the folder given, or the folder of the graph file
given). It lists the `*.json` files directly in it and opens only those: a name from a
request is never joined into a path until it has been found in that listing, so `../x`
or an absolute path cannot reach another file. Reading and checking a file is the graph
artifact's (`clt_forge.artifacts.graph.read_graph`: a `GraphFileError` names the file and
the first problem found, a newer schema_version included).
"""

from __future__ import annotations

from pathlib import Path

from clt_forge.artifacts.graph import GraphDocument, GraphFileError, read_graph
from clt_forge.errors import CLTError

__all__ = ["GraphLibrary"]


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
        document = read_graph(path)
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
