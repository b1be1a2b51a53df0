"""A restricted unpickler for the one pickle format we must read (CIFAR python batches).

`pickle.load` would run any callable a file names (``os.system`` ...). `SafeUnpickler`
resolves ONLY the globals needed to rebuild plain numpy arrays and py2-pickled bytes and
refuses everything else with `XaiCompressError`, before anything is called.
"""

from __future__ import annotations

import _codecs
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from xaicompress.errors import XaiCompressError

try:  # numpy >= 2 moved the private module; pickles name either spelling.
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _codecs.encode,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler whose `find_class` allows only `ALLOWED_GLOBALS`; `path` names the file."""

    def __init__(self, file: io.BufferedIOBase, path: Path | str) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise XaiCompressError(
                f"{self.path}: refused to unpickle global {module}.{name}; only numpy arrays "
                f"and bytes are allowed in a CIFAR python batch"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise XaiCompressError(f"{self.path}: refused persistent id in pickle")


def safe_load(path: Path) -> Any:
    """Unpickle `path` with `SafeUnpickler`; any failure becomes `XaiCompressError`."""
    try:
        # Read the bytes first: the file's real size bounds every length the pickle
        # claims (a BINBYTES8 opcode claiming 2^60 bytes then fails as truncated instead
        # of asking the file object for that much memory).
        raw = Path(path).read_bytes()
        return SafeUnpickler(io.BytesIO(raw), path).load()
    except XaiCompressError:
        raise
    except OSError as e:
        raise XaiCompressError(f"{path}: cannot read ({e.strerror or e})") from e
    except Exception as e:  # noqa: BLE001 - a corrupt pickle can raise almost anything
        raise XaiCompressError(
            f"{path}: not a valid CIFAR python pickle ({type(e).__name__}: {e})"
        ) from e
