"""Pruning driven by any criterion.

`prune_structured` removes whole filters / neurons (Torch-Pruning dependency graph, so the
model really shrinks); `prune_unstructured` zeroes single weights under masks kept in the
checkpoint's compression state; `prune.sparse` stores mask positions as a runtime would.
"""

from xaicompress.prune.importance import RelevanceImportance
from xaicompress.prune.sparse import decode_positions, encode_positions, position_bits
from xaicompress.prune.structured import classifier_layer, prune_structured
from xaicompress.prune.unstructured import prune_unstructured, sparse_bytes

__all__ = ["RelevanceImportance", "classifier_layer", "decode_positions", "encode_positions",
           "position_bits", "prune_structured", "prune_unstructured", "sparse_bytes"]
