"""The Python API: every step on plain PyTorch objects, as Torch-Pruning and Captum users expect.

    import xaicompress as xc

    small = xc.prune_structured(model, train_set, ratio=0.5, criterion="deeplift")
    sparse = xc.prune_unstructured(small, train_set, ratio=0.8, layers="all")
    shared = xc.share(sparse, train_set, clusters=16)
    result = xc.compress(model, train=train_set, test=test_set, config={"stages": [...]})
    result.model, result.report; result.save("out/")

A step takes an `nn.Module` and a torch `Dataset` or `DataLoader` of `(x, y)` items (x
float (C, H, W) as the model takes it, y an integer class) and returns a new `nn.Module`
(the input is never modified): the same classes, physically smaller after structured
pruning, with its weights masked / shared / quantized and its activation quantizers
installed (forward hooks) otherwise, so it predicts as the compressed model does. Its
options are the stage's options of `compress` configs and of the CLI (one declaration in
`pipeline/config.py`; a bad value is one `XaiCompressError` line naming it).

What a step recorded (masks, codebooks, bit widths, history) travels with the returned
module (`compression_of(module)`), so steps chain, and `save(module, path)` writes it as a
checkpoint or packed file that `load(path, model=YourNet())` reloads exactly (a copy of
your own module, resized to the file's layer widths, is the architecture).

normalise=(mean, std): the per-channel normalisation your inputs went through, in [0, 1]
pixel units. DeepLIFT's default reference is the black image, -mean / std in input space,
and it is recorded in saved files and ONNX metadata. Not given: inputs are taken as they
are and the reference is the all-zero input.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from xaicompress.checkpoint import Checkpoint, ModelSpec
from xaicompress.data.bundle import DatasetBundle, check_fits_memory
from xaicompress.data.preprocess import Preprocess
from xaicompress.encoding import CompressionState
from xaicompress.errors import XaiCompressError

__all__ = ["CompressResult", "compress", "compression_of", "explain", "finetune", "load",
           "prune_structured", "prune_unstructured", "quantize", "save", "share"]

DATA_NAME = "python"  # the data's name in reports: the objects the caller gave
_ATTR = "_xaicompress"


@dataclass
class Compression:
    """What the xaicompress steps recorded about a module (kept on it as `_xaicompress`)."""

    spec: ModelSpec
    state: CompressionState = field(default_factory=CompressionState)
    history: list[dict[str, Any]] = field(default_factory=list)


def compression_of(model: nn.Module) -> Compression | None:
    """The compression the xaicompress steps recorded on `model`, None for a plain module."""
    rec = model.__dict__.get(_ATTR)
    return rec if isinstance(rec, Compression) else None


# ------------------------------------------------------------------------ data
def _as_dataset(data: Any, what: str) -> Dataset:
    """A map-style Dataset of (x, y): a DataLoader's own dataset, an iterable one read
    into memory (size checked), a Dataset as it is."""
    if isinstance(data, DataLoader):
        if not isinstance(data.dataset, IterableDataset):
            return data.dataset
        xs, ys, count = [], [], 0
        for x, y in data:
            count += len(x)
            check_fits_memory(what, count, tuple(x.shape[1:]))
            xs.append(torch.as_tensor(x).float())
            ys.append(torch.as_tensor(y).long())
        if not xs:
            raise XaiCompressError(f"{what}: the DataLoader yields no batches")
        return TensorDataset(torch.cat(xs), torch.cat(ys))
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        return data
    raise XaiCompressError(f"{what}: expected a torch Dataset of (x, y) items or a DataLoader "
                           f"of (x, y) batches, got {type(data).__name__}")


def _first_item(ds: Dataset, what: str) -> tuple[torch.Tensor, int]:
    try:
        n = len(ds)  # type: ignore[arg-type]
        item = ds[0] if n else None
    except (TypeError, IndexError, KeyError) as exc:
        raise XaiCompressError(f"{what}: cannot read item 0 ({type(exc).__name__}: {exc})"
                               ) from None
    if item is None:
        raise XaiCompressError(f"{what}: the dataset is empty")
    if not (isinstance(item, (tuple, list)) and len(item) >= 2
            and isinstance(item[0], torch.Tensor) and item[0].dim() == 3
            and item[0].is_floating_point()):
        raise XaiCompressError(f"{what}: items must be (x, y) with x a float tensor (C, H, W), "
                               f"got {type(item).__name__}")
    return item[0], int(item[1])


def _classes(model: nn.Module, x: torch.Tensor, what: str) -> int:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[None].float())
    except Exception as exc:  # the user's module on their own item
        raise XaiCompressError(f"{what}: the model cannot run on an item of shape "
                               f"{tuple(x.shape)} ({type(exc).__name__}: {exc})") from None
    finally:
        model.train(was)
    if not (isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == 1):
        raise XaiCompressError(f"{what}: the model must return logits (N, classes), got "
                               f"{getattr(out, 'shape', type(out).__name__)}")
    return int(out.shape[1])


def as_bundle(model: nn.Module, train: Any, test: Any = None, *,
              normalise: tuple[Any, Any] | None = None,
              classes: list[str] | None = None) -> DatasetBundle:
    """The data as the steps take it: `train` (and `test`, default: `train`) as Datasets,
    shapes and the class count read from the first item and the model's output."""
    tr = _as_dataset(train, "data")
    te = _as_dataset(test, "test") if test is not None else tr
    x, _ = _first_item(tr, "data")
    c, h, w = (int(v) for v in x.shape)
    k = _classes(model, x, "data")
    pre = None
    if normalise is not None:
        mean, std = (tuple(float(v) for v in t) for t in normalise)
        if len(mean) == 1 and c > 1:
            mean, std = mean * c, std * c
        pre = Preprocess(mean, std, size=h if h == w else None)
        pre.check("normalise")
        if len(mean) != c:
            raise XaiCompressError(f"normalise: {len(mean)} channel(s), the items have {c}")
    mean, std = (pre.mean, pre.std) if pre is not None else ((0.0,) * c, (1.0,) * c)
    return DatasetBundle(spec=DATA_NAME, train=tr, test=te, input_shape=(c, h, w),
                         num_classes=k, mean=tuple(mean), std=tuple(std or ()),
                         classes=classes or [str(i) for i in range(k)], preprocess=pre)


