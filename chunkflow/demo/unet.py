"""The built-in demo network: a small anisotropic 3D U-Net that predicts membrane probability.

Why it exists: chunkflow needs a real convnet to demonstrate and test blended block inference without
any download. This one is deliberately small (~80k parameters, tens of milliseconds per 16x64x64
patch on a laptop CPU) yet fits the synthetic EM of :mod:`chunkflow.demo.synthetic` well.

Design choices:

- **Anisotropic**: serial-section EM has 40 nm z vs 8 nm xy voxels, so the first level uses 2D
  (1x3x3) convolutions and pools only in y, x (1,2,2); the coarser levels are isotropic in nm.
- **'same' size**: output spatial shape == input spatial shape for *any* input shape. Pooling uses
  ``ceil_mode`` and each upsampled map is cropped back to its skip connection's size, so patches
  whose size is not a multiple of the pooling factors also work (no hidden padding of the input).
  The crop uses tensor shapes, which the ONNX exporter records dynamically, so the exported model
  accepts any patch size too.
- **BatchNorm** (a fixed affine map at inference) rather than instance norm: per-patch statistics
  would make a voxel's output depend on the whole patch content and hurt blending consistency.
- The forward pass ends in a sigmoid (probabilities in [0, 1]); :meth:`MembraneUNet.logits` gives the
  pre-sigmoid map, which training uses with ``BCEWithLogitsLoss`` for numerical stability.

Input: float32 ``[N, 1, z, y, x]`` scaled to [0, 1]. Output: float32 ``[N, 1, z, y, x]``.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["MembraneUNet", "build_model"]


def _block(cin: int, cout: int, kernel: tuple[int, int, int]) -> nn.Sequential:
    """Two convolutions (each conv + BatchNorm + ReLU) with 'same' padding."""
    pad = tuple(k // 2 for k in kernel)
    return nn.Sequential(
        nn.Conv3d(cin, cout, kernel, padding=pad, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
        nn.Conv3d(cout, cout, kernel, padding=pad, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
    )


def _crop_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Crop the spatial dims of ``x`` (upsampled, possibly one voxel too big) to those of ``ref``."""
    return x[:, :, : ref.shape[2], : ref.shape[3], : ref.shape[4]]


class MembraneUNet(nn.Module):
    """Three-level anisotropic U-Net: 1 input channel (EM), 1 output channel (membrane probability)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        w = width
        self.enc1 = _block(1, w, (1, 3, 3))
        self.pool1 = nn.MaxPool3d((1, 2, 2), ceil_mode=True)
        self.enc2 = _block(w, 2 * w, (3, 3, 3))
        self.pool2 = nn.MaxPool3d((2, 2, 2), ceil_mode=True)
        self.bottom = _block(2 * w, 4 * w, (3, 3, 3))
        self.up2 = nn.Upsample(scale_factor=(2.0, 2.0, 2.0), mode="nearest")
        self.dec2 = _block(4 * w + 2 * w, 2 * w, (3, 3, 3))
        self.up1 = nn.Upsample(scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        self.dec1 = _block(2 * w + w, w, (1, 3, 3))
        self.head = nn.Conv3d(w, 1, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid membrane map, same spatial shape as ``x``."""
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool1(e1))
        b = self.bottom(self.pool2(e2))
        d2 = self.dec2(torch.cat([_crop_to(self.up2(b), e2), e2], dim=1))
        d1 = self.dec1(torch.cat([_crop_to(self.up1(d2), e1), e1], dim=1))
        return self.head(d1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


def build_model() -> nn.Module:
    """Return an untrained :class:`MembraneUNet` (the ``.py`` model-file convention of chunkflow)."""
    return MembraneUNet()
