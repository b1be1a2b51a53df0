"""What an exported file tells a runtime about its model: the architecture and how to feed it.

ONNX files carry it in `metadata_props` (string keys and values, shown by Netron and read
with `onnx.load(path).metadata_props` or onnxruntime's
`InferenceSession(path).get_modelmeta().custom_metadata_map`):

| key | value |
|---|---|
| `xaicompress.model` | the model spec name (`torchvision:resnet18`, `lenet5`, ...) |
| `xaicompress.preprocess` | JSON: `mean`, `std` (lists), `size` N, `resize` (N or null), |
|  | `color` ("RGB" or "L"), `pixel_range` [0, 1], `layout` "NCHW" |
| `normalise_mean`, `normalise_std` | the same per-channel values, comma-separated |
| `input_size` | N (the input is N x N) |

A runtime computes `(pixel / 255 - mean[c]) / std[c]` per channel on an N x N image (after
resizing the shorter side to `resize` and centre-cropping N x N when `resize` is set).
"""

from __future__ import annotations

import json
from typing import Any


def preprocess_metadata(spec: Any) -> dict[str, str]:
    """The metadata entries of a `checkpoint.ModelSpec` (no preprocessing entries when its
    file recorded none)."""
    out = {"xaicompress.model": str(spec.name)}
    pre = spec.preprocess
    if pre is None or pre.mean is None:
        return out
    info = {**pre.to_meta(), "color": "RGB" if pre.channels == 3 else "L",
            "pixel_range": [0, 1], "layout": "NCHW"}
    out["xaicompress.preprocess"] = json.dumps(info, separators=(",", ":"))
    out["normalise_mean"] = ",".join(repr(float(v)) for v in pre.mean)
    out["normalise_std"] = ",".join(repr(float(v)) for v in pre.std or ())
    out["input_size"] = str(pre.size if pre.size is not None else spec.input_shape[1])
    return out


def add_onnx_metadata(proto: Any, spec: Any) -> None:
    """Add `preprocess_metadata(spec)` to an ONNX `ModelProto`'s metadata_props (the
    properties already there are kept)."""
    import onnx

    kept = {p.key: p.value for p in proto.metadata_props}
    onnx.helper.set_model_props(proto, {**kept, **preprocess_metadata(spec)})