# ------------------------------------------------------------------ modules
def _model_name(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"[:200]


def to_checkpoint(model: nn.Module, bundle: DatasetBundle) -> Checkpoint:
    """`model` (a copy) as a Checkpoint for the library's steps, its recorded compression
    (from earlier steps) included."""
    if not isinstance(model, nn.Module):
        raise XaiCompressError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    rec = compression_of(model)
    net = copy.deepcopy(model)
    net.__dict__.pop(_ATTR, None)
    net.eval()
    if rec is not None:
        spec = rec.spec
        if tuple(spec.input_shape) != tuple(bundle.input_shape):
            raise XaiCompressError(f"data: items {bundle.input_shape}, the model was compressed "
                                   f"for {tuple(spec.input_shape)}")
        if bundle.preprocess is None and spec.preprocess is not None:
            bundle.mean, bundle.std = spec.preprocess.mean or (), spec.preprocess.std or ()
            bundle.preprocess = spec.preprocess
        return Checkpoint(net, spec, None, rec.state.copy(), copy.deepcopy(rec.history))
    template = copy.deepcopy(net)
    spec = ModelSpec(_model_name(model), tuple(bundle.input_shape), bundle.num_classes, {},
                     bundle.preprocess, template=template)
    return Checkpoint(net, spec, None)


def to_module(ckpt: Checkpoint) -> nn.Module:
    """The checkpoint's model, carrying what was recorded (`compression_of`)."""
    net = ckpt.model
    net.eval()
    net.__dict__[_ATTR] = Compression(ckpt.spec, ckpt.state, ckpt.history)
    return net


def _stage(stage_type: str, options: dict[str, Any]) -> Any:
    from xaicompress.pipeline.config import validate_config

    source = f"xc.{stage_type}"
    try:
        cfg = validate_config({"stages": [{"type": stage_type, **options}]}, source,
                              in_memory=True)
    except XaiCompressError as exc:
        raise XaiCompressError(str(exc).replace("stages[0].", "")) from None
    return cfg.stages[0]


def _run(stage_type: str, model: nn.Module, data: Any, normalise: Any, seed: int,
         options: dict[str, Any]) -> nn.Module:
    from xaicompress.pipeline.stages import run_stage

    stage = _stage(stage_type, options)
    bundle = as_bundle(model, data, normalise=normalise)
    return to_module(run_stage(to_checkpoint(model, bundle), bundle, stage, seed))


def prune_structured(model: nn.Module, data: Any, *, normalise: Any = None, seed: int = 0,
                     **options: Any) -> nn.Module:
    """Remove channels (filters / neurons) ranked by relevance; the returned module is
    physically smaller. options: ratio (0.5), criterion ("deeplift"), scope, steps,
    finetune_epochs, macs_ratio, min_channels, ... (`xaicompress prune --help`)."""
    return _run("prune_structured", model, data, normalise, seed, options)


def prune_unstructured(model: nn.Module, data: Any, *, normalise: Any = None, seed: int = 0,
                       **options: Any) -> nn.Module:
    """Zero single weights ranked by per-weight relevance (masks held through later steps).
    options: ratio, criterion, layers ("fc", "conv", "all"), scope, finetune_epochs, ..."""
    return _run("prune_unstructured", model, data, normalise, seed, options)


def share(model: nn.Module, data: Any, *, normalise: Any = None, seed: int = 0,
          **options: Any) -> nn.Module:
    """Relevance-weighted k-means weight sharing. options: clusters or avg_bits, criterion,
    finetune_epochs, codebook, ... (`xaicompress share --help`)."""
    return _run("share", model, data, normalise, seed, options)


def quantize(model: nn.Module, data: Any, *, normalise: Any = None, seed: int = 0,
             **options: Any) -> nn.Module:
    """Mixed-precision integer quantization under a budget. options: avg_bits or size_kb,
    criterion, allocation, act_bits, qat_epochs, ... (`xaicompress quantize --help`)."""
    return _run("quantize", model, data, normalise, seed, options)


def finetune(model: nn.Module, data: Any, *, normalise: Any = None, seed: int = 0,
             **options: Any) -> nn.Module:
    """Fine-tune keeping the recorded compression (masks, codebooks, quantization grids).
    options: epochs, lr, batch_size."""
    return _run("finetune", model, data, normalise, seed, options)


def explain(model: nn.Module, data: Any, *, criterion: str = "deeplift", samples: int = 512,
            normalise: Any = None, seed: int = 0) -> Any:
    """Relevance of every Conv2d / Linear layer of `model` on `samples` items of `data`:
    a `relevance.Relevance` with `.units` (layer -> (out_units,) scores) and `.weights`
    (layer -> weight-shaped scores); `model` is not changed (an explanation, not a model).
    """
    from xaicompress.relevance import compute_relevance, get_criterion

    bundle = as_bundle(model, data, normalise=normalise)
    ckpt = to_checkpoint(model, bundle)
    return compute_relevance(ckpt.model, get_criterion(criterion), bundle, samples=samples,
                             seed=seed)


# ------------------------------------------------------------------ files
def save(model: nn.Module, path: str | os.PathLike[str], *, data: Any = None) -> Path:
    """Write a module returned by a step (or any module, given `data` for its shapes) as
    a checkpoint (`.safetensors`) or a packed file (`.xcpk`), verified to reload exactly."""
    from xaicompress.checkpoint import save_checkpoint
    from xaicompress.export.packed import write_packed

    rec = compression_of(model)
    if rec is None:
        if data is None:
            raise XaiCompressError("save: a plain module needs data= (for its input shape)")
        ckpt = to_checkpoint(model, as_bundle(model, data))
    else:
        ckpt = to_checkpoint(model, _shape_only(rec.spec))
    if str(path).endswith(".xcpk"):
        return write_packed(ckpt, path)
    return save_checkpoint(ckpt, path)


def _shape_only(spec: ModelSpec) -> DatasetBundle:
    c = spec.input_shape[0]
    return DatasetBundle(DATA_NAME, TensorDataset(), TensorDataset(), tuple(spec.input_shape),
                         spec.num_classes, (0.0,) * c, (1.0,) * c, [], preprocess=spec.preprocess)


def load(path: str | os.PathLike[str], *, model: nn.Module) -> nn.Module:
    """Reload a file written by `save` or `CompressResult.save` (checkpoint or packed):
    `model` is your own module (as built before compression; its weights do not matter),
    resized to the file's widths and loaded with its weights: outputs are identical."""
    from xaicompress.export.packed import load_any

    if not isinstance(model, nn.Module):
        raise XaiCompressError(f"model: expected your torch.nn.Module, got "
                               f"{type(model).__name__}")
    template = copy.deepcopy(model)
    template.__dict__.pop(_ATTR, None)
    return to_module(load_any(path, model=template))


# ------------------------------------------------------------------ compress
@dataclass
class CompressResult:
    """What `compress` made: the compressed `model` (an nn.Module), the `report` (the
    dict of report.json) and `save(dir)`, which writes report.json / report.md, the
    checkpoint, the packed file and ONNX (as `compress --out` does)."""

    model: nn.Module
    report: dict[str, Any]
    baseline: nn.Module
    _run: Any = field(repr=False, default=None)

    def save(self, out_dir: str | os.PathLike[str], *, plots: bool = True) -> dict[str, Path]:
        from xaicompress.pipeline.run import write_result

        return write_result(self._run, out_dir, plots=plots)


def compress(model: nn.Module, *, train: Any, test: Any = None, config: Any = None,
             normalise: Any = None, classes: list[str] | None = None,
             echo: Any = None) -> CompressResult:
    """Run the stages of `config` (a dict as a YAML config's, a path to one, or a
    `PipelineConfig`; its `stages`, `seed`, `export`, `report`, `name`; no model or data
    keys) on `model`, fine-tuning and scoring on `train`, measuring on `test` (default:
    `train`). `model` is not changed."""
    from xaicompress.pipeline.config import PipelineConfig, load_config, validate_config
    from xaicompress.pipeline.run import run_in_memory

    if config is None:
        config = {"stages": [{"type": "prune_structured", "ratio": 0.5},
                             {"type": "quantize", "avg_bits": 8}]}
    if isinstance(config, (str, os.PathLike)):
        config = load_config(config).model_dump(exclude_unset=True)
    elif isinstance(config, PipelineConfig):
        config = config.model_dump(exclude_unset=True)
    cfg = validate_config(config, "config", in_memory=True)
    bundle = as_bundle(model, train, test, normalise=normalise, classes=classes)
    start = to_checkpoint(model, bundle)
    cfg = cfg.model_copy(update={"data": DATA_NAME, "name": cfg.name or type(model).__name__})
    res = run_in_memory(cfg, bundle, start, echo=echo)
    return CompressResult(to_module(res.final.copy()), res.report,
                          to_module(res.baseline.copy()), res)
