"""`xaicompress import`: turn a user's trained state dict into an xaicompress checkpoint.

    weights (.pt/.pth/.bin/.safetensors)  -> models.weights.read_state_dict (never unpickles)
    --model SPEC [+ kwargs]               -> the architecture, built for the data's classes
    --data SPEC [+ preprocessing]         -> the images, fed the way the model was trained
    -> Checkpoint (spec + preprocessing recorded, test accuracy measured)

The checkpoint records the model spec and the complete preprocessing, so every later
command rebuilds and feeds the model without being told again (only a
`package.module:factory` model must be named again with --model: it is code).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from xaicompress.checkpoint import Checkpoint, ModelSpec, load_weights
from xaicompress.data import DatasetBundle, load_dataset
from xaicompress.data.preprocess import Preprocess
from xaicompress.errors import XaiCompressError
from xaicompress.models.registry import check_model_kwargs
from xaicompress.models.weights import match_state_dict, read_state_dict


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_imported(weights: str | os.PathLike[str], model: str, bundle: DatasetBundle, *,
                   model_kwargs: dict[str, Any] | None = None) -> Checkpoint:
    """The checkpoint of state dict `weights` in architecture `model` (built for `bundle`'s
    images and classes), with the bundle's preprocessing recorded; no accuracy yet."""
    kwargs = dict(model_kwargs or {})
    check_model_kwargs(model, kwargs, "--model-kwargs")
    sd = read_state_dict(weights)
    spec = ModelSpec(model, tuple(bundle.input_shape), bundle.num_classes, kwargs,
                     bundle.preprocess)
    net = spec.build()
    source = str(weights)
    tensors = match_state_dict(net, sd, source, model)
    load_weights(net, tensors, source)
    with torch.no_grad():
        out = net(torch.zeros(1, *bundle.input_shape))
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, bundle.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise XaiCompressError(f"--model {model}: gives outputs {shape} for one image; the data "
                               f"has {bundle.num_classes} classes")
    p = Path(weights)
    history = [{"stage": "import", "weights": p.name, "sha256": _sha256(p), "model": model,
                "kwargs": kwargs, "preprocess": spec.preprocess.to_meta()
                if spec.preprocess else None}]
    return Checkpoint(net, spec, bundle.spec, history=history)


def import_weights(weights: str | os.PathLike[str], model: str, data: str, *,
                   model_kwargs: dict[str, Any] | None = None,
                   preprocess: Preprocess | None = None, seed: int = 0,
                   bundle: DatasetBundle | None = None) -> tuple[Checkpoint, DatasetBundle]:
    """Import `weights` (see module docstring) and measure the test accuracy
    (`ckpt.metrics["accuracy"]`); returns the checkpoint and the data as the model sees it.

    preprocess: the model's own (`--normalise`, size, resize); unset fields are the data's.
    """
    from xaicompress.train import accuracy

    if bundle is None:
        bundle = load_dataset(data, seed=seed, preprocess=preprocess)
    ckpt = build_imported(weights, model, bundle, model_kwargs=model_kwargs)
    ckpt.metrics = {"accuracy": accuracy(ckpt.model, bundle.test)}
    return ckpt, bundle
