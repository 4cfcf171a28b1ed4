"""Text in, token windows out: the bundled corpora, any HF dataset or local files, split
deterministically into train / held-out documents and packed into fixed context windows."""

from clt_forge.data.text import TEXT_SOURCES, Document, load_documents
from clt_forge.data.windows import token_windows

__all__ = ["TEXT_SOURCES", "Document", "load_documents", "token_windows"]
