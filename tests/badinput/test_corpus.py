"""The bad-input corpus: every row is one bad input run through the real CLI.

Each must give exit code 2, a one-line message naming the input and what was expected, no
traceback, and leave no output file created or changed. A new command adds rows, not code:
`args` is a template where {ckpt}, {out}, {dir} and {bad} are filled in per case.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.badinput import makers
from tests.badinput.case import Case


def _data(fn):
    return lambda good, d: fn(d)


TINY_STAGE = {"type": "prune_structured", "criterion": "l1", "ratio": 0.5}


def _config(**changes):
    """A YAML config file that is valid except for `changes` (None deletes a key)."""
    import yaml

    def make(good: Path, d: Path) -> Path:
        cfg = {"model": "lenet5", "data": "mnist5k", "train": {"epochs": 0.05},
               "stages": [dict(TINY_STAGE)]}
        for k, v in changes.items():
            cfg[k] = v
        p = d / "bad_config.yaml"
        p.write_text(yaml.safe_dump(cfg))
        return p

    return make


def _raw_config(text: str):
    def make(good: Path, d: Path) -> Path:
        p = d / "bad_config.yaml"
        p.write_text(text)
        return p

    return make


CKPT_MAKERS = {
    "truncated-ckpt": makers.truncated,
    "corrupt-header-ckpt": makers.corrupted_header,
    "empty-ckpt": makers.zero_bytes,
    "unknown-model-ckpt": makers.unknown_model,
    "wrong-shapes-ckpt": makers.wrong_shapes,
    "wrong-widths-ckpt": makers.wrong_widths,
    "nan-ckpt": makers.nan_weights,
    "inf-ckpt": makers.inf_weights,
    "foreign-safetensors": makers.no_metadata,
    "pickle-payload": makers.pickle_payload,
    "torch-save-payload": makers.torch_save_payload,
    "factory-payload": makers.factory_payload,
}

CASES: list[Case] = [
    # checkpoints handed to commands that read one
    *[Case(f"evaluate-{k}", ("evaluate", "{bad}", "--data", "mnist5k"), "{badname}", fn)
      for k, fn in CKPT_MAKERS.items()],
    # data
    Case("idx-bad-magic", ("train", "--data", "idx:{bad}", "--epochs", "0.01", "--out", "{out}"),
         "magic", _data(lambda d: makers.idx_dir(d, images_magic=0x802))),
    Case("idx-count-mismatch", ("train", "--data", "idx:{bad}", "--epochs", "0.01", "--out",
                                "{out}"), "idx", _data(lambda d: makers.idx_dir(d, n_labels=7))),
    Case("idx-truncated", ("train", "--data", "idx:{bad}", "--epochs", "0.01", "--out", "{out}"),
         "idx", _data(lambda d: makers.idx_dir(d, truncate=100))),
    Case("idx-missing-dir", ("train", "--data", "idx:{dir}/nowhere", "--out", "{out}"),
         "nowhere"),
    Case("cifar-py-wrong-type", ("train", "--data", "cifar10:{bad}", "--out", "{out}"),
         "cifar_list", _data(makers.cifar_py_wrong_type)),
    Case("cifar-py-payload", ("train", "--data", "cifar10:{bad}", "--out", "{out}"),
         "cifar_evil", _data(makers.cifar_py_payload)),
    Case("cifar-bin-record-size", ("train", "--data", "cifar10:{bad}", "--out", "{out}"),
         "cifar_bin", _data(makers.cifar_bin_bad_size)),
    Case("folder-empty", ("train", "--data", "folder:{bad}", "--out", "{out}"),
         "empty_images", _data(makers.empty_folder)),
    Case("folder-not-images", ("train", "--data", "folder:{bad}", "--out", "{out}"),
         "fake_images", _data(makers.not_images)),
    Case("unknown-data-kind", ("train", "--data", "imagenet21k", "--out", "{out}"),
         "imagenet21k"),
    Case("data-does-not-fit-model", ("evaluate", "{ckpt}", "--data", "digits"), "digits"),
    # models and options
    Case("model-not-importable", ("train", "--model", "no_such_pkg.models:build",
                                  "--out", "{out}"), "no_such_pkg"),
    Case("model-unknown", ("train", "--model", "lenet6", "--out", "{out}"), "lenet6"),
    Case("negative-epochs", ("train", "--epochs", "-2", "--out", "{out}"), "--epochs"),
    Case("bad-optimizer", ("train", "--optimizer", "rmsprop", "--epochs", "0.01",
                           "--out", "{out}"), "rmsprop"),
    # outputs
    Case("out-folder-missing", ("train", "--epochs", "0.01", "--out", "{dir}/no/such/m.st"),
         "does not exist"),
    Case("out-parent-is-file", ("train", "--epochs", "0.01", "--out", "{ckpt}/m.safetensors"),
         "does not exist"),
    Case("out-is-folder", ("train", "--epochs", "0.01", "--out", "{dir}"), "is a folder"),
    # the compression commands' options
    Case("explain-truncated-ckpt", ("explain", "{bad}", "--out", "{dir}/expl"),
         "{badname}", makers.truncated),
    Case("prune-ratio-above-1", ("prune", "{ckpt}", "--structured", "--ratio", "1.5",
                                 "--out", "{out}"), "--ratio"),
    Case("prune-ratio-negative", ("prune", "{ckpt}", "--unstructured", "--ratio", "-0.2",
                                  "--out", "{out}"), "--ratio"),
    Case("prune-unknown-criterion", ("prune", "{ckpt}", "--structured", "--ratio", "0.5",
                                     "--criterion", "shapley", "--out", "{out}"), "shapley"),
    Case("prune-pickle-ckpt", ("prune", "{bad}", "--structured", "--ratio", "0.5",
                               "--out", "{out}"), "{badname}", makers.pickle_payload),
    Case("prune-data-does-not-fit", ("prune", "{ckpt}", "--structured", "--ratio", "0.5",
                                     "--data", "digits", "--out", "{out}"), "digits"),
    Case("share-zero-clusters", ("share", "{ckpt}", "--clusters", "0", "--criterion", "none",
                                 "--out", "{out}"), "--clusters"),
    Case("share-negative-bits", ("share", "{ckpt}", "--avg-bits", "-1", "--criterion", "none",
                                 "--out", "{out}"), "--avg-bits"),
    Case("quantize-zero-bits", ("quantize", "{ckpt}", "--avg-bits", "0", "--criterion", "none",
                                "--out", "{out}"), "--avg-bits"),
    Case("quantize-budget-too-small", ("quantize", "{ckpt}", "--size-kb", "0.5",
                                       "--criterion", "none", "--out", "{out}"), "--size-kb"),
    Case("quantize-nan-ckpt", ("quantize", "{bad}", "--avg-bits", "4", "--out", "{out}"),
         "{badname}", makers.nan_weights),
    Case("export-unknown-format", ("export", "{ckpt}", "--format", "tflite",
                                   "--out", "{dir}/m.onnx"), "tflite"),
    Case("export-corrupt-ckpt", ("export", "{bad}", "--format", "onnx", "--out", "{dir}/m.onnx"),
         "{badname}", makers.corrupted_header),
    # pipeline configs
    Case("config-unknown-key", ("compress", "--config", "{bad}", "--out", "{dir}/run"),
         "colour", _config(colour="blue")),
    Case("config-wrong-type", ("compress", "--config", "{bad}", "--out", "{dir}/run"),
         "train", _config(train={"epochs": "many"})),
    Case("config-ratio-out-of-range", ("compress", "--config", "{bad}", "--out", "{dir}/run"),
         "ratio", _config(stages=[{**TINY_STAGE, "ratio": 1.0}])),
    Case("config-zero-bits", ("compress", "--config", "{bad}", "--out", "{dir}/run"),
         "avg_bits", _config(stages=[{"type": "quantize", "criterion": "none",
                                      "avg_bits": 0}])),
    Case("config-negative-clusters", ("compress", "--config", "{bad}", "--out", "{dir}/run"),
         "clusters", _config(stages=[{"type": "share", "criterion": "none",
                                      "clusters": -4}])),
    Case("config-budget-too-small", ("compress", "--config", "{bad}", "--out", "{dir}/run"),
         "size", _config(stages=[{"type": "quantize", "criterion": "none",
                                  "size_kb": 0.2}])),
    Case("config-not-yaml", ("compress", "--config", "{bad}", "--out", "{dir}/run"),
         "bad_config.yaml", _raw_config("model: [unclosed\n  - : :")),
    Case("config-not-a-mapping", ("compress", "--config", "{bad}", "--out", "{dir}/run"),
         "bad_config.yaml", _raw_config("- just\n- a list\n")),
    Case("config-model-not-importable", ("compress", "--config", "{bad}", "--out",
                                         "{dir}/run"), "nowhere_pkg",
         _config(model="nowhere_pkg.nets:build")),
    Case("config-missing-file", ("compress", "--config", "{dir}/nope.yaml", "--out",
                                 "{dir}/run"), "nope.yaml"),
    Case("compare-unknown-criterion", ("compare", "--config", "{bad}", "--criteria",
                                       "l1,oracle", "--seeds", "0", "--out", "{dir}/cmp"),
         "oracle", _config()),
    Case("compare-bad-seeds", ("compare", "--config", "{bad}", "--seeds", "zero",
                               "--out", "{dir}/cmp"), "--seeds", _config()),
]


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory) -> Path:
    from xaicompress.checkpoint import save_checkpoint
    from xaicompress.train import train_checkpoint

    d = tmp_path_factory.mktemp("good")
    ck = train_checkpoint("lenet5", "mnist5k", epochs=0.05, seed=0)
    return save_checkpoint(ck, d / "good.safetensors")


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, good_ckpt: Path, tmp_path: Path, run_cli) -> None:
    bad = case.make(good_ckpt, tmp_path) if case.make else tmp_path / "unused"
    out = tmp_path / "out.safetensors"
    fill = {"ckpt": str(good_ckpt), "out": str(out), "dir": str(tmp_path), "bad": str(bad)}
    args = [a.format(**fill) for a in case.args]
    before = _snapshot(tmp_path)
    ckpt_before = good_ckpt.read_bytes()

    code, stdout, err = run_cli(*args)

    assert code == 2, f"exit {code}, stderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "Traceback" not in stdout
    needle = case.needle.format(badname=Path(bad).name)
    assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    # nothing created or changed, and no payload ran
    assert _snapshot(tmp_path) == before
    assert good_ckpt.read_bytes() == ckpt_before
    assert not (tmp_path / makers.MARKER).exists()


def test_corpus_size():
    assert len(CASES) >= 25


def test_debug_flag_shows_traceback(tmp_path, good_ckpt, run_cli):
    with pytest.raises(Exception, match="does not exist"):
        run_cli("--debug", "evaluate", str(tmp_path / "missing.safetensors"))
