"""How a layer's weights are stored: one home per encoding.

A layer's compression (`LayerEncoding`) is an optional `Mask` plus at most one weight
encoding, `Codebook` or `IntGrid`, plus optional activation quantization (`ActQuant`).
Each class owns its effective weight, its bytes in the packed file (encode / decode, exact
bit count), its checkpoint tensors and metadata, and the validation of its fields.
`CompressionState` maps layer names to their encodings. To add an encoding, write a class
with the same methods (see `Codebook`), add it to `layer.WEIGHT_ENCODINGS` and
`docs/format.md`.
"""

from xaicompress.encoding.activation import ActQuant
from xaicompress.encoding.codebook import Codebook
from xaicompress.encoding.dense import Dense
from xaicompress.encoding.intgrid import IntGrid, qmax
from xaicompress.encoding.layer import CompressionState, LayerEncoding
from xaicompress.encoding.mask import Mask

__all__ = ["ActQuant", "Codebook", "CompressionState", "Dense", "IntGrid", "LayerEncoding",
           "Mask", "qmax"]
