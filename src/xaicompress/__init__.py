"""xaicompress: compress PyTorch image classifiers with DeepLIFT relevance."""

from xaicompress.errors import XaiCompressError

__version__ = "0.1.0"
__all__ = ["XaiCompressError", "__version__"]
