"""Pruning driven by any criterion.

`prune_structured` removes whole filters / neurons (Torch-Pruning dependency graph, so the
model really shrinks); `prune_unstructured` zeroes single weights under masks kept in the
checkpoint's compression state (`encoding.Mask`, whose positions `encoding.positions` stores
as a runtime would).
"""

from xaicompress.prune.importance import RelevanceImportance
from xaicompress.prune.structured import classifier_layer, prune_structured
from xaicompress.prune.unstructured import prune_unstructured, sparse_bytes

__all__ = ["RelevanceImportance", "classifier_layer", "prune_structured", "prune_unstructured",
           "sparse_bytes"]
