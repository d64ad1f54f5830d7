"""The benchmark network: a four-level variant of the demo MembraneUNet (~1.3 M parameters).

Same building blocks as :mod:`chunkflow.demo.unet` (anisotropic first level, conv + BatchNorm +
ReLU pairs, ceil-mode pooling, nearest upsampling cropped to the skip connection, sigmoid head),
with one more level and 16 base channels, so that most parameters sit in the coarse levels where
they cost little compute. Random weights (seeded) are fine: the benchmarks time and compare, they
do not segment. This file is self-contained (only torch) so chunkflow 1.2.0's model loader can
import it from its own virtual environment.
"""
from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int, kernel: tuple[int, int, int]) -> nn.Sequential:
    pad = tuple(k // 2 for k in kernel)
    return nn.Sequential(
        nn.Conv3d(cin, cout, kernel, padding=pad, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
        nn.Conv3d(cout, cout, kernel, padding=pad, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
    )


def _crop_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return x[:, :, : ref.shape[2], : ref.shape[3], : ref.shape[4]]


class BenchUNet(nn.Module):
    """Four levels, widths w, 2w, 4w, 8w; pools (1,2,2), (2,2,2), (2,2,2); 'same'-size output."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.enc1 = _block(1, w, (1, 3, 3))
        self.enc2 = _block(w, 2 * w, (3, 3, 3))
        self.enc3 = _block(2 * w, 4 * w, (3, 3, 3))
        self.bottom = _block(4 * w, 8 * w, (3, 3, 3))
        self.dec3 = _block(8 * w + 4 * w, 4 * w, (3, 3, 3))
        self.dec2 = _block(4 * w + 2 * w, 2 * w, (3, 3, 3))
        self.dec1 = _block(2 * w + w, w, (1, 3, 3))
        self.pool1 = nn.MaxPool3d((1, 2, 2), ceil_mode=True)
        self.pool = nn.MaxPool3d((2, 2, 2), ceil_mode=True)
        self.up = nn.Upsample(scale_factor=(2.0, 2.0, 2.0), mode="nearest")
        self.up1 = nn.Upsample(scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        self.head = nn.Conv3d(w, 1, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last decoder level's feature maps (before the 1x1 head)."""
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool1(e1))
        e3 = self.enc3(self.pool(e2))
        b = self.bottom(self.pool(e3))
        d3 = self.dec3(torch.cat([_crop_to(self.up(b), e3), e3], dim=1))
        d2 = self.dec2(torch.cat([_crop_to(self.up(d3), e2), e2], dim=1))
        return self.dec1(torch.cat([_crop_to(self.up1(d2), e1), e1], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.features(x)))


def build_model() -> nn.Module:
    """A BenchUNet with seeded random weights (the ``.py`` model-file convention of chunkflow).

    Convolutions get He (Kaiming normal) initialisation, which keeps the signal's variance through
    the 15 layers, so the output varies with the input like a trained net's (PyTorch's default
    initialisation shrinks it to a near-constant map, which would hide any blending error); the head is
    centred and scaled so the probabilities span most of [0, 1], as a trained net's do."""
    torch.manual_seed(0)
    net = BenchUNet()
    for module in net.modules():
        if isinstance(module, nn.Conv3d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    net.eval()
    with torch.no_grad():  # centre the logits on a seeded random probe, then spread them
        probe = net.head(net.features(torch.rand(1, 1, 8, 64, 64)))
        net.head.bias.sub_(probe.mean())
        net.head.weight.mul_(8.0)
        net.head.bias.mul_(8.0)
    return net

