"""The float ONNX graph every deployable export starts from: effective weights, parameter
names kept, BatchNorm folded into the convolution before it.

`torch.onnx.export` folds BatchNorm by itself only in EVAL mode, and then renames the
folded weights (`onnx::Conv_203`); the integer and small exports must find each layer's
weight by its PyTorch name (`layers.0.conv1.weight`) to attach that layer's encoding. So we
export in PRESERVE mode (an eval-mode model exports BatchNormalization in inference form,
names kept) and fold here: w' = w * a, b' = (b - mean) * a + beta, a = gamma / sqrt(var +
eps) per output channel. `fold_batchnorm` returns each folded weight's factor a, which the
integer export multiplies into the layer's per-channel scales (the integers stay the
library's).
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import torch
from torch import nn

from xaicompress.checkpoint import Checkpoint
from xaicompress.encoding.activation import remove_activation_quant
from xaicompress.export.metadata import add_onnx_metadata
from xaicompress.export.onnx import INPUT_NAME, OUTPUT_NAME

#: opset of the deployable exports: 21 is the first with int4 / uint4 (DequantizeLinear)
OPSET = 21


def effective_model(ckpt: Checkpoint) -> nn.Module:
    """A copy of `ckpt.model` in eval mode holding the effective float weights, no hooks."""
    model = copy.deepcopy(ckpt.model)
    remove_activation_quant(model)
    ckpt.state.apply(model)
    return model.eval()


def float_onnx(ckpt: Checkpoint, *, opset: int = OPSET) -> tuple[object, dict[str, np.ndarray]]:
    """(ModelProto, {conv weight name: BatchNorm factor a}) of the effective float model,
    parameter names kept, BatchNorm folded, Identity copies of initializers removed."""
    import onnx  # heavy import, only export needs it

    model = effective_model(ckpt)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (torch.zeros(2, *ckpt.spec.input_shape),), buf, dynamo=False,
                          opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True, training=torch.onnx.TrainingMode.PRESERVE)
    proto = onnx.load_from_string(buf.getvalue())
    proto.producer_name = "xaicompress"
    add_onnx_metadata(proto, ckpt.spec)  # architecture and preprocessing (export/metadata.py)
    inline_identities(proto)
    folds = fold_batchnorm(proto)
    drop_unused_initializers(proto)
    onnx.checker.check_model(proto)
    return proto, folds


def inline_identities(proto: object) -> None:
    """Replace `Identity(initializer)` nodes (the exporter's copies of shared constants) by
    the initializer itself, so every weight input names its initializer."""
    graph = proto.graph
    inits = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for n in keep:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(keep)


def drop_unused_initializers(proto: object) -> None:
    graph = proto.graph
    used = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _attr(node: object, name: str, default: float) -> float:
    return next((a.f for a in node.attribute if a.name == name), default)


def _own_initializer(graph: object, inits: dict, uses: dict[str, int], node: object,
                     i: int) -> str:
    """The name of node's i-th input initializer, copied under a new name first when other
    nodes read it too (the exporter shares equal constants), so folding changes only node."""
    name = node.input[i]
    if uses[name] == 1:
        return name
    uses[name] -= 1
    new = f"{name}_{node.name or i}".replace("/", "_")
    while new in inits:
        new += "_"
    copy_ = copy.deepcopy(inits[name])
    copy_.name = new
    graph.initializer.append(copy_)
    inits[new] = graph.initializer[-1]
    uses[new] = 1
    node.input[i] = new
    return new


def fold_batchnorm(proto: object) -> dict[str, np.ndarray]:
    """Fold every BatchNormalization whose input is a Conv output used by nothing else into
    that Conv (in place). Returns {conv weight initializer name: per-channel factor a}."""
    from onnx import numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    uses: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            uses[name] = uses.get(name, 0) + 1
    folds: dict[str, np.ndarray] = {}
    keep = []
    for bn in graph.node:
        conv = producer.get(bn.input[0]) if bn.op_type == "BatchNormalization" else None
        if (conv is None or conv.op_type != "Conv" or uses[bn.input[0]] != 1
                or not all(x in inits for x in [*bn.input[1:5], *conv.input[1:]])):
            keep.append(bn)
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[x]).astype(np.float64)
                                  for x in bn.input[1:5])
        a = gamma / np.sqrt(var + _attr(bn, "epsilon", 1e-5))
        w_name = _own_initializer(graph, inits, uses, conv, 1)
        w = numpy_helper.to_array(inits[w_name]).astype(np.float64)
        inits[w_name].CopyFrom(numpy_helper.from_array(
            (w * a.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32), w_name))
        if len(conv.input) > 2:
            b_name = _own_initializer(graph, inits, uses, conv, 2)
            b = numpy_helper.to_array(inits[b_name]).astype(np.float64)
        else:
            b_name, b = w_name.rsplit(".", 1)[0] + ".bias", np.zeros(w.shape[0])
            while b_name in inits:
                b_name += "_"
            graph.initializer.append(numpy_helper.from_array(b.astype(np.float32), b_name))
            inits[b_name] = graph.initializer[-1]
            conv.input.append(b_name)
        inits[b_name].CopyFrom(numpy_helper.from_array(((b - mean) * a + beta)
                                                       .astype(np.float32), b_name))
        conv.output[0] = bn.output[0]
        folds[w_name] = a.astype(np.float32)
    del graph.node[:]
    graph.node.extend(keep)
    return folds
