"""Bad model files through the real CLI (`cases_files.CASES`), with the corpus's checks:
exit code 2, one line naming the input, no traceback, no file created, changed or deleted,
and the marker file that a payload would create never created.

Self-contained (its own good checkpoint and snapshot); `test_corpus.py` runs the other
tables.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import torch

from tests.badinput import makers_files as mf
from tests.badinput.case import Case
from tests.badinput.cases_files import CASES

#: files larger than this (the 10 GiB sparse one) are compared by size and mtime only
_HASH_LIMIT = 64 << 20


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory) -> Path:
    from xaicompress.checkpoint import save_checkpoint
    from xaicompress.train import train_checkpoint

    d = tmp_path_factory.mktemp("good")
    ck = train_checkpoint("lenet5", "mnist5k", epochs=0.05, seed=0)
    return save_checkpoint(ck, d / "good.safetensors")


def _snapshot(root: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if p.is_dir():
            out[str(p.relative_to(root))] = ("dir",)
        elif st.st_size > _HASH_LIMIT:
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
        else:
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(),)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_file(case: Case, good_ckpt: Path, tmp_path: Path, run_cli) -> None:
    bad = case.make(good_ckpt, tmp_path) if case.make else tmp_path / "unused"
    out = tmp_path / "out.safetensors"
    fill = {"ckpt": str(good_ckpt), "out": str(out), "dir": str(tmp_path), "bad": str(bad)}
    args = [a.format(**fill) for a in case.args]
    before = _snapshot(tmp_path)
    ckpt_before = good_ckpt.read_bytes()

    t0 = time.perf_counter()
    code, stdout, err = run_cli(*args)
    seconds = time.perf_counter() - t0

    assert code == 2, f"exit {code}, stderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "Traceback" not in stdout
    needle = case.needle.format(badname=Path(bad).name)
    assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert _snapshot(tmp_path) == before
    assert good_ckpt.read_bytes() == ckpt_before
    assert not (tmp_path / mf.MARKER).exists()
    if case.make is not None:
        # a bad file is refused before any real work (the command's own start-up included)
        assert seconds < 20, f"{case.id} took {seconds:.1f} s"


def test_table_size():
    assert len(CASES) >= 40


@pytest.mark.parametrize("factory", mf.PAYLOADS)
def test_payloads_would_really_run(factory, tmp_path):
    """The payload cases can fail: called on purpose, each factory does create the marker
    (or delete the victim folder)."""
    from xaicompress.errors import XaiCompressError
    from xaicompress.models.registry import create_model

    mf.victim(tmp_path)
    with pytest.raises(XaiCompressError):  # it runs, then is not a model
        create_model(factory, (1, 28, 28), 10, **mf.marker_kwargs(tmp_path, factory))
    if factory == "shutil:rmtree":
        assert not (tmp_path / "victim").exists()
    else:
        assert (tmp_path / mf.MARKER).exists()


def test_cache_entry_naming_a_factory_is_not_run(good_ckpt, tmp_path):
    """A tampered (re-signed) OUT/cache entry naming os:system is treated as missing."""
    from xaicompress.pipeline.cache import StageCache

    cache = StageCache(tmp_path / "cache", model="lenet5")
    key, label = "k" * 64, "00-baseline"
    entry = cache.path(key, label)
    entry.parent.mkdir()
    bad = mf.payload_checkpoint("os:system")(good_ckpt, tmp_path)
    os.replace(bad, entry)
    assert cache.load(key, label) is None
    assert not (tmp_path / mf.MARKER).exists()


@pytest.mark.parametrize("size, match", [(10 << 30, "more than the 4294967296-byte cap"),
                                         (1 << 30, "the file holds")])
def test_padded_sparse_file_is_refused_unread(good_ckpt, tmp_path, size, match):
    """The size and the header are checked first: the padding is never read."""
    from xaicompress.checkpoint import load_checkpoint
    from xaicompress.errors import XaiCompressError

    p = mf.sparse_padded(size)(good_ckpt, tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(XaiCompressError, match=match):
        load_checkpoint(p)
    assert time.perf_counter() - t0 < 1


def test_loaded_bf16_and_float64_weights_are_converted_explicitly(good_ckpt, tmp_path):
    """Float tensors of another precision load, converted to the model's dtype."""
    from xaicompress.checkpoint import load_checkpoint

    def to(dtype):
        def fn(t):
            t["fc1.weight"] = t["fc1.weight"].to(dtype)
        return fn

    ref = load_checkpoint(good_ckpt).model.state_dict()["fc1.weight"]
    for dtype in (torch.bfloat16, torch.float64, torch.float16):
        p = mf.edit_checkpoint(good_ckpt, tmp_path, f"{dtype}.safetensors".replace("torch.", ""),
                               tensors_fn=to(dtype))
        w = load_checkpoint(p).model.state_dict()["fc1.weight"]
        assert w.dtype == torch.float32
        assert torch.equal(w, ref.to(dtype).float())


@pytest.mark.slow
def test_compress_rerun_with_a_tampered_cache_entry(tmp_path, run_cli):
    """`compress` reruns over a cache whose baseline entry was replaced by a re-signed
    checkpoint naming os:system (its pipeline key kept, so only the trust rule stops it):
    the entry is not run but recomputed, and the run succeeds."""
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": "lenet5", "data": "mnist5k", "train": {"epochs": 0.05},
        "stages": [{"type": "prune_structured", "criterion": "l1", "ratio": 0.5,
                    "finetune_epochs": 0}],
        "export": {"onnx": False}, "report": {"fidelity_samples": 8, "heatmaps": 0,
                                             "latency_repeats": 1}}))
    out = tmp_path / "run"
    code, _, err = run_cli("compress", "--config", cfg, "--out", out)
    assert code == 0, err
    entry = next((out / "cache").glob("00-baseline-*.safetensors"))

    def meta_fn(m):
        m["model"]["name"] = "os:system"
        m["model"]["kwargs"] = mf.marker_kwargs(tmp_path, "os:system")
    bad = mf.edit_checkpoint(entry, tmp_path, "tampered.safetensors", meta_fn=meta_fn)
    os.replace(bad, entry)
    code, stdout, err = run_cli("compress", "--config", cfg, "--out", out)
    assert code == 0, err
    assert not (tmp_path / mf.MARKER).exists()
    assert mf.checkpoint_parts(entry)[1]["model"]["name"] == "lenet5"  # recomputed
