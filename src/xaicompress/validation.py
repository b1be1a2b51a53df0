"""pydantic's validation errors as the one line a user reads.

The same models validate a YAML config and the CLI's options (one declaration per option),
so one humaniser serves both; only the name of the place differs: `stages[0].ratio` in a
config, `--ratio` on the command line. `describe(exc, name_of, allowed)` takes the first
problem and says where (name_of(location)), what was given and what was expected.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import ValidationError

#: pydantic puts the union member it tried into locations ("int", "float",
#: "dict[str,...]", "function-after[...]"); they mean nothing to a user
_TYPE_PARTS = ("int", "float", "str", "bool", "none")


def clean_loc(loc: Iterable[Any], tags: Iterable[str] = ()) -> tuple[Any, ...]:
    """Drop union member names and discriminator `tags` (stage types) from a location."""
    tags = set(tags)
    raw = tuple(loc)
    out: list[Any] = []
    for i, part in enumerate(raw):
        if isinstance(part, str) and part in tags and i > 0 and isinstance(raw[i - 1], int):
            continue
        if isinstance(part, str) and (part in _TYPE_PARTS or "[" in part or "-" in part):
            continue
        out.append(part)
    return tuple(out)


def message(err: dict[str, Any]) -> str:
    """pydantic's message of one error, without its 'Value error, ' prefix."""
    return str(err.get("msg", "invalid value")).removeprefix("Value error, ")


def shown_value(err: dict[str, Any]) -> str:
    """' (got X)' for a scalar input, '' where the message already says it or X is big."""
    given = err.get("input")
    kind = err.get("type", "")
    if isinstance(given, (dict, list)) or kind.startswith("union_tag") or kind in (
            "value_error", "missing", "extra_forbidden"):
        return ""
    return f" (got {given!r:.60})"


def more(exc: ValidationError) -> str:
    n = exc.error_count()
    return f" [and {n - 1} more problem{'s' if n > 2 else ''}]" if n > 1 else ""


def describe(exc: ValidationError, name_of: Callable[[tuple[Any, ...]], str], *,
             allowed: Callable[[tuple[Any, ...]], list[str]] | None = None,
             tags: Iterable[str] = ()) -> str:
    """One line for the first problem of `exc`.

    name_of: (cleaned location) -> how the user names that place ('' = the whole model).
    allowed: (cleaned location of an unknown key) -> the keys that would have been valid.
    """
    err = exc.errors(include_url=False)[0]
    loc = clean_loc(err.get("loc", ()), tags)
    where = name_of(loc)
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        keys = allowed(loc) if allowed else []
        hint = f"; expected one of {', '.join(keys)}" if keys else ""
        return f"{where}: unknown key{hint}"
    if kind == "missing":
        return f"{where}: required key is missing"
    text = f"{message(err)}{shown_value(err)}{more(exc)}"
    return f"{where}: {text}" if where else text


def rename_fields(text: str, names: dict[str, str]) -> str:
    """Replace whole-word field names in a model-level message (`give exactly one of
    clusters and avg_bits`) by what the user types (`--clusters`, `--avg-bits`)."""
    if not names:
        return text
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, sorted(
        names, key=len, reverse=True))) + r")(?![\w-])")
    return pattern.sub(lambda m: names[m.group(1)], text)
