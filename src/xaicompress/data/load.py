"""`load_dataset`: turn a data spec string into a `DatasetBundle`."""

from __future__ import annotations

import os
from pathlib import Path

from xaicompress.data.bundle import DatasetBundle
from xaicompress.data.preprocess import Preprocess
from xaicompress.data.spec import MAX_IMAGE_SIZE, parse_data_spec
from xaicompress.errors import XaiCompressError


def _folder(spec: str, path: str) -> Path:
    root = Path(os.path.expanduser(path))
    if not root.exists():
        raise XaiCompressError(f"{spec}: {root}: folder does not exist")
    if not root.is_dir():
        raise XaiCompressError(f"{spec}: {root}: is not a folder")
    return root


def load_dataset(spec: str, *, seed: int = 0, image_size: int | None = None,
                 preprocess: Preprocess | None = None) -> DatasetBundle:
    """Load the dataset named by `spec` (see `xaicompress.data.spec`).

    `image_size` resizes images to (image_size, image_size); a ``?size=N`` option in the
    spec wins over it. `preprocess` is the model's (`data/preprocess.py`): its size (a
    different ``?size=N`` is an error), channels, resize + centre crop (folders) and
    normalisation (instead of the data's statistics); `bundle.preprocess` is the complete
    preprocessing applied. `seed` is accepted for interface stability but deliberately unused:
    splits and normalisation statistics always use seed 0, so every run and every stage
    sees the same data and the same normalisation whatever the training seed.
    """
    del seed  # see docstring
    parsed = parse_data_spec(spec)
    if image_size is not None and (
        not isinstance(image_size, int) or not 1 <= image_size <= MAX_IMAGE_SIZE
    ):
        raise XaiCompressError(f"image size {image_size!r}: expected 1..{MAX_IMAGE_SIZE}")
    size = parsed.options.get("size", image_size)
    if preprocess is not None and preprocess.size is not None:
        if "size" in parsed.options and parsed.options["size"] != preprocess.size:
            raise XaiCompressError(f"--data {spec!r}: size={parsed.options['size']}, but the "
                                   f"model takes {preprocess.size} x {preprocess.size} images")
        size = preprocess.size
    split = parsed.options.get("split", 0)
    if split and parsed.kind not in ("mnist5k", "digits"):
        raise XaiCompressError(f"--data {spec!r}: option split=N applies to the embedded "
                               "datasets only (a folder's own train/test split is kept)")
    try:
        if parsed.kind == "mnist5k":
            from xaicompress.data.embedded import load_mnist5k

            return load_mnist5k(spec, size, split, preprocess)
        if parsed.kind == "digits":
            from xaicompress.data.embedded import load_digits

            return load_digits(spec, size, split, preprocess)
        root = _folder(spec, parsed.path or "")
        if parsed.kind == "idx":
            from xaicompress.data.idx import load_idx

            return load_idx(spec, root, size, preprocess)
        if parsed.kind in ("cifar10", "cifar100"):
            from xaicompress.data.cifar import load_cifar

            return load_cifar(spec, parsed.kind, root, size, preprocess)
        from xaicompress.data.folder import load_folder

        return load_folder(spec, root, size, preprocess)
    except XaiCompressError as e:
        msg = str(e)
        if msg.startswith(f"{spec}: "):
            raise
        raise XaiCompressError(f"{spec}: {msg}") from e
    except OSError as e:  # permissions, races, I/O errors: still a one-line user error
        where = f"{e.filename}: " if e.filename else ""
        raise XaiCompressError(f"{spec}: {where}{e.strerror or e}") from e
