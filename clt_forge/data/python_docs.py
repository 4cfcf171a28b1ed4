"""Modern English for the bundled corpus: the documentation that ships with Python itself.

Two parts, both under the PSF licence (which allows redistribution and use), both on every
machine that runs clt-forge, so nothing is downloaded:
- the reference manual's topics (`pydoc_data.topics`, what `help("assignment")` shows),
  one document per section;
- the docstrings of the standard library's modules, classes and functions (>= 200 characters
  each: the explanatory ones), one document per module.
About 1.6 M characters (~360k tokens of the embedded model) on Python 3.11. The text is
that of the Python running clt-forge, so document ids carry its version (`python3.11/...`):
another Python gives a slightly different corpus, never silently mixed with this one.
"""

from __future__ import annotations

import ast
import re
import sys
import sysconfig
from pathlib import Path

MIN_DOCSTRING = 200  # shorter docstrings are mostly signatures and one-liners
# Not documentation of the language or its library (tests, the IDE, demos, vendored tools).
SKIPPED = ("test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages", "dist-packages")
_SECTION = re.compile(r"\n(?=[^\n]+\n[*=\-]{4,}\n)")  # a title underlined with *** / === / ---
_UNDERLINE = re.compile(r"^[*=\-]{4,}\n", re.MULTILINE)  # dropped: the title stays a line of its own


def prefix() -> str:
    return f"python{sys.version_info.major}.{sys.version_info.minor}"


def topic_documents() -> list[tuple[str, str]]:
    """(id, text) per section of each reference-manual topic."""
    from pydoc_data.topics import topics

    documents = []
    for name in sorted(topics):
        for number, section in enumerate(_SECTION.split(topics[name])):
            text = _UNDERLINE.sub("", section).strip()
            if len(text) >= MIN_DOCSTRING:
                documents.append((f"{prefix()}/topics/{name}/{number:03d}", text))
    return documents


def docstring_documents() -> list[tuple[str, str]]:
    """(id, text) per standard-library module: its explanatory docstrings, in source order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if any(part in SKIPPED for part in relative.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a file this Python cannot parse holds no documentation for it
        texts = [text for node in ast.walk(tree) if (text := _docstring(node)) and len(text) >= MIN_DOCSTRING]
        if texts:
            module = ".".join(relative.with_suffix("").parts)
            documents.append((f"{prefix()}/stdlib/{module}", "\n\n".join(texts)))
    return documents


def _docstring(node: ast.AST) -> str | None:
    if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
        return ast.get_docstring(node)
    return None
