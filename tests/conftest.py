import os

import pytest
import torch

os.environ.setdefault("XAICOMPRESS_NO_PROGRESS", "1")
# Two cores on CI: keep intra-op threads predictable and results reproducible.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def run_cli(capsys):
    """Run the real CLI in-process; returns (exit_code, stdout, stderr)."""
    from xaicompress.cli import main

    def _run(*args: str):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return _run


# Datasets shared by the test modules. Module scope: each module gets its own bundle, so a
# module that subsets or wraps it cannot change what another module sees.
@pytest.fixture(scope="module")
def mnist():
    """The embedded 5,000 real MNIST digits (seed 0 split)."""
    from xaicompress.data import load_dataset

    return load_dataset("mnist5k", seed=0)


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 8x8 digits (seed 0 split)."""
    from xaicompress.data import load_dataset

    return load_dataset("digits", seed=0)
