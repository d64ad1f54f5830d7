"""Synthetic EM data and the shipped demo U-Net."""
from __future__ import annotations

import time

import numpy as np
import pytest

from chunkflow.backends import load_backend
from chunkflow.demo import make_em_volume
from chunkflow.demo.synthetic import membrane_from_labels, voronoi_labels
from chunkflow.demo.train import HELD_OUT_SEED, roc_auc

SHAPE = (16, 96, 96)


def test_deterministic_with_seed() -> None:
    a_img, a_mask = make_em_volume(SHAPE, seed=3)
    b_img, b_mask = make_em_volume(SHAPE, seed=3)
    c_img, _ = make_em_volume(SHAPE, seed=4)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(a_img, c_img)


def test_dtypes_shapes_and_membranes() -> None:
    image, mask = make_em_volume(SHAPE, seed=1)
    assert image.dtype == np.uint8 and image.shape == SHAPE
    assert mask.dtype == np.bool_ and mask.shape == SHAPE
    assert 0.02 < mask.mean() < 0.25
    # membranes are dark, cytoplasm bright, and the image uses a reasonable grey range
    assert image[mask].mean() + 40 < image[~mask].mean()
    assert image.std() > 15


def test_cells_are_anisotropic_in_voxels() -> None:
    """At 40 nm z vs 8 nm xy, a cell spans far fewer voxels in z than in x."""
    rng = np.random.default_rng(0)
    labels = voronoi_labels((32, 128, 128), (40, 8, 8), rng, elongation=1.0)
    changes_z = np.count_nonzero(labels[1:] != labels[:-1]) / labels[1:].size
    changes_x = np.count_nonzero(labels[..., 1:] != labels[..., :-1]) / labels[..., 1:].size
    assert changes_z > 2.5 * changes_x  # ~5x in theory
    assert membrane_from_labels(labels).any()


@pytest.mark.slow  # a timing check (benchmark-like), ~1 s of work
def test_default_volume_is_fast() -> None:
    start = time.perf_counter()
    make_em_volume()
    assert time.perf_counter() - start < 10.0  # ~1 s on a laptop; generous for slow CI


def test_roc_auc() -> None:
    labels = np.array([0, 0, 1, 1], bool)
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), labels) == 0.5
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), labels) == 0.0


@pytest.mark.parametrize("model", ["builtin:membrane", "onnx"])
def test_shipped_unet_detects_membranes(model: str) -> None:
    from pathlib import Path

    if model == "onnx":
        model = str(Path(__file__).resolve().parents[1] / "chunkflow" / "demo" / "membrane_unet.onnx")
    seed = HELD_OUT_SEED + 1  # never seen in training
    image, mask = make_em_volume((16, 128, 128), seed=seed)
    prob = load_backend(model).predict((image.astype(np.float32) / 255.0)[None, None])[0, 0]
    assert prob[mask].mean() > prob[~mask].mean() + 0.4
    assert roc_auc(prob, mask) > 0.95
