"""What a task is: its splits (texts or images, and labels) and how it is scored."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The seed of every fixed split and subset: the same on every machine, whatever the run's seed.
SPLIT_SEED = 20240917


@dataclass
class Split:
    """Texts (one or two per example) and labels (int class or float target)."""

    text_a: list[str]
    labels: list[float] | list[int]
    text_b: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: list[int]) -> Split:
        return Split(
            [self.text_a[i] for i in index],
            [self.labels[i] for i in index],  # type: ignore[misc]
            None if self.text_b is None else [self.text_b[i] for i in index],
        )


@dataclass
class ImageSplit:
    """Grayscale images ``(N, H, W)``, float in [0, 1], and integer class labels."""

    images: torch.Tensor
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: list[int]) -> ImageSplit:
        return ImageSplit(self.images[index], [self.labels[i] for i in index])


@dataclass
class Task:
    """A loaded task.

    Attributes:
        name: task name.
        train, dev: the splits used for training and for the reported metric.
        num_labels: classes (1 for regression).
        metrics: names of the metrics reported (the first is the headline one).
        description: one line saying what the data is and how it was split.
    """

    name: str
    train: Split | ImageSplit
    dev: Split | ImageSplit
    num_labels: int
    metrics: list[str]
    description: str
    test: Split | ImageSplit | None = None

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def is_image(self) -> bool:
        return isinstance(self.train, ImageSplit)
