"""`DatasetBundle` and the shared normalisation helpers.

All datasets hand out images already normalised per channel:
``x = (pixel01 - mean) / std`` where `mean`/`std` are computed on the TRAIN split in
[0, 1] pixel space, so a black image maps to ``-mean / std``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from xaicompress.data.preprocess import Preprocess
from xaicompress.errors import XaiCompressError

#: Datasets held in memory (embedded, idx, cifar) may take at most this many bytes as float32
#: tensors, checked before anything is allocated (a header or ?size=N cannot ask for more).
#: Raise it with XAICOMPRESS_MAX_DATA_GB; image folders are read lazily and need no cap.
DEFAULT_MAX_DATA_GB = 8.0


@dataclass
class DatasetBundle:
    """Train/test datasets plus what a model and a report need to know about them.

    Items of `train` / `test` / `val` are ``(x, y)``: `x` float32 (C, H, W) normalised, `y`
    int64 scalar.
    """

    spec: str
    train: Dataset
    test: Dataset
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]
    #: the files the data was read from (empty for embedded data) and the folder they are
    #: named relative to; `xaicompress.data.fingerprint` hashes them for the stage cache
    files: tuple[Path, ...] = field(default=(), repr=False)
    root: Path | None = field(default=None, repr=False)
    #: the complete preprocessing the items went through (normalisation, size, resize)
    preprocess: Preprocess | None = field(default=None, repr=False)
    #: the validation split carved from the training data (`data.holdout.carve_validation`;
    #: None until carved), on which every choice is made
    val: Dataset | None = field(default=None, repr=False)

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # view(-1, 1, 1) broadcasts over both (C, H, W) and (N, C, H, W).
        dtype = x.dtype if x.is_floating_point() else torch.float32
        mean = torch.tensor(self.mean, dtype=dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=x.device).view(-1, 1, 1)
        return mean, std

    def pixel_to_input(self, x01: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] pixels (N, C, H, W) or (C, H, W) to normalised model input space."""
        mean, std = self._stats(x01)
        return (x01 - mean) / std

    def input_to_pixel(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `pixel_to_input`: normalised input (N, C, H, W) back to [0, 1] pixels."""
        mean, std = self._stats(x)
        return x * std + mean


def channel_stats(x01: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of (N, C, H, W) pixels in [0, 1].

    Accumulated in float64 so the result does not depend on summation order noise. A
    constant channel gets std 1.0 so normalising it never divides by zero.
    """
    x = x01.transpose(0, 1).reshape(x01.shape[1], -1).double()
    mean = x.mean(dim=1)
    std = x.std(dim=1, unbiased=False)
    return _finish_stats(mean.tolist(), std.tolist())


def _finish_stats(
    mean: Sequence[float], std: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    std = [s if s > 1e-8 else 1.0 for s in std]
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def stats_from_sums(
    total: np.ndarray, total_sq: np.ndarray, count: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std from running per-channel sums (used by the lazy folder dataset)."""
    mean = total / count
    var = np.maximum(total_sq / count - mean**2, 0.0)
    return _finish_stats(mean.tolist(), np.sqrt(var).tolist())


def resize_pixels(x01: torch.Tensor, size: int | None) -> torch.Tensor:
    """Resize (N, C, H, W) pixels to (N, C, size, size); no-op when `size` is None or equal."""
    if size is None or tuple(x01.shape[-2:]) == (size, size):
        return x01
    out = F.interpolate(x01, size=(size, size), mode="bilinear", align_corners=False,
                        antialias=True)
    return out.clamp_(0.0, 1.0)


def max_data_bytes() -> int:
    """The in-memory cap in bytes (`DEFAULT_MAX_DATA_GB`, or XAICOMPRESS_MAX_DATA_GB)."""
    raw = os.environ.get("XAICOMPRESS_MAX_DATA_GB")
    try:
        gb = float(raw) if raw else DEFAULT_MAX_DATA_GB
    except ValueError:
        gb = float("nan")
    if not (gb > 0 and np.isfinite(gb)):
        raise XaiCompressError(f"environment variable XAICOMPRESS_MAX_DATA_GB={raw!r}: "
                               "expected a positive number of GiB")
    return int(gb * 2**30)


def check_fits_memory(spec: str, count: int, shape: Sequence[int], what: str = "images") -> None:
    """Refuse, before allocating, `count` float32 items of `shape` above `max_data_bytes()`."""
    need = int(count) * int(np.prod([int(v) for v in shape], dtype=np.float64)) * 4
    cap = max_data_bytes()
    if need > cap:
        dims = "x".join(str(int(v)) for v in shape)
        raise XaiCompressError(
            f"{spec}: {count} {what} of {dims} take {need / 2**30:.1f} GiB as float32, more "
            f"than the {cap / 2**30:.1f} GiB allowed for data held in memory; use a smaller "
            "?size=N, a folder:DIR dataset (read lazily), or raise XAICOMPRESS_MAX_DATA_GB")


def model_channels(spec: str, channels: int, preprocess: Preprocess | None) -> int:
    """The channels the model takes: the normalisation's (gray data replicated to 3 when it
    has 3), else the data's."""
    want = None if preprocess is None else preprocess.channels
    if want is None or want == channels:
        return channels
    if channels == 1 and want == 3:
        return 3
    raise XaiCompressError(f"{spec}: the images have {channels} channel(s), the model's "
                           f"normalisation has {want}")


def _to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    return x if x.shape[1] == channels else x.repeat(1, channels, 1, 1)


def _own_float(x: torch.Tensor) -> torch.Tensor:
    # Normalisation below works in place: never on the caller's float32 tensor.
    y = x.float()
    return y.clone() if y is x else y


def tensor_bundle(
    spec: str,
    x_train01: torch.Tensor,
    y_train: torch.Tensor,
    x_test01: torch.Tensor,
    y_test: torch.Tensor,
    *,
    num_classes: int,
    classes: list[str],
    image_size: int | None = None,
    files: Sequence[Path] = (),
    root: Path | None = None,
    preprocess: Preprocess | None = None,
) -> DatasetBundle:
    """Build an in-memory bundle from float (N, C, H, W) pixels in [0, 1] and int labels.

    Resizes (if asked), computes the train statistics and stores normalised float32
    `TensorDataset`s, labels as int64. `files` / `root`: where the data came from (see
    `DatasetBundle.files`). Refuses, before resizing, a result above `max_data_bytes()`.
    preprocess: the model's (`data/preprocess.py`): its normalisation instead of the train
    statistics, gray images replicated to 3 channels when it has 3.
    """
    c, h, w = x_train01.shape[1:]
    if preprocess is not None and preprocess.size is not None:
        image_size = preprocess.size
    if preprocess is not None and preprocess.resize is not None:
        raise XaiCompressError(f"{spec}: resize (shorter side + centre crop) applies to "
                               "folder: data only; use size")
    out_c = model_channels(spec, int(c), preprocess)
    side = (image_size, image_size) if image_size is not None else (h, w)
    check_fits_memory(spec, len(x_train01) + len(x_test01), (out_c, *side))
    x_train01 = _to_channels(resize_pixels(_own_float(x_train01), image_size), out_c)
    x_test01 = _to_channels(resize_pixels(_own_float(x_test01), image_size), out_c)
    if preprocess is not None and preprocess.mean is not None:
        mean, std = tuple(preprocess.mean), tuple(preprocess.std or ())
    else:
        mean, std = channel_stats(x_train01)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    # In place on the (fresh) float copies to keep peak memory at one copy per split.
    x_train = x_train01.sub_(m).div_(s).contiguous()
    x_test = x_test01.sub_(m).div_(s).contiguous()
    c, h, w = x_train.shape[1:]
    return DatasetBundle(
        spec=spec,
        train=TensorDataset(x_train, y_train.long()),
        test=TensorDataset(x_test, y_test.long()),
        input_shape=(int(c), int(h), int(w)),
        num_classes=int(num_classes),
        mean=mean,
        std=std,
        classes=list(classes),
        files=tuple(files),
        root=root,
        preprocess=(preprocess or Preprocess()).with_stats(mean, std, int(h)),
    )
