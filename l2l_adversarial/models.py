"""Networks used in the paper's experiments.

``CNN4`` is MAML's 4-layer convolutional network (Finn et al., 2017), the one ADML uses:
four blocks of 3x3 convolution with ``hidden`` filters, batch normalisation, ReLU and 2x2
max-pooling, then a linear classifier. Its BatchNorm layers have
``track_running_stats=False``: they always normalise with the statistics of the batch they
see (transductive, as in MAML's reference code), so no running statistics are shared between
tasks, clones, attacks and evaluation.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

__all__ = ["CNN4", "MLP", "FeaturesThenHead"]


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class CNN4(nn.Module):
    """MAML's 4-block CNN for ``ways``-way classification of ``(C, H, W)`` images.

    Example:
        >>> import torch
        >>> net = CNN4(ways=5, in_channels=3, image_size=84)  # the paper's MiniImageNet net
        >>> net(torch.rand(2, 3, 84, 84)).shape
        torch.Size([2, 5])
    """

    MIN_IMAGE_SIZE = 16
    """The smallest side its four 2x2 poolings leave a pixel of."""

    def __init__(
        self, ways: int, in_channels: int = 3, hidden: int = 32, image_size: int = 84
    ) -> None:
        super().__init__()
        if ways < 2 or in_channels < 1 or hidden < 1 or image_size < self.MIN_IMAGE_SIZE:
            raise ValueError(
                "CNN4 needs ways >= 2, in_channels >= 1, hidden >= 1 and image_size >= 16 "
                f"(four 2x2 poolings); got ways={ways}, in_channels={in_channels}, "
                f"hidden={hidden}, image_size={image_size}"
            )
        self.features = nn.Sequential(
            _conv_block(in_channels, hidden),
            _conv_block(hidden, hidden),
            _conv_block(hidden, hidden),
            _conv_block(hidden, hidden),
            nn.Flatten(),
        )
        side = image_size
        for _ in range(4):
            side //= 2
        self.classifier = nn.Linear(hidden * side * side, ways)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.classifier(self.features(inputs))


class MLP(nn.Module):
    """A fully connected ReLU network on flattened inputs.

    Example:
        >>> import torch
        >>> MLP(in_features=784, ways=5, hidden=(64, 64))(torch.rand(3, 1, 28, 28)).shape
        torch.Size([3, 5])
    """

    def __init__(self, in_features: int, ways: int, hidden: tuple[int, ...] = (64, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, ways))
        self.net = nn.Sequential(*layers)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)


class FeaturesThenHead(nn.Sequential):
    """``head(features(x))``: the network of a learner built with ``features=`` (ANIL's
    split, :class:`~l2l_adversarial.algorithms.base.LearnerOptions`). Attacks and query scores
    see it on raw inputs; the inner loop adapts ``head`` alone. Holds the two modules, copies
    nothing.

    Example:
        >>> import torch
        >>> net = CNN4(ways=5, image_size=32)
        >>> FeaturesThenHead(net.features, net.classifier)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 5])
    """

    features: nn.Module
    head: nn.Module

    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__(OrderedDict(features=features, head=head))
