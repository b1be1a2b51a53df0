"""`folder:DIR[?size=N]`: an image-folder dataset, read lazily with Pillow.

Layout: one sub-folder per class (searched recursively for image files)::

    DIR/cat/001.jpg  DIR/dog/xyz.png ...                 -> stratified 80/20 split, seed 0
    DIR/train/cat/... DIR/test/cat/...  (or DIR/val/...)  -> the given split

Files with other extensions and hidden files are skipped. Images are converted to RGB, or
to L when every (checked) image is grayscale (or to what the model's preprocessing asks),
and resized (square, bilinear) to N x N (the model's size, else ``?size=N``, else the
`image_size` argument, else 32), or, with the model's `resize`, shorter side resized and
centre-cropped like torchvision's `Resize` + `CenterCrop` on PIL images.

Nothing is decoded into memory up front: `ImageFolderDataset.__getitem__` opens one file.
At load time every file is checked with ``Image.verify`` (a seeded sample of 5,000 when
there are more), and the normalisation mean/std come from at most 1,000 seeded-sampled
training images. Class names are the sub-folder names, sorted.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from xaicompress.data.bundle import DatasetBundle, stats_from_sums
from xaicompress.data.preprocess import Preprocess
from xaicompress.errors import XaiCompressError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff",
                              ".webp", ".ppm", ".pgm", ".pbm"})
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
DEFAULT_SIZE = 32
VERIFY_ALL_UP_TO = 5000
STATS_SAMPLE = 1000
SAMPLE_SEED = 0  # fixed, not the user's seed: normalisation must not change between runs
#: more class folders than this is refused before any is scanned (a classifier with more
#: outputs is not what this tool compresses, and scanning 100k folders takes minutes)
MAX_CLASSES = 10_000


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # A huge image is not a user error here; decompression bombs are still refused.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise XaiCompressError(f"{path}: not a readable image ({e})") from e


def _resize_crop(img, size: int, resize: int | None):  # noqa: ANN001,ANN202 - PIL images
    """torchvision's PIL `Resize(resize)` + `CenterCrop(size)` (shorter side to `resize`,
    bilinear, then the centre `size` x `size`), or a plain resize to `size` x `size`."""
    from PIL import Image

    if resize is None:
        return img.resize((size, size), Image.Resampling.BILINEAR)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resize * long / short)
    new_w, new_h = (resize, new_long) if w <= h else (new_long, resize)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def load_image(path: Path, mode: str, size: int, resize: int | None = None) -> np.ndarray:
    """Decode one file to float32 (C, size, size) pixels in [0, 1] (shorter side resized to
    `resize` and centre-cropped when `resize` is given)."""
    img = _open_image(path)
    try:
        with img:
            img = _resize_crop(img.convert(mode), size, resize)
            arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    except XaiCompressError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated/corrupt files fail on decode
        raise XaiCompressError(f"{path}: cannot decode image ({e})") from e
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class ImageFolderDataset(Dataset):
    """Lazy dataset of (x float32 (C, size, size) normalised, y int64 scalar) items."""

    def __init__(self, files: list[Path], labels: list[int], mode: str, size: int,
                 mean: tuple[float, ...] = (0.0,), std: tuple[float, ...] = (1.0,),
                 resize: int | None = None) -> None:
        self.files = list(files)
        self.labels = list(labels)
        self.mode = mode
        self.size = size
        self.resize = resize
        self.set_normalisation(mean, std)

    def set_normalisation(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def pixels(self, i: int) -> np.ndarray:
        """Un-normalised (C, size, size) pixels in [0, 1] of item `i`."""
        return load_image(self.files[i], self.mode, self.size, self.resize)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = (self.pixels(i) - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.tensor(
            self.labels[i], dtype=torch.int64)


def _image_files(folder: Path) -> list[Path]:
    files = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).parts
        if any(part.startswith(".") for part in rel):
            continue  # hidden files and folders (.DS_Store, .ipynb_checkpoints)
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            files.append(p)
    return files


def _class_dirs(root: Path) -> list[Path]:
    dirs = []
    for p in root.iterdir():
        if p.is_dir() and not p.name.startswith("."):
            dirs.append(p)
            if len(dirs) > MAX_CLASSES:
                break  # enough to refuse; do not list the rest
    return sorted(dirs)


def _scan(root: Path, classes: list[str] | None = None) -> tuple[list[str], list[Path], list[int]]:
    """(class names, files, labels) of a one-folder-per-class tree; `classes` fixes the names."""
    dirs = _class_dirs(root)
    if not dirs:
        raise XaiCompressError(f"{root}: no class sub-folders; expected {root}/CLASS/IMAGE files")
    if len(dirs) > MAX_CLASSES:
        raise XaiCompressError(f"{root}: more than {MAX_CLASSES} class sub-folders; at most "
                               f"{MAX_CLASSES} classes are supported")
    names = [d.name for d in dirs]
    if classes is None:
        classes = names
    index = {c: i for i, c in enumerate(classes)}
    files: list[Path] = []
    labels: list[int] = []
    for d in dirs:
        if d.name not in index:
            raise XaiCompressError(f"{d}: class {d.name!r} is not one of the training classes")
        found = _image_files(d)
        if not found:
            raise XaiCompressError(
                f"{d}: class folder has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        files += found
        labels += [index[d.name]] * len(found)
    return classes, files, labels


def _split(root: Path, files: list[Path], labels: list[int], num_classes: int):
    """Stratified 80/20 split with random_state 0 (same as the embedded datasets)."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels, minlength=num_classes)
    n_test = math.ceil(0.2 * len(files))
    if counts.min() < 2 or n_test < num_classes or len(files) - n_test < num_classes:
        raise XaiCompressError(
            f"{root}: too few images for a stratified 80/20 split ({len(files)} images, "
            f"{num_classes} classes, smallest class {int(counts.min())}); add images or "
            f"provide {root}/train and {root}/test folders"
        )
    idx = np.arange(len(files))
    tr, te = train_test_split(idx, test_size=0.2, stratify=labels, random_state=0)
    return ([files[i] for i in tr], [labels[i] for i in tr],
            [files[i] for i in te], [labels[i] for i in te])


