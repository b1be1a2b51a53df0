"""Parse a `--data SPEC` string into a `DataSpec`.

Grammar (whitespace around the whole spec is ignored, the kind is case-insensitive)::

    SPEC    := KIND [ ":" PATH ] [ "?" OPTIONS ]
    KIND    := mnist5k | digits | idx | cifar10 | cifar100 | folder
    OPTIONS := KEY "=" VALUE { "&" KEY "=" VALUE }

Examples: ``mnist5k``, ``digits``, ``idx:~/data/FashionMNIST``, ``cifar10:/data/cifar``,
``folder:/data/flowers?size=64``.

* ``mnist5k`` and ``digits`` are embedded and take no PATH; every other kind needs one.
* The PATH is everything after the first colon (so ``folder:C:\\imgs`` works) up to the last
  ``?`` that starts a well-formed option list.
* ``size=N`` (1..4096) resizes images to N x N (for ``folder`` the default is 32; for
  in-memory kinds the native size is kept unless asked).
* ``split=N`` (0..1000, embedded kinds only) draws a different stratified train/test
  partition of the same images (``split=0`` is the default one): a second split on which
  to check that a configuration chosen on the first is not tuned to its test images.

Parsing never touches the filesystem: whether PATH exists is checked by `load_dataset`.
Any malformed input raises `XaiCompressError`, never another exception type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from xaicompress.errors import XaiCompressError

KINDS_WITHOUT_PATH = ("mnist5k", "digits")
KINDS_WITH_PATH = ("idx", "cifar10", "cifar100", "folder")
KINDS = KINDS_WITHOUT_PATH + KINDS_WITH_PATH
DEFAULT_SPEC = "mnist5k"

MAX_IMAGE_SIZE = 4096
#: how Python spells the bytes of a file name that is not UTF-8 (os.fsdecode's
#: surrogateescape): such a folder name is valid, not "non-printable"
_SURROGATE_ESCAPE = (0xDC80, 0xDCFF)
_OPTION_RE = re.compile(r"[a-z_]+=[^&=]*(&[a-z_]+=[^&=]*)*")
_EXPECTED = "expected mnist5k, digits, idx:DIR, cifar10:DIR, cifar100:DIR or folder:DIR[?size=N]"


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec: `kind`, `path` (None for embedded kinds) and typed `options`."""

    kind: str
    path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        s = self.kind if self.path is None else f"{self.kind}:{self.path}"
        if self.options:
            s += "?" + "&".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return s


def _bad(spec: str, why: str) -> XaiCompressError:
    # repr() keeps control characters and odd whitespace visible on the one-line message.
    return XaiCompressError(f"--data {spec!r}: {why}")


def _parse_size(spec: str, value: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise _bad(spec, f"option size={value!r} must be an integer in 1..{MAX_IMAGE_SIZE}")
    size = int(value)
    if not 1 <= size <= MAX_IMAGE_SIZE:
        raise _bad(spec, f"option size={size} must be an integer in 1..{MAX_IMAGE_SIZE}")
    return size


MAX_SPLIT = 1000


def _parse_split(spec: str, value: str) -> int:
    if not value.isascii() or not value.isdigit() or not 0 <= int(value) <= MAX_SPLIT:
        raise _bad(spec, f"option split={value!r} must be an integer in 0..{MAX_SPLIT}")
    return int(value)


def _parse_options(spec: str, text: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in text.split("&"):
        key, _, value = pair.partition("=")
        if key in options:
            raise _bad(spec, f"option {key!r} given twice")
        if key == "size":
            options[key] = _parse_size(spec, value)
        elif key == "split":
            options[key] = _parse_split(spec, value)
        else:
            raise _bad(spec, f"unknown option {key!r}; expected size=N or split=N")
    return options


def parse_data_spec(spec: str) -> DataSpec:
    """Parse `spec` (see module docstring); raise `XaiCompressError` if it is invalid."""
    if not isinstance(spec, str):
        raise XaiCompressError(f"--data {spec!r}: expected a string, {_EXPECTED}")
    text = spec.strip()
    if not text:
        raise _bad(spec, f"empty data spec; {_EXPECTED}")
    if not all(c.isprintable() or _SURROGATE_ESCAPE[0] <= ord(c) <= _SURROGATE_ESCAPE[1]
               for c in text):
        raise _bad(spec, "contains control or non-printable characters")

    options: dict[str, Any] = {}
    head, qmark, tail = text.rpartition("?")
    if qmark and _OPTION_RE.fullmatch(tail):
        options = _parse_options(spec, tail)
        text = head

    kind, colon, path = text.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise _bad(spec, f"unknown data kind {kind!r}; {_EXPECTED}")
    if kind in KINDS_WITHOUT_PATH:
        if colon:
            raise _bad(spec, f"{kind} is embedded and takes no path; use just {kind!r}")
        return DataSpec(kind=kind, path=None, options=options)
    if not path.strip():
        raise _bad(spec, f"{kind} needs a folder: {kind}:DIR")
    return DataSpec(kind=kind, path=path, options=options)
