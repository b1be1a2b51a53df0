"""LeNet-5 and LeNet-300-100, adapted to any input size and channel count."""

from __future__ import annotations

from torch import Tensor, nn

from xaicompress.models.registry import register_model


class LeNet5(nn.Module):
    """conv6-5x5, pool, conv16-5x5, pool, fc120, fc84, fc(num_classes).

    On 28x28 inputs conv1 pads by 2 (the classic 32x32 field); conv2 pads too when the
    image is too small for a valid 5x5 convolution (e.g. 8x8 digits).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        s = image_size // 2
        pad2 = 0 if s >= 10 else 2
        self.conv2 = nn.Conv2d(6, 16, 5, padding=pad2)
        self.relu2 = nn.ReLU()
        s = s - 4 + 2 * pad2
        self.pool2 = nn.MaxPool2d(2) if s >= 2 else nn.Identity()
        s = s // 2 if s >= 2 else s
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * s * s, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.flatten(x)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


class LeNet300(nn.Module):
    """LeNet-300-100: fully connected 300-100-num_classes."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_channels * image_size * image_size, 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(x)
        x = self.relu1(self.fc1(x))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


@register_model("lenet5")
def lenet5(in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> LeNet5:
    return LeNet5(in_channels, image_size, num_classes)


@register_model("lenet300")
def lenet300(in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> LeNet300:
    return LeNet300(in_channels, image_size, num_classes)
