"""Model zoo: `create_model("lenet5", input_shape, num_classes)` or a user factory."""

from xaicompress.models import lenet, resnet, vgg  # noqa: F401  (register the zoo)
from xaicompress.models.registry import create_model, list_models, register_model, resolve_factory

__all__ = ["create_model", "list_models", "register_model", "resolve_factory"]
