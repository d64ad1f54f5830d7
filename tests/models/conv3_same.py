"""A tiny fixed-random 3-layer 3D conv net with same-size (padding=1) convolutions, for tests.

Why: padding=1 keeps the output patch the size of the input patch, as MONAI's sliding-window
inference expects, so chunkflow can be compared with MONAI on the same net; three
sigmoid outputs look like affinities. ``torch.manual_seed`` inside ``build_model`` makes the weights
identical in every process without shipping a weights file.
"""
from __future__ import annotations

import torch
from torch import nn


def build_model() -> nn.Module:
    """1 input channel -> 3 output channels; spatial output = input."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(1234)
        net = nn.Sequential(
            nn.Conv3d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv3d(4, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv3d(4, 3, 3, padding=1),
            nn.Sigmoid(),
        )
    finally:
        torch.random.set_rng_state(gen_state)  # do not disturb the caller's random stream
    return net
