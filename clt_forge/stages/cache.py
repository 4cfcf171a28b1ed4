"""`clt cache`: run the model over the text and write a quantized, chunked activation dataset."""

from __future__ import annotations

from pathlib import Path

from clt_forge.artifacts.activations import read_manifest
from clt_forge.cache.writer import CacheJob, merge_if_complete
from clt_forge.config.schema import CacheConfig
from clt_forge.errors import CLTError
from clt_forge.runs import setup


def run(cfg: CacheConfig) -> Path:
    if cfg.shard.count > 1 and not cfg.out:
        raise CLTError(
            f"shard.count={cfg.shard.count}: give every shard the same out=PATH so their parts can be merged."
        )
    out = setup(cfg)
    if cfg.merge:
        if not merge_if_complete(out, cfg.shard.count):
            raise CLTError(
                f"cannot merge {out}: not every one of the {cfg.shard.count} shards has finished (see {out / 'parts'})."
            )
    else:
        from clt_forge.models import load_model

        job = CacheJob(cfg, out)
        job.load_progress()  # refuses a folder made with other settings before loading the model
        complete = job.run(load_model(cfg.model))
        if not complete:
            print(
                f"shard {cfg.shard.index}/{cfg.shard.count} done; the dataset is merged when the last shard finishes."
            )
            return out
    manifest = read_manifest(out)
    total_bytes = sum(chunk.n_bytes for chunk in manifest.chunks)
    print(
        f"activation dataset: {out} ({manifest.n_tokens} tokens, {len(manifest.chunks)} chunks, "
        f"{total_bytes / 1e6:.1f} MB, {total_bytes / max(manifest.n_tokens, 1):.0f} bytes/token, quant={manifest.quant['scheme']})"
    )
    return out
