"""A task's examples as model inputs: tokenized text padded per batch, or images resized
to the model's input and normalised."""

from __future__ import annotations

import random
from typing import Any

import torch

from .splits import SPLIT_SEED, ImageSplit, Split

IMAGE_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as DINOv2 was trained with
IMAGE_STD = (0.229, 0.224, 0.225)


class Images:
    """Grayscale images resized to ``size`` and replicated to 3 normalised channels."""

    def __init__(self, split: ImageSplit, size: int) -> None:
        x = split.images.unsqueeze(1)
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
        self.pixels = ((x - mean) / std).contiguous()
        self.labels = torch.tensor(split.labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: list[int]) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


class EncodedText:
    """A tokenized split (one text or a pair per example), padded per batch."""

    def __init__(self, tokenizer: Any, split: Split, max_length: int, regression: bool) -> None:
        enc = tokenizer(split.text_a, split.text_b, truncation=True, max_length=max_length)
        self.input_ids = enc["input_ids"]
        self.extra = {k: enc[k] for k in enc if k not in ("input_ids", "attention_mask")}
        self.labels = torch.tensor(split.labels, dtype=torch.float32 if regression else torch.long)
        self.pad_id = tokenizer.pad_token_id or 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, index: list[int]) -> dict[str, torch.Tensor]:
        width = max(len(self.input_ids[i]) for i in index)
        ids = torch.full((len(index), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        extra = {k: torch.zeros((len(index), width), dtype=torch.long) for k in self.extra}
        for row, i in enumerate(index):
            n = len(self.input_ids[i])
            ids[row, :n] = torch.tensor(self.input_ids[i])
            mask[row, :n] = 1
            for k in self.extra:
                extra[k][row, :n] = torch.tensor(self.extra[k][i])
        return {"input_ids": ids, "attention_mask": mask, "labels": self.labels[index], **extra}


def fixed_subset(n: int, k: int) -> list[int]:
    """``k`` of ``range(n)``, drawn with :data:`~srlora.experiments.splits.SPLIT_SEED`, in
    ascending order: the same subset for every method and seed."""
    return sorted(random.Random(SPLIT_SEED + n).sample(range(n), k))
