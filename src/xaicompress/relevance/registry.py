"""Criteria by name: `register_criterion("name")` and `get_criterion("name:key=value,...")`.

Like timm's model registry, a name is registered once: registering it again raises unless
`overwrite=True`. A spec's options are checked against the criterion's constructor before
it is built: an unknown option is refused with the list of valid ones, and every value is
range-checked by the criterion itself. Errors name the criterion (`criterion 'l1:bogus=1':
...`); the CLI and the config add their own flag or key.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from xaicompress.errors import XaiCompressError
from xaicompress.relevance.base import Criterion

_CRITERIA: dict[str, type[Criterion]] = {}


class CriterionError(XaiCompressError):
    """A bad criterion spec. `spec` is what was given, `reason` the message without the
    "criterion 'spec': " prefix (for callers that name the option themselves)."""

    def __init__(self, spec: str, reason: str) -> None:
        self.spec, self.reason = spec, " ".join(str(reason).split())
        super().__init__(f"criterion {spec!r}: {self.reason}")


def register_criterion(name: str, *, overwrite: bool = False
                       ) -> Callable[[type[Criterion]], type[Criterion]]:
    """Class decorator: make a criterion available as `get_criterion(name)` / `--criterion
    name`. A name already taken raises XaiCompressError unless `overwrite=True`."""
    if not isinstance(name, str) or not name or any(c in name for c in ":,= "):
        raise XaiCompressError(f"register_criterion({name!r}): expected a name without "
                               "':', ',', '=' or spaces")

    def deco(cls: type[Criterion]) -> type[Criterion]:
        if not (isinstance(cls, type) and issubclass(cls, Criterion)):
            raise XaiCompressError(f"register_criterion({name!r}): {cls!r} is not a Criterion "
                                   "subclass")
        if name in _CRITERIA and _CRITERIA[name] is not cls and not overwrite:
            raise XaiCompressError(f"register_criterion({name!r}): the name is taken by "
                                   f"{_CRITERIA[name].__module__}.{_CRITERIA[name].__name__}; "
                                   "pass overwrite=True to replace it")
        cls.name = name
        _CRITERIA[name] = cls
        return cls

    return deco


def list_criteria() -> list[str]:
    return sorted(_CRITERIA)


def criterion_options(cls: type[Criterion]) -> list[str] | None:
    """The option names `cls` accepts (its constructor's parameters); None when it takes
    arbitrary keyword options (**kwargs)."""
    init = cls.__init__
    if init is Criterion.__init__:
        return []
    params = list(inspect.signature(init).parameters.values())[1:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`name` or `name:key=value,key=value` -> (name, options); values that look like a
    number or true/false are parsed."""
    name, _, opt_text = str(spec).strip().partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in opt_text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise CriterionError(spec, f"option {item!r} is not key=value")
        if key.strip() in options:
            raise CriterionError(spec, f"option {key.strip()!r} given twice")
        options[key.strip()] = _parse_value(value.strip())
    return name.strip(), options


def get_criterion(spec: str | Criterion, *, default_seed: int | None = None,
                  **overrides: Any) -> Criterion:
    """Build a criterion from a spec (`name` or `name:key=value,...`); `overrides` are
    further options (Python values). `default_seed` becomes the `seed` option of a
    criterion that declares `seeded` when neither the spec nor `overrides` set one. A
    Criterion instance is returned unchanged."""
    if isinstance(spec, Criterion):
        return spec
    name, options = parse_spec(spec)
    cls = _CRITERIA.get(name)
    if cls is None:
        raise CriterionError(spec, f"unknown criterion, expected one of "
                             f"{', '.join(list_criteria())}")
    options.update(overrides)
    valid = criterion_options(cls)
    unknown = [k for k in options if valid is not None and k not in valid]
    if unknown:
        takes = (f"valid options: {', '.join(valid)}" if valid else
                 f"{name} takes no options")
        raise CriterionError(spec, f"unknown option {unknown[0]!r}; {takes}")
    if default_seed is not None and cls.seeded and "seed" not in options:
        options["seed"] = default_seed
    try:
        return cls(**options)
    except CriterionError:
        raise
    except XaiCompressError as exc:
        raise CriterionError(spec, str(exc)) from exc
    except (TypeError, ValueError) as exc:
        raise CriterionError(spec, str(exc)) from exc


def _parse_value(v: str) -> Any:
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v