def _sample(n: int, k: int) -> np.ndarray:
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(SAMPLE_SEED).choice(n, size=k, replace=False))


def _verify(files: list[Path]) -> bool:
    """Image.verify every file (or a sample); True when all checked images are grayscale."""
    all_gray = True
    for i in _sample(len(files), VERIFY_ALL_UP_TO):
        path = files[int(i)]
        img = _open_image(path)
        try:
            with img:
                all_gray &= img.mode in GRAY_MODES
                img.verify()
        except XaiCompressError:
            raise
        except Exception as e:  # noqa: BLE001 - verify raises many types on corrupt data
            raise XaiCompressError(f"{path}: corrupt image ({e})") from e
    return all_gray


def load_folder(spec: str, root: Path, size: int | None = None,
                preprocess: Preprocess | None = None) -> DatasetBundle:
    """Lazy image-folder bundle; images (C, size, size), C = 3 (RGB) or 1 (all grayscale),
    or as the model's `preprocess` says (its channels, size, resize + centre crop and
    normalisation instead of the training images' statistics)."""
    pre = preprocess or Preprocess()
    size = pre.size or size or DEFAULT_SIZE
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if (root / "train").is_dir() != (test_dir is not None):
        have, lack = ("train", "test/ or val/") if test_dir is None else (test_dir.name, "train/")
        raise XaiCompressError(
            f"{root / have}: split folder without a matching {lack} folder next to it; give "
            f"both, or one folder per class with no split folders"
        )
    if test_dir is not None:
        classes, tr_files, tr_labels = _scan(root / "train")
        _, te_files, te_labels = _scan(test_dir, classes)
    else:
        classes, files, labels = _scan(root)
        tr_files, tr_labels, te_files, te_labels = _split(root, files, labels, len(classes))
    if len(classes) < 2:
        raise XaiCompressError(f"{root}: found 1 class folder, need at least 2 classes")

    gray = _verify(tr_files + te_files)
    # the model's channels when it has a normalisation (PIL converts RGB <-> L), else the
    # images' own
    mode = {1: "L", 3: "RGB"}.get(pre.channels or 0, "L" if gray else "RGB")
    train = ImageFolderDataset(tr_files, tr_labels, mode, size, resize=pre.resize)
    test = ImageFolderDataset(te_files, te_labels, mode, size, resize=pre.resize)
    channels = 1 if mode == "L" else 3
    bundle = DatasetBundle(spec=spec, train=train, test=test,
                           input_shape=(channels, size, size), num_classes=len(classes),
                           mean=(0.0,), std=(1.0,), classes=classes,
                           files=(*tr_files, *te_files), root=root)
    if pre.mean is not None:
        mean, std = tuple(pre.mean), tuple(pre.std or ())
    else:
        mean, std = _folder_stats(train, channels, size)
    train.set_normalisation(mean, std)
    test.set_normalisation(mean, std)
    bundle.mean, bundle.std = mean, std
    bundle.preprocess = pre.with_stats(mean, std, size)
    return bundle


def _folder_stats(train: ImageFolderDataset, channels: int, size: int
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of at most STATS_SAMPLE seeded-sampled training images."""
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    sample = _sample(len(train), STATS_SAMPLE)
    for i in sample:
        px = train.pixels(int(i)).astype(np.float64).reshape(channels, -1)
        total += px.sum(axis=1)
        total_sq += (px**2).sum(axis=1)
    return stats_from_sums(total, total_sq, len(sample) * size * size)
