"""A registry of models by name, like timm's, plus user factories `package.module:factory`.

A factory is called with the data arguments its signature *names* among `in_channels=C`,
`image_size=H`, `num_classes=K` (so a model adapts to the dataset), plus the user's
kwargs; a factory that only takes `**kwargs` (e.g. `torchvision.models.resnet18`) gets no
data argument it did not ask for. Families map the data arguments to their library's own
(`models/vision.py`: `num_classes`, and `in_chans` for timm).

Names a *file* may give (checkpoint metadata, packed header, cache entry) are checked by
`check_trusted` before anything is imported or called: a registered name, a name of a
registered *family* (`family:NAME`, resolved inside that library's own model namespace,
e.g. a later `torchvision:resnet18`), or the user factory the user named on the command
line. Their keyword arguments are checked against the factory's signature by
`check_model_kwargs`.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from typing import Any

from torch import nn

from xaicompress.errors import XaiCompressError

ModelFactory = Callable[..., nn.Module]
#: resolves NAME inside one library's model namespace (never an arbitrary import);
#: returns None when that library has no model NAME
ModelFamily = Callable[[str], ModelFactory | None]
_REGISTRY: dict[str, ModelFactory] = {}
_FAMILIES: dict[str, ModelFamily] = {}
#: arguments every factory gets from the data, never from kwargs
DATA_ARGS = ("in_channels", "image_size", "num_classes")
_MAX_KWARGS = 64
_MAX_STR = 1000


def register_model(name: str, *, overwrite: bool = False
                   ) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: make `factory` available as `--model name`. Registering a name twice is
    an error unless overwrite=True (a silent overwrite would change what files mean)."""

    def deco(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory and not overwrite:
            raise XaiCompressError(f"model {name!r} is already registered; pass "
                                   "overwrite=True to replace it")
        if ":" in name:
            raise XaiCompressError(f"model name {name!r}: a registered name has no ':' "
                                   "(that spells package.module:factory)")
        _REGISTRY[name] = factory
        return factory

    return deco


def register_family(prefix: str, resolve: ModelFamily, *, overwrite: bool = False) -> None:
    """Make `prefix:NAME` mean `resolve(NAME)`: a model of one library's own namespace
    (e.g. prefix "torchvision" resolving within `torchvision.models`). Files may name such
    models without --model, as they may registered ones; `resolve` must never import
    arbitrary modules."""
    if prefix in _FAMILIES and not overwrite:
        raise XaiCompressError(f"model family {prefix!r} is already registered")
    _FAMILIES[prefix] = resolve


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _family_factory(name: str) -> ModelFactory | None:
    """The factory of a `family:NAME` name, None when `name` names no registered family."""
    prefix, sep, rest = name.partition(":")
    if not sep or prefix not in _FAMILIES:
        return None
    factory = _FAMILIES[prefix](rest)
    if factory is None:
        raise XaiCompressError(f"--model {name!r}: {prefix} has no model {rest!r}")
    return factory


def resolve_factory(name: str) -> ModelFactory:
    """Find a registered model or family member, or import `package.module:factory`."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    family = _family_factory(name)
    if family is not None:
        return family
    if ":" not in name:
        raise XaiCompressError(
            f"--model {name!r}: unknown model, expected one of {', '.join(list_models())}, "
            f"{', '.join(f'{p}:NAME' for p in sorted(_FAMILIES))} or package.module:factory"
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

    A registered name (or `family:NAME`) only selects one of the classes the installed
    packages define; a `package.module:factory` name imports a module and calls a
    function, which a data file must never be able to ask for on its own (the
    `trust_remote_code` rule).
    """
    if not isinstance(name, str):
        raise XaiCompressError(f"{source}: model name must be a string")
    if name in _REGISTRY or name == trusted:
        return
    if name.partition(":")[0] in _FAMILIES:
        try:
            _family_factory(name)
        except XaiCompressError as exc:
            raise XaiCompressError(f"{source}: {exc}") from None
        return
    if ":" in name:
        raise XaiCompressError(
            f"{source}: names the model factory {name!r}, which is code to import and run; "
            f"refusing to run it on a file's word (pass --model {name} if you trust it)")
    raise XaiCompressError(f"{source}: names unknown model {name[:100]!r}; expected one of "
                           f"{', '.join(list_models())}")


def _json_value_ok(v: Any, depth: int = 0) -> bool:
    """A JSON scalar (finite numbers, strings up to _MAX_STR) or a short flat list of them."""
    if v is None or isinstance(v, bool):
        return True
    if isinstance(v, int):
        return abs(v) < 1 << 53
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, str):
        return len(v) <= _MAX_STR
    if isinstance(v, list) and depth == 0:
        return len(v) <= _MAX_KWARGS and all(_json_value_ok(x, 1) for x in v)
    return False


def _expected_type(p: inspect.Parameter) -> type | None:
    """The type a parameter's default (or simple annotation) asks for, None if unknown."""
    if p.default is not inspect.Parameter.empty and p.default is not None:
        return type(p.default) if type(p.default) in (bool, int, float, str) else None
    ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__",
                                                                     None)
    return {"bool": bool, "int": int, "float": float, "str": str}.get(str(ann))


def _type_ok(value: Any, want: type | None) -> bool:
    if want is None or value is None:
        return True
    if want is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, want)


def check_model_kwargs(name: str, kwargs: Any, source: str) -> None:
    """Refuse metadata kwargs that the factory's signature does not name or whose JSON type
    does not match its default (or annotation). Call after `check_trusted`."""
    if not isinstance(kwargs, dict) or len(kwargs) > _MAX_KWARGS:
        raise XaiCompressError(f"{source}: model kwargs must be an object of at most "
                               f"{_MAX_KWARGS} entries")
    try:
        params = inspect.signature(resolve_factory(name)).parameters
    except (TypeError, ValueError):
        params = {}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in kwargs.items():
        if key in DATA_ARGS:
            raise XaiCompressError(f"{source}: model kwargs set {key!r}, which comes from the "
                                   "data (input_shape, num_classes)")
        if not _json_value_ok(value):
            raise XaiCompressError(f"{source}: model kwarg {key!r} = {str(value)[:60]} is not "
                                   "a JSON number, string, bool, null or flat list")
        p = params.get(key)
        if p is None and params and not var_kw:
            raise XaiCompressError(f"{source}: model {name!r} takes no argument {key!r}")
        if p is not None and not _type_ok(value, _expected_type(p)):
            raise XaiCompressError(f"{source}: model kwarg {key!r} = {value!r}, expected "
                                   f"{_expected_type(p).__name__}")  # type: ignore[union-attr]


def create_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    /,
    **kwargs: Any,
) -> nn.Module:
    """Build model `name` for inputs of shape (C, H, W) and `num_classes` outputs.

    The first three arguments are positional-only, so a factory may take options of any
    name (a `name=` option included) through kwargs."""
    factory = resolve_factory(name)
    c, h, _w = input_shape
    data_args = {"in_channels": c, "image_size": h, "num_classes": num_classes}
    try:
        params = inspect.signature(factory).parameters
        takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        # data arguments only where the signature names them (never into a **kwargs that
        # forwards them to a constructor that does not take them); the user's own kwargs
        # wherever the factory accepts them
        call_kw = {k: v for k, v in data_args.items() if k in params}
        call_kw.update({k: v for k, v in kwargs.items() if takes_var_kw or k in params})
    except (TypeError, ValueError):
        call_kw = {**data_args, **kwargs}
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
