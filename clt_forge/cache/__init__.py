"""Activation datasets: quantization codecs (quant), the on-disk format (format), writing
with shards and resume (writer), reading with shuffling and prefetch (reader), and the
ActivationsStore that training and autointerp consume (store)."""

from clt_forge.cache.reader import ActivationBatch, ActivationReader
from clt_forge.cache.store import ActivationsStore

__all__ = ["ActivationBatch", "ActivationReader", "ActivationsStore"]
