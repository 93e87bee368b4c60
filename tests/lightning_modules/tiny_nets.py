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


class Output:
    """An output object with attributes, as Hugging Face models return (``ModelOutput``)."""

    def __init__(self, logits: Tensor, pooled: Tensor) -> None:
        self.logits = logits
        self.pooled = pooled


class OutputNet(FunctionalReluNet):
    """FunctionalReluNet whose forward returns its logits (B, num_classes) in another form.

    ``returns``: "tuple" (logits, features), "dict" {"logits", "features"}, "object" (``Output``),
    "flat" logits[:, 0] of shape (B,), "double" (B, 2 num_classes), "tensor" the logits.
    """

    def __init__(self, returns: str = "tuple", width: int = 4, num_classes: int = 3) -> None:
        super().__init__(width, num_classes)
        self.returns = returns

    def forward(self, x: Tensor):
        features = F.adaptive_avg_pool2d(self.conv2(F.relu(self.bn1(self.conv1(x)))).relu(), 1).flatten(1)
        logits = self.head(features)
        return {
            "tuple": lambda: (logits, features),
            "dict": lambda: {"features": features, "logits": logits},
            "object": lambda: Output(logits, features),
            "flat": lambda: logits[:, 0],
            "double": lambda: logits.repeat(1, 2),
            "tensor": lambda: logits,
        }[self.returns]()


class FixedSizeNet(nn.Module):
    """Flatten + Linear for (B, 3, 8, 8) inputs only; returns (logits, features) or the logits."""

    def __init__(self, returns: str = "tuple", num_classes: int = 3) -> None:
        super().__init__()
        self.returns = returns
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.head = nn.Linear(2 * 8 * 8, num_classes)

    def forward(self, x: Tensor):
        features = F.relu(self.conv(x)).flatten(1)
        logits = self.head(features)
        return (logits, features) if self.returns == "tuple" else logits
