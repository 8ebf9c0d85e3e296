"""A quickstart dataset that needs no download: scikit-learn's 8 x 8 handwritten digits."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor
from torch.utils.data import Dataset

from l2l_adversarial.validation import check_choice

__all__ = ["Digits"]


class Digits(Dataset[tuple[Tensor, int]]):
    """scikit-learn's ``load_digits`` (1797 images of 10 digits, shipped with scikit-learn).

    Meta-train classes are the digits 0-4 and meta-test classes the digits 5-9: with only
    10 classes, a 5-way meta-test task uses exactly the five digits never seen in training
    (and every 5-way meta-training task uses the same five digits, in random label order).
    There is no validation mode. Labels are the digits themselves (0-4 or 5-9); few-shot
    tasks relabel each task's classes 0..ways-1.

    Images: pixel values 0-16 scaled to [0, 1], bilinearly resized from 8 x 8 to
    ``image_size`` x ``image_size``, as 1 x H x W float tensors, then ``transform``.

    Example::

        train = Digits("train", image_size=28)
        image, digit = train[0]  # image: (1, 28, 28) in [0, 1], digit in 0..4
    """

    NAME = "digits"
    MODES = ("train", "test")
    CLASSES = {"train": (0, 1, 2, 3, 4), "test": (5, 6, 7, 8, 9)}

    def __init__(
        self,
        mode: str = "train",
        image_size: int = 28,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        check_choice("mode", mode, self.MODES)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(
                f"image_size must be a positive int (pixels per side), got {image_size!r}"
            )
        self.mode = mode
        self.image_size = image_size
        self.transform = transform
        digits = load_digits()
        labels = torch.as_tensor(digits.target, dtype=torch.long)
        keep = torch.isin(labels, torch.tensor(self.CLASSES[mode]))
        pixels = torch.as_tensor(digits.images, dtype=torch.float32)[keep].unsqueeze(1) / 16.0
        #: float32 images (N, 1, image_size, image_size) in [0, 1].
        self.images = F.interpolate(
            pixels, size=(image_size, image_size), mode="bilinear", align_corners=False
        )
        #: the digit of every image.
        self.targets = labels[keep]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index].clone()
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])
