"""The `torchvision:NAME` and `timm:NAME` model families.

`--model torchvision:resnet18` builds `torchvision.models.resnet18(weights=None,
num_classes=K, **kwargs)`; `--model timm:mobilenetv3_small_050` builds
`timm.create_model(NAME, pretrained=False, num_classes=K, in_chans=C, **kwargs)`. NAME is
looked up only in the library's own list of classification models
(`torchvision.models.list_models(module=torchvision.models)`, `timm.list_models()`), never
imported as a module, so a file may name such a model the way it names a registered one
(`models.registry.check_trusted`). Nothing is downloaded: options that would fetch weights
or read another file (`weights`, `pretrained`, `checkpoint_path`, ...) are refused.

torchvision models take 3-channel images (grayscale data is replicated to RGB when the
model's preprocessing has 3 channels, `data/preprocess.py`); timm models adapt their stem to
the data's channels through `in_chans`.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from xaicompress.errors import XaiCompressError
from xaicompress.models.registry import ModelFactory, register_family
from xaicompress.models.vision_import import import_timm, import_torchvision

#: constructor options that would download weights or read a file the option names
REFUSED_KWARGS = frozenset({"weights", "weights_backbone", "pretrained", "pretrained_cfg",
                            "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
                            "features_only", "progress", "in_chans", "num_classes"})
_NAME = re.compile(r"^[A-Za-z0-9_.]{1,100}$")


def _check_kwargs(spec: str, kwargs: dict[str, Any]) -> None:
    bad = sorted(set(kwargs) & REFUSED_KWARGS)
    if bad:
        why = ("comes from the data" if bad[0] in ("num_classes", "in_chans") else
               "would download or read weights; import your weights with `xaicompress import`")
        raise XaiCompressError(f"--model {spec}: option {bad[0]!r} is not accepted ({why})")


def torchvision_model(name: str) -> ModelFactory | None:
    """The factory of torchvision classification model `name`, None if torchvision has none."""
    if not _NAME.match(name):
        return None
    tv = import_torchvision()
    if name not in tv.models.list_models(module=tv.models):
        return None
    builder = tv.models.get_model_builder(name)

    def build(in_channels: int = 3, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
        _check_kwargs(f"torchvision:{name}", kwargs)
        if in_channels != 3:
            raise XaiCompressError(
                f"--model torchvision:{name}: takes 3-channel images, the data has "
                f"{in_channels}; give --normalise with 3 means and stds (grayscale images are "
                "then replicated to RGB) or use a timm:NAME model (in_chans)")
        return builder(weights=None, num_classes=num_classes, **kwargs)

    build.__name__ = name
    return build


def timm_model(name: str) -> ModelFactory | None:
    """The factory of timm model `name` (architecture names of `timm.list_models()`)."""
    if not _NAME.match(name):
        return None
    timm = import_timm()
    if not timm.is_model(name):
        return None

    def build(in_channels: int = 3, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
        _check_kwargs(f"timm:{name}", kwargs)
        return timm.create_model(name, pretrained=False, num_classes=num_classes,
                                 in_chans=in_channels, **kwargs)

    build.__name__ = name
    return build


FAMILIES = {"torchvision": torchvision_model, "timm": timm_model}
for _prefix, _resolve in FAMILIES.items():
    register_family(_prefix, _resolve, overwrite=True)
