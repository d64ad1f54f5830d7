"""The identity, except on poisoned input: a voxel above 5 (test volumes hold values in [0, 1])
makes the forward pass raise RuntimeError, which chunkflow can only treat as a bug.

Why: tests/test_queue_healing.py writes one such voxel where the patches of exactly one block
read it, so exactly one block's stage-one task raises, in every worker and on every attempt,
while every other block computes normally.
"""
from __future__ import annotations

import torch
from torch import nn

POISON = 7.0


class PoisonedIdentity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x > 5).any()):
            raise RuntimeError("poisoned input voxel")
        return x.clone()


def build_model() -> nn.Module:
    return PoisonedIdentity()
