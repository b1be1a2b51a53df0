"""xaicompress: compress PyTorch image classifiers with DeepLIFT relevance.

The Python API (`xaicompress.api`) works on plain PyTorch objects::

    import xaicompress as xc
    small = xc.prune_structured(model, train_set, ratio=0.5, criterion="deeplift")
"""

from xaicompress.api import (
    CompressResult,
    compress,
    compression_of,
    explain,
    finetune,
    load,
    prune_structured,
    prune_unstructured,
    quantize,
    save,
    share,
)
from xaicompress.errors import XaiCompressError
from xaicompress.version import __version__

__all__ = ["CompressResult", "XaiCompressError", "__version__", "compress", "compression_of",
           "explain", "finetune", "load", "prune_structured", "prune_unstructured", "quantize",
           "save", "share"]
