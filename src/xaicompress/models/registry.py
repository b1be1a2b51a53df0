"""A registry of models by name, like timm's, plus user factories `package.module:factory`.

Every factory is called as `factory(in_channels=C, image_size=H, num_classes=K, **kwargs)`
so a model adapts to the dataset. A user's factory may accept fewer of those arguments:
only the ones its signature names are passed.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from xaicompress.errors import XaiCompressError

ModelFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: make `factory` available as `--model name`."""

    def deco(factory: ModelFactory) -> ModelFactory:
        _REGISTRY[name] = factory
        return factory

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def resolve_factory(name: str) -> ModelFactory:
    """Find a registered model, or import `package.module:factory`."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" not in name:
        raise XaiCompressError(
            f"--model {name!r}: unknown model, expected one of {', '.join(list_models())} "
            "or package.module:factory"
        )
    mod_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except Exception as exc:  # any import failure is the user's spec, not our bug
        raise XaiCompressError(
            f"--model {name!r}: cannot import module {mod_name!r} ({type(exc).__name__}: {exc})"
        ) from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise XaiCompressError(f"--model {name!r}: module {mod_name!r} has no callable {attr!r}")
    return factory


def check_trusted(name: str, trusted: str | None, source: str) -> None:
    """Refuse a model name read from a file (`source`) that would import code, unless the
    user named the same factory (`trusted`, from --model or a config's `model:`).

    A registered name only selects one of the classes the installed packages define; a
    `package.module:factory` name imports a module and calls a function, which a data file
    must never be able to ask for on its own (the `trust_remote_code` rule).
    """
    if name in _REGISTRY or name == trusted:
        return
    if ":" in name:
        raise XaiCompressError(
            f"{source}: names the model factory {name!r}, which is code to import and run; "
            f"refusing to run it on a file's word (pass --model {name} if you trust it)")
    raise XaiCompressError(f"{source}: names unknown model {name!r}; expected one of "
                           f"{', '.join(list_models())}")


def create_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    **kwargs: Any,
) -> nn.Module:
    """Build model `name` for inputs of shape (C, H, W) and `num_classes` outputs."""
    factory = resolve_factory(name)
    c, h, _w = input_shape
    offered = {"in_channels": c, "image_size": h, "num_classes": num_classes, **kwargs}
    try:
        params = inspect.signature(factory).parameters
        takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        call_kw = offered if takes_var_kw else {k: v for k, v in offered.items() if k in params}
    except (TypeError, ValueError):
        call_kw = offered
    unknown = set(kwargs) - set(call_kw)
    if unknown:
        raise XaiCompressError(f"--model {name!r}: does not accept options {sorted(unknown)}")
    try:
        model = factory(**call_kw)
    except XaiCompressError:
        raise
    except Exception as exc:
        raise XaiCompressError(
            f"--model {name!r}: factory failed for input {tuple(input_shape)} and "
            f"{num_classes} classes ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(model, nn.Module):
        raise XaiCompressError(f"--model {name!r}: factory returned {type(model).__name__}, "
                               "expected a torch.nn.Module")
    return model
