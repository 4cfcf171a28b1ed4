"""The activation dataset format (version 3): the ONE module its writer and reader import.

A dataset is a folder:

    manifest.json                 written last, atomically: the dataset exists iff this does
    stats.safetensors             float32 normalisation statistics (see `Stats`)
    chunks/s{shard:05d}-c{index:06d}.clt
    parts/shard-{index:05d}-of-{count:05d}.json   per-job progress (resume, merge)

Chunk file (every multi-byte field little-endian):

    8 bytes   magic b"CLTCHUNK"
    4 bytes   uint32 header length H
    H bytes   UTF-8 JSON header: {"version", "n_tokens", "n_layers", "d_model",
              "sections": {name: {"offset", "length"}}}  (offsets from the end of the header)
    sections  "tokens": int32 token ids [n_tokens], zstd frame;
              "mlp_in", "mlp_out": one `clt_forge.artifacts.quant` blob each ([n_tokens, n_layers, d_model])

Tokens are whole context windows minus their BOS position, in window order: window w of a
chunk is tokens[w * (context_size - 1) : (w + 1) * (context_size - 1)] (see
clt_forge/data/windows.py). The manifest records each chunk's byte size and BLAKE2b-128
checksum; readers verify both before decoding.

Hooks: the manifest's `hooks` names, per layer, where "mlp_in" and "mlp_out" were read (the
sections keep those names whatever the hooks: the CLT's input and target). Version 3 is version
2 whose hooks may be other than the MLP's own input and output (blocks.{l}.mlp.hook_in /
hook_out, all that versions 1 and 2 were written with), e.g. hook_resid_mid: an older clt-forge
refuses it instead of taking it for MLP activations. Versions 1 and 2 are still read, and a
manifest without `hooks` reads as the default hooks. `check_dataset_hooks` refuses a dataset
whose hooks differ from the CLT's (docs/hooks.md).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard

from clt_forge.artifacts.quant import Observer, QuantSpec, decode, encode
from clt_forge.errors import CLTError

FORMAT = "clt-forge/activations"
FORMAT_VERSION = 3  # the manifest's; version 3: hooks other than the MLP's own (see above)
READ_VERSIONS = (1, 2, 3)  # version 1 also held the constants dtype "float32" and bos_stored false
DEFAULT_HOOK_IN = "mlp.hook_in"  # block-relative: the MLP module's own input ...
DEFAULT_HOOK_OUT = "mlp.hook_out"  # ... and output (clt_forge/models/activations.py reads them)
CHUNK_VERSION = 1  # the chunk files' (unchanged since version 1 datasets)
MAGIC = b"CLTCHUNK"
MANIFEST = "manifest.json"
STATS = "stats.safetensors"
HELD_OUT = "held_out"  # sub-folder: a complete dataset of held-out documents, for evaluation


@dataclass
class ChunkEntry:
    path: str  # relative to the dataset folder
    n_tokens: int
    n_bytes: int
    checksum: str  # BLAKE2b-128 hex of the whole file


@dataclass
class Manifest:
    model: str  # model config name (conf/model/<name>.yaml)
    model_id: str  # what was loaded: hub name or GGUF file
    hooks: dict[str, list[str]]  # {"mlp_in": [...per layer], "mlp_out": [...]}: where each was read
    n_layers: int
    d_model: int
    quant: dict[str, Any]  # the QuantSpec fields
    chunk_tokens: int
    context_size: int
    prepend_bos: bool
    data: dict[str, Any]  # the data config that produced the tokens
    split: str  # "train", or "held_out" for the evaluation dataset in <dataset>/held_out
    n_tokens: int
    shard_count: int
    chunks: list[ChunkEntry]
    stats: dict[str, Any] = field(default_factory=dict)  # per-layer scalars; vectors in stats.safetensors
    plan: dict[str, Any] = field(default_factory=dict)  # the writer's settings, compared on resume
    format: str = FORMAT
    version: int = FORMAT_VERSION

    @property
    def block_hooks(self) -> tuple[str, str]:
        """The block-relative (input, output) hooks the activations were read at."""
        return block_relative(self.hooks)

    @property
    def quant_spec(self) -> QuantSpec:
        return QuantSpec(**self.quant)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: Path) -> Manifest:
        if raw.get("format") != FORMAT:
            raise CLTError(f"{source}: not a clt-forge activation dataset manifest (format={raw.get('format')!r}).")
        if raw.get("version") == 1:
            raw = _from_version_1(raw, source)
        if raw.get("version") not in READ_VERSIONS:
            raise CLTError(
                f"{source}: activation dataset format version {raw.get('version')}, but this clt-forge reads "
                f"version {FORMAT_VERSION} and older. Upgrade clt-forge (or re-run clt cache with this version)."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise CLTError(f"{source}: unknown manifest keys {sorted(unknown)} for version {raw['version']}.")
        if not raw.get("hooks") and "n_layers" in raw:  # written before hooks were recorded: the MLP's own
            raw = dict(raw, hooks=hook_names(raw["n_layers"]))
        # read as the current version: older ones hold the same fields
        raw = dict(raw, chunks=[ChunkEntry(**c) for c in raw["chunks"]], version=FORMAT_VERSION)
        return cls(**raw)


def _from_version_1(raw: dict[str, Any], source: Path) -> dict[str, Any]:
    """Version 1 manifests: the same but for two constants, checked and dropped."""
    if raw.get("dtype") != "float32" or raw.get("bos_stored") is not False:
        raise CLTError(
            f"{source}: version 1 manifest with dtype={raw.get('dtype')!r}, bos_stored={raw.get('bos_stored')!r}; "
            "clt-forge only ever wrote float32 without BOS. Re-run clt cache."
        )
    return {**{k: v for k, v in raw.items() if k not in ("dtype", "bos_stored")}, "version": 2}


def hook_names(n_layers: int, hook_in: str | None = None, hook_out: str | None = None) -> dict[str, list[str]]:
    """Per-layer hook names ({"mlp_in": [...], "mlp_out": [...]}, the form artifacts record) of the
    block-relative `hook_in` / `hook_out` (None: the MLP's own input / output)."""
    return {
        "mlp_in": [f"blocks.{layer}.{hook_in or DEFAULT_HOOK_IN}" for layer in range(n_layers)],
        "mlp_out": [f"blocks.{layer}.{hook_out or DEFAULT_HOOK_OUT}" for layer in range(n_layers)],
    }


def block_relative(per_layer: Mapping[str, Sequence[str]] | None) -> tuple[str, str]:
    """The block-relative (input, output) hooks of per-layer names; refuses names that differ by
    layer. Empty (an artifact that recorded none): the MLP's own input and output."""
    if not per_layer:
        return DEFAULT_HOOK_IN, DEFAULT_HOOK_OUT
    found = []
    for kind in ("mlp_in", "mlp_out"):
        names = {name.split(".", 2)[2] if name.startswith("blocks.") else name for name in per_layer[kind]}
        if len(names) != 1:
            raise CLTError(f"the {kind} hooks differ between layers ({sorted(names)}): clt-forge reads one per block.")
        found.append(names.pop())
    return found[0], found[1]


def check_dataset_hooks(manifest: Manifest, folder: Path, declared: tuple[str, str], whose: str, model: str) -> None:
    """Refuse a dataset read at other hooks than the CLT's `declared` (block-relative input, output)
    ones, naming both sides and the `clt cache` that writes a matching dataset. `whose`: the CLT
    (e.g. "checkpoint X", "model gemma2_2b's hook_in / hook_out")."""
    cached = manifest.block_hooks
    if cached == tuple(declared):
        return
    raise CLTError(
        f"activations={folder} were cached at hook_in={cached[0]}, hook_out={cached[1]} (its manifest's hooks), "
        f"but the CLT ({whose}) reads hook_in={declared[0]} and writes hook_out={declared[1]}: it would see other "
        f"activations than it reads. Cache a dataset at its hooks: `clt cache model={model} "
        f"model.hook_in={declared[0]} model.hook_out={declared[1]} out=NEW_FOLDER`, and pass that."
    )


def read_manifest(folder: str | Path) -> Manifest:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        hint = " (its shards are not all finished yet)" if (folder / "parts").is_dir() else ""
        raise CLTError(f"no activation dataset at {folder}{hint}: run `clt cache out={folder}` first.")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CLTError(f"{path}: malformed JSON ({err}).") from None
    return Manifest.from_dict(raw, path)


def atomic_write(path: Path, data: bytes) -> None:
    """Write then rename: a reader sees the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def checksum(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def encode_chunk(
    tokens: torch.Tensor,
    mlp_in: torch.Tensor,
    mlp_out: torch.Tensor,
    spec: QuantSpec,
    observe: Mapping[str, Observer] | None = None,
    pool: Executor | None = None,
) -> bytes:
    """One self-contained chunk file: tokens [n] and activations [n, n_layers, d_model].

    observe: per kind ("mlp_in", "mlp_out"), called with each layer's values as the encoder
    reads them (`clt_forge.artifacts.quant.encode`). pool: encodes the two kinds side by side."""
    n_tokens, n_layers, d_model = mlp_in.shape
    token_bytes = tokens.to(torch.int32).numpy().astype("<i4").tobytes()
    jobs: dict[str, Callable[[], bytes]] = {
        kind: functools.partial(_encode_kind, kind, x.contiguous(), spec, (observe or {}).get(kind))
        for kind, x in (("mlp_in", mlp_in), ("mlp_out", mlp_out))
    }
    if pool is None:
        blobs = {kind: job() for kind, job in jobs.items()}
    else:
        futures = {kind: pool.submit(job) for kind, job in jobs.items()}
        blobs = {kind: future.result() for kind, future in futures.items()}
    sections = {"tokens": zstandard.ZstdCompressor(level=3).compress(token_bytes), **blobs}
    offsets, position = {}, 0
    for name, blob in sections.items():
        offsets[name] = {"offset": position, "length": len(blob)}
        position += len(blob)
    header = json.dumps(
        {"version": CHUNK_VERSION, "n_tokens": n_tokens, "n_layers": n_layers, "d_model": d_model, "sections": offsets}
    ).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *sections.values()])


def _encode_kind(kind: str, x: torch.Tensor, spec: QuantSpec, observe: Observer | None) -> bytes:
    try:
        return encode(x, spec, observe)
    except ValueError as err:  # the codec refuses what it cannot store faithfully: name the kind
        raise CLTError(f"{kind}: {err}") from None


@dataclass
class Chunk:
    tokens: torch.Tensor  # int64 [n_tokens]
    mlp_in: torch.Tensor  # float32 [n_tokens, n_layers, d_model]
    mlp_out: torch.Tensor  # float32 [n_tokens, n_layers, d_model]


def decode_chunk(data: bytes, spec: QuantSpec, source: str = "chunk") -> Chunk:
    if data[:8] != MAGIC:
        raise CLTError(f"{source}: not a clt-forge chunk (bad magic bytes).")
    (header_len,) = struct.unpack_from("<I", data, 8)
    header = json.loads(data[12 : 12 + header_len])
    if header["version"] != CHUNK_VERSION:
        raise CLTError(f"{source}: chunk format version {header['version']}, this clt-forge reads {CHUNK_VERSION}.")
    body = memoryview(data)[12 + header_len :]

    def section(name: str) -> bytes:
        where = header["sections"][name]
        return bytes(body[where["offset"] : where["offset"] + where["length"]])

    shape = (header["n_tokens"], header["n_layers"], header["d_model"])
    try:
        raw_tokens = zstandard.ZstdDecompressor().decompress(section("tokens"))
        tokens = torch.from_numpy(np.frombuffer(raw_tokens, dtype="<i4").astype(np.int64))
        return Chunk(tokens, decode(section("mlp_in"), spec, shape), decode(section("mlp_out"), spec, shape))
    except (ValueError, zstandard.ZstdError) as err:
        raise CLTError(f"{source}: cannot decode ({err}).") from None


def read_chunk(folder: Path, entry: ChunkEntry, spec: QuantSpec, verify: bool = True) -> Chunk:
    path = folder / entry.path
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CLTError(f"chunk {path} listed in {folder / MANIFEST} is missing.") from None
    if verify:
        if len(data) != entry.n_bytes:
            raise CLTError(f"chunk {path} is truncated or altered: {len(data)} bytes, manifest says {entry.n_bytes}.")
        actual = checksum(data)
        if actual != entry.checksum:
            raise CLTError(f"chunk {path} is corrupt: checksum {actual}, manifest says {entry.checksum}.")
    return decode_chunk(data, spec, source=str(path))
