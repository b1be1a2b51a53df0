"""torchvision and timm import through `vision_import`, also where torchvision's C++
operators do not load (the CPU machines' case), and their classifiers run."""

from __future__ import annotations

import pytest
import torch

from xaicompress.models.vision_import import import_timm, import_torchvision


def test_torchvision_classifier_runs():
    tv = import_torchvision()
    model = tv.models.resnet18(num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)


def test_timm_classifier_runs():
    timm = import_timm()
    model = timm.create_model("mobilenetv3_small_050", num_classes=5, pretrained=False).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5)


def test_detection_op_schema_is_declared_without_a_kernel():
    """The fallback declares nms's schema only: a classifier never calls it, and a call
    fails loudly instead of computing something."""
    tv = import_torchvision()
    if tv.extension._has_ops():
        pytest.skip("torchvision's C++ operators loaded; the fallback is not in use")
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.ops.torchvision.nms(torch.rand(3, 4), torch.rand(3), 0.5)
