"""Image folders written with Pillow to tmp_path: splits, modes, sizes, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xaicompress.data import dataset_tensors, load_dataset
from xaicompress.data.folder import ImageFolderDataset
from xaicompress.errors import XaiCompressError


def make_images(root: Path, classes: dict[str, int], mode: str = "RGB", size: int = 20,
                ext: str = ".png", seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shape = (size, size + 3) if mode == "L" else (size, size + 3, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                root / name / f"img{i}{ext}")


def test_folder_stratified_split_rgb(tmp_path: Path) -> None:
    make_images(tmp_path, {"cat": 10, "dog": 10, "eel": 5})
    (tmp_path / "cat" / "notes.txt").write_text("not an image, skipped")
    (tmp_path / "dog" / ".hidden.png").write_bytes(b"skipped too")
    b = load_dataset(f"folder:{tmp_path}")
    assert b.classes == ["cat", "dog", "eel"] and b.num_classes == 3
    assert b.input_shape == (3, 32, 32)
    assert (len(b.train), len(b.test)) == (20, 5)
    assert isinstance(b.train, ImageFolderDataset)
    test_labels = sorted(b.test.labels)
    assert test_labels == [0, 0, 1, 1, 2]  # stratified: 2 cat, 2 dog, 1 eel
    x, y = b.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    xs, _ = dataset_tensors(b.train)
    # Stats come from all 20 train images (< 1,000), so the train mean is ~0 per channel.
    assert xs.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    # Same split every call.
    assert load_dataset(f"folder:{tmp_path}").test.files == b.test.files


def test_folder_train_test_dirs_grayscale_and_size(tmp_path: Path) -> None:
    make_images(tmp_path / "train", {"a": 4, "b": 4}, mode="L", ext=".jpg")
    make_images(tmp_path / "val", {"a": 2, "b": 1}, mode="L", ext=".bmp", seed=1)
    b = load_dataset(f"folder:{tmp_path}?size=16")
    assert b.input_shape == (1, 16, 16) and len(b.mean) == 1
    assert (len(b.train), len(b.test)) == (8, 3)
    assert b.test.labels == [0, 0, 1]
    assert load_dataset(f"folder:{tmp_path}", image_size=12).input_shape == (1, 12, 12)


def test_folder_mixed_modes_become_rgb(tmp_path: Path) -> None:
    make_images(tmp_path, {"a": 5}, mode="L")
    make_images(tmp_path, {"b": 5}, mode="RGB")
    assert load_dataset(f"folder:{tmp_path}").input_shape == (3, 32, 32)


def _expect(spec: str, path: Path, *words: str) -> None:
    with pytest.raises(XaiCompressError) as e:
        load_dataset(spec)
    assert str(path) in str(e.value), str(e.value)
    for w in words:
        assert w in str(e.value)


def test_folder_empty(tmp_path: Path) -> None:
    _expect(f"folder:{tmp_path}", tmp_path, "no class sub-folders")


def test_folder_class_without_images(tmp_path: Path) -> None:
    make_images(tmp_path, {"a": 5})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("x")
    _expect(f"folder:{tmp_path}", tmp_path / "b", "no image files")


def test_folder_single_class(tmp_path: Path) -> None:
    make_images(tmp_path / "train", {"a": 3})
    make_images(tmp_path / "test", {"a": 3})
    _expect(f"folder:{tmp_path}", tmp_path, "at least 2 classes")


def test_folder_png_that_is_not_an_image(tmp_path: Path) -> None:
    make_images(tmp_path, {"a": 5, "b": 5})
    bad = tmp_path / "b" / "broken.png"
    bad.write_bytes(b"this is text, not a PNG")
    _expect(f"folder:{tmp_path}", bad, "not a readable image")


def test_folder_truncated_png(tmp_path: Path) -> None:
    make_images(tmp_path, {"a": 5, "b": 5})
    bad = tmp_path / "a" / "img0.png"
    bad.write_bytes(bad.read_bytes()[:60])
    _expect(f"folder:{tmp_path}", bad)


def test_folder_too_small_for_split(tmp_path: Path) -> None:
    make_images(tmp_path, {"a": 1, "b": 5})
    _expect(f"folder:{tmp_path}", tmp_path, "stratified")


def test_folder_test_class_unknown(tmp_path: Path) -> None:
    make_images(tmp_path / "train", {"a": 2, "b": 2})
    make_images(tmp_path / "test", {"a": 1, "zebra": 1})
    _expect(f"folder:{tmp_path}", tmp_path / "test" / "zebra", "not one of the training")


def test_folder_lazy_error_names_file(tmp_path: Path) -> None:
    make_images(tmp_path, {"a": 5, "b": 5})
    b = load_dataset(f"folder:{tmp_path}")
    path = b.train.files[0]
    path.write_bytes(b"gone bad after loading")
    with pytest.raises(XaiCompressError, match="not a readable image") as e:
        b.train[0]
    assert str(path) in str(e.value)


def test_folder_train_without_test(tmp_path: Path) -> None:
    make_images(tmp_path / "train", {"a": 3, "b": 3})
    _expect(f"folder:{tmp_path}", tmp_path / "train", "without a matching")
