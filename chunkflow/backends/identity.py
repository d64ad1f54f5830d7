"""The identity backend: output = input (or C copies of channel 0).

Why: the blending and donation machinery must reproduce its input exactly when the "network" is
the identity, which makes it the sharpest test of Invariant 1 (any seam or double count shows up
as a deviation from the input), and it runs instantly without torch. ``identity:C`` returns C
copies of channel 0, to exercise multi-channel outputs (e.g. affinities) with the same exactness.

Device: the identity needs no accelerator, so it accepts any well-formed device name and always
computes with numpy on the host; it never demands CUDA.
"""
from __future__ import annotations

import numpy as np

from chunkflow.backends.base import Backend, ModelError, check_batch, check_device, check_precision

__all__ = ["IdentityBackend", "make_identity_backend"]


class IdentityBackend(Backend):
    """Returns its input unchanged (channels preserved) or ``channels`` copies of channel 0."""

    name = "identity"
    independent_batches = True  # computed in submit(), into a new array each time

    def __init__(self, channels: int | None = None, device: str = "cpu", precision: str = "float32") -> None:
        self.channels = channels
        self.device = check_device(device)
        self.precision = check_precision(precision)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = check_batch(batch)
        if self.channels is None:
            return batch.copy()
        return np.repeat(batch[:, :1], self.channels, axis=1)


def make_identity_backend(
    model: str, weights: str | None = None, device: str = "cpu", precision: str = "float32"
) -> IdentityBackend:
    """Factory for ``identity`` and ``identity:C`` (C a positive integer). Weights are refused."""
    if weights:
        raise ModelError(f"the identity backend takes no weights, got {weights!r}")
    if model == "identity":
        return IdentityBackend(None, device, precision)
    _, _, count = model.partition(":")
    if not count.isdigit() or int(count) < 1:
        raise ModelError(f"bad identity model {model!r}; valid: 'identity' or 'identity:C' with C >= 1")
    return IdentityBackend(int(count), device, precision)
