"""Import torchvision and timm, also where torchvision's C++ operators do not load.

torchvision and timm are optional (`pip install -e ".[vision]"`). Their *model definitions*
are pure Python, but `import torchvision` first registers fake kernels for its C++
detection operators (`torchvision::nms`, `torchvision::qnms`). Where the installed
torchvision wheel does not match the installed torch (on our CPU machines the package
index serves a CUDA build of torchvision 0.28.0 next to the CPU torch 2.13.0), its C++
library does not load and that registration fails with
`RuntimeError: operator torchvision::nms does not exist`.

`import_torchvision()` then declares the two operator *schemas* (no kernels), so the
registration succeeds and every classification model works; calling `nms` itself would
still fail, which no classifier does. A user whose torchvision matches torch never takes
this path. Nothing here downloads anything.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from xaicompress.errors import XaiCompressError

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_shim: list[object] = []  # keeps the torch.library fragment alive


def _declare_detection_ops() -> None:
    import torch

    if _shim:
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        try:
            lib.define(schema)
        except RuntimeError:  # already declared (a matching C++ library did load)
            pass
    _shim.append(lib)


def import_torchvision() -> ModuleType:
    """`import torchvision`, declaring its detection operators first if they are missing."""
    try:
        return importlib.import_module("torchvision")
    except ModuleNotFoundError as exc:
        raise XaiCompressError("torchvision is not installed; install the vision extra: "
                               "pip install 'xaicompress[vision]'") from exc
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    import sys

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # drop the half-imported package before retrying
    _declare_detection_ops()
    return importlib.import_module("torchvision")


def import_timm() -> ModuleType:
    """`import timm` (it imports torchvision, so the same fallback applies)."""
    import_torchvision()
    try:
        return importlib.import_module("timm")
    except ModuleNotFoundError as exc:
        raise XaiCompressError("timm is not installed; install the vision extra: "
                               "pip install 'xaicompress[vision]'") from exc
