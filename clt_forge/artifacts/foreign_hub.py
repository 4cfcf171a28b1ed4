"""`checkpoint=hf://org/name[/subfolder][@revision]`: a Hugging Face repo as a local checkpoint folder.

The repo (or only its subfolder) is fetched with huggingface_hub.snapshot_download into the
user's Hugging Face cache, once; later runs find it there, offline too. Offline
(HF_HUB_OFFLINE=1, or no network) and not yet cached is a CLTError naming the repo and the
command that pre-downloads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from clt_forge.errors import CLTError

__all__ = ["HubRef", "is_hub", "parse_hub", "resolve_hub"]

PREFIX = "hf://"


@dataclass(frozen=True)
class HubRef:
    repo_id: str  # org/name
    subfolder: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        sub = f"/{self.subfolder}" if self.subfolder else ""
        rev = f"@{self.revision}" if self.revision else ""
        return f"{PREFIX}{self.repo_id}{sub}{rev}"


def is_hub(checkpoint: str | Path) -> bool:
    """hf://... (also as a Path, which folds the double slash into hf:/...)."""
    return str(checkpoint).startswith(("hf://", "hf:/"))


def parse_hub(checkpoint: str | Path) -> HubRef:
    text = str(checkpoint)
    body = text[len(PREFIX) :] if text.startswith(PREFIX) else text[len("hf:/") :]
    body, _, revision = body.partition("@")
    parts = [part for part in body.split("/") if part]
    if len(parts) < 2:
        raise CLTError(f"checkpoint={text}: a hub checkpoint is hf://org/name, optionally /subfolder and @revision.")
    return HubRef("/".join(parts[:2]), "/".join(parts[2:]) or None, revision or None)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def download_hint(ref: HubRef) -> str:
    rev = f" --revision {ref.revision}" if ref.revision else ""
    name = ref.repo_id.split("/")[1]
    return (
        f"pre-download it while online: `huggingface-cli download {ref.repo_id}{rev}` (fills the cache this "
        f"reads, offline too), or `huggingface-cli download {ref.repo_id}{rev} --local-dir {name}` and pass "
        f"checkpoint={name}{'/' + ref.subfolder if ref.subfolder else ''}"
    )


def resolve_hub(checkpoint: str | Path) -> Path:
    """The local folder holding the repo's checkpoint (downloaded on first use when online)."""
    ref = parse_hub(checkpoint)
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover (a dependency of circuit-tracer)
        raise CLTError(
            f"checkpoint={ref}: reading from the hub needs huggingface_hub (pip install huggingface_hub)."
        ) from exc
    patterns = [f"{ref.subfolder}/*"] if ref.subfolder else None
    try:
        local = snapshot_download(
            ref.repo_id, revision=ref.revision, allow_patterns=patterns, local_files_only=offline()
        )
    except Exception as exc:  # offline, no network, unknown repo or revision, no access
        reason = "offline (HF_HUB_OFFLINE=1) and not in the local cache" if offline() else type(exc).__name__
        raise CLTError(
            f"checkpoint={ref}: could not get {ref.repo_id} from the hub ({reason}: {exc}); {download_hint(ref)}."
        ) from exc
    folder = Path(local) / ref.subfolder if ref.subfolder else Path(local)
    if not folder.is_dir():
        raise CLTError(f"checkpoint={ref}: the repo {ref.repo_id} has no folder {ref.subfolder!r}.")
    return folder
