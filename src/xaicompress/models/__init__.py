"""Model zoo: `create_model("lenet5", input_shape, num_classes)`, the `torchvision:NAME` and
`timm:NAME` families (`models/vision.py`) or a user factory `package.module:factory`."""

from xaicompress.models import lenet, resnet, vgg, vision  # noqa: F401  (register the zoo)
from xaicompress.models.registry import create_model, list_models, register_model, resolve_factory

__all__ = ["create_model", "list_models", "register_model", "resolve_factory"]
