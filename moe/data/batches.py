"""A batch of training sequences, the one shape every data set hands the trainer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) token ids
    targets: torch.Tensor  # (B, T) next tokens, -100 where no loss is taken
    images: torch.Tensor | None = None  # (B, M, C, W, W) for the <|image|> tokens of image-caption data
