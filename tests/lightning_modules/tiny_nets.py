"""Small user-style nn.Modules for the backbone tests (ReLU called functionally, like most CIFAR code)."""

import torch.nn.functional as F
from torch import Tensor, nn


class FunctionalReluNet(nn.Module):
    """conv3x3(width) - BN - F.relu - conv3x3(2 width) - F.relu - global avg pool - Linear."""

    def __init__(self, width: int = 8, num_classes: int = 10, in_chans: int = 3, drop: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.drop = nn.Dropout(drop)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.conv2(x).relu()
        return self.head(self.drop(F.adaptive_avg_pool2d(x, 1).flatten(1)))
