"""Data spec parsing: valid forms, invalid forms, and a property test on arbitrary text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xaicompress.data import DataSpec, load_dataset, parse_data_spec
from xaicompress.errors import XaiCompressError


@pytest.mark.parametrize(
    ("text", "kind", "path", "options"),
    [
        ("mnist5k", "mnist5k", None, {}),
        ("  Digits ", "digits", None, {}),
        ("mnist5k?size=32", "mnist5k", None, {"size": 32}),
        ("idx:/data/fashion", "idx", "/data/fashion", {}),
        ("cifar10:rel/dir", "cifar10", "rel/dir", {}),
        ("cifar100:/x", "cifar100", "/x", {}),
        ("folder:/imgs?size=64", "folder", "/imgs", {"size": 64}),
        ("folder:C:\\imgs", "folder", "C:\\imgs", {}),
        ("folder:/odd?dir/x", "folder", "/odd?dir/x", {}),
    ],
)
def test_valid_specs(text: str, kind: str, path: str | None, options: dict) -> None:
    spec = parse_data_spec(text)
    assert (spec.kind, spec.path, spec.options) == (kind, path, options)
    assert parse_data_spec(str(spec)) == spec


@pytest.mark.parametrize(
    "text",
    ["", "   ", "imagenet", "mnist5k:/x", "digits:", "idx", "idx:", "idx:  ", "cifar10",
     "folder:/x?size=0", "folder:/x?size=abc", "folder:/x?size=99999", "folder:/x?color=1",
     "folder:/x?size=3&size=4", "idx:/x\x00y", "mnist5k\x1b", "folder:/a\tb", "\u2028"],
)
def test_invalid_specs_raise_user_error(text: str) -> None:
    with pytest.raises(XaiCompressError):
        parse_data_spec(text)


def test_missing_and_non_folder_paths(tmp_path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(XaiCompressError, match="does not exist") as e:
        load_dataset(f"idx:{missing}")
    assert str(missing) in str(e.value)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(XaiCompressError, match="not a folder"):
        load_dataset(f"cifar10:{a_file}")


def test_bad_image_size_argument() -> None:
    with pytest.raises(XaiCompressError):
        load_dataset("digits", image_size=0)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60) | st.from_regex(r"(idx|cifar10|folder|mnist5k|digits)[:?].*"))
def test_parse_any_text_returns_spec_or_user_error(text: str) -> None:
    try:
        result = parse_data_spec(text)
    except XaiCompressError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(result, DataSpec)
