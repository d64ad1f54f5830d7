"""A tiny fixed-random 3-layer 3D conv net with valid convolutions, for tests.

Why: valid (unpadded) convolutions make the output patch smaller than the input patch (by 2 voxels
per layer and axis: output = input - 6), which exercises chunkflow's crop-margin handling; three
sigmoid outputs look like affinities. ``torch.manual_seed`` inside ``build_model`` makes the weights
identical in every process without shipping a weights file.
"""
from __future__ import annotations

import torch
from torch import nn


def build_model() -> nn.Module:
    """1 input channel -> 3 output channels; spatial output = input - 6 on every axis."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(1234)
        net = nn.Sequential(
            nn.Conv3d(1, 4, 3),
            nn.ReLU(),
            nn.Conv3d(4, 4, 3),
            nn.ReLU(),
            nn.Conv3d(4, 3, 3),
            nn.Sigmoid(),
        )
    finally:
        torch.random.set_rng_state(gen_state)  # do not disturb the caller's random stream
    return net
