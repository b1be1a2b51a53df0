"""CIFAR-style VGG with BatchNorm and a width multiplier.

Max-pools that would shrink the feature map below 1x1 are left out, so the same
definition runs on 8x8, 28x28 and 32x32 inputs.
"""

from __future__ import annotations

from torch import Tensor, nn

from xaicompress.models.registry import register_model

_CFG: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
              512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, cfg: list[int | str], in_channels: int = 3, image_size: int = 32,
                 num_classes: int = 10, width: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        c, s = in_channels, image_size
        for v in cfg:
            if v == "M":
                if s >= 2:
                    layers.append(nn.MaxPool2d(2))
                    s //= 2
                continue
            out = max(1, int(round(int(v) * width)))
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU()]
            c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        hidden = max(1, int(round(512 * width)))
        self.classifier = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


@register_model("vgg11")
def vgg11(in_channels: int = 3, image_size: int = 32, num_classes: int = 10,
          width: float = 1.0) -> VGG:
    return VGG(_CFG["vgg11"], in_channels, image_size, num_classes, width)


@register_model("vgg16")
def vgg16(in_channels: int = 3, image_size: int = 32, num_classes: int = 10,
          width: float = 1.0) -> VGG:
    return VGG(_CFG["vgg16"], in_channels, image_size, num_classes, width)
