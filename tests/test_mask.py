"""Masks: the output is exactly the whole-volume reference of a model that outputs zero on the
patches outside the mask (checked against MONAI's sliding_window_inference with such a
predictor), blocks outside the mask get no stage-one task and send no donations, and the dry run
counts what is saved."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from chunkflow import cli
from chunkflow.backends import load_backend
from chunkflow.bbox import Bbox, Vec
from chunkflow.storage import create_volume, open_volume
from tests.helpers import CONV3_SAME, examples, make_input

SHAPE = (16, 96, 96)
PATCH, OVERLAP = (8, 32, 32), (2, 8, 8)


def _mask(tmp_path, blobs: list[tuple[int, int, int, int]], name: str = "mask") -> str:
    """A uint8 mask at half the input's y,x resolution (zarr), ones in the given y,x boxes of
    mask voxels (y0, y1, x0, x1), over every z."""
    data = np.zeros((1, SHAPE[0], SHAPE[1] // 2, SHAPE[2] // 2), dtype=np.uint8)
    for y0, y1, x0, x1 in blobs:
        data[:, :, y0:y1, x0:x1] = 1
    volume = create_volume(str(tmp_path / f"{name}.zarr"), Bbox((0, 0, 0), data.shape[1:]), Vec(8, 24, 24), 1,
                           "uint8", resolution=(40.0, 16.0, 16.0))
    volume.write(volume.bbox, data)
    return str(tmp_path / f"{name}.zarr"), data[0]


def _monai_masked(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """MONAI sliding-window inference where a window whose output box has no non-zero mask
    voxel (y, x halved, rounded outward) predicts zeros."""
    torch = pytest.importorskip("torch")
    inferers = pytest.importorskip("monai.inferers")
    backend = load_backend(CONV3_SAME)

    def predictor(x, coords):
        out = backend.predict(x.numpy())
        for i, window in enumerate(coords):
            z, y, x_ = window[-3:]
            sub = mask[z.start:z.stop, y.start // 2:math.ceil(y.stop / 2), x_.start // 2:math.ceil(x_.stop / 2)]
            if not sub.any():
                out[i] = 0
        return torch.from_numpy(out)

    with torch.no_grad():
        return inferers.sliding_window_inference(
            torch.from_numpy(data[None]), roi_size=PATCH, sw_batch_size=4, predictor=predictor, with_coord=True,
            overlap=tuple(o / p for o, p in zip(OVERLAP, PATCH)), mode="gaussian", sigma_scale=0.125).numpy()[0]


def _flags(url: str, out: str, mask: str, block: str) -> list[str]:
    return ["--input", url, "--output", out, "--model", CONV3_SAME, "--input-patch", ",".join(map(str, PATCH)),
            "--overlap", ",".join(map(str, OVERLAP)), "--block", block, "--mask", mask, "--quiet"]


@settings(max_examples=examples(6), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(y0=st.integers(0, 40), x0=st.integers(0, 40), h=st.integers(1, 20), w=st.integers(1, 20),
       block=st.sampled_from(["16,32,32", "8,48,48", "16,96,32"]))
def test_masked_run_equals_monai_with_zero_outside_the_mask(tmp_path_factory, y0, x0, h, w, block):
    tmp = tmp_path_factory.mktemp("mask")
    url, data = make_input(tmp / "em", SHAPE, seed=31)
    mask_url, mask = _mask(tmp, [(y0, y0 + h, x0, x0 + w)])
    out = f"file://{tmp / 'out'}"
    cli.main(["run", *_flags(url, out, mask_url, block)])
    got = open_volume(out).read(Bbox((0, 0, 0), SHAPE))
    np.testing.assert_allclose(got, _monai_masked(data, mask), rtol=0, atol=1e-5)


def test_blocks_outside_the_mask_get_no_task_and_send_nothing(tmp_path, capsys):
    url, data = make_input(tmp_path / "em", SHAPE, seed=32)
    # ones where input y, x < 20: only the patches at y = x = 0 (3 along z) touch it, all owned by one block
    mask_url, mask = _mask(tmp_path, [(0, 10, 0, 10)])
    out = f"file://{tmp_path / 'out'}"
    cli.main(["plan", "--donations", str(tmp_path / "job"), *_flags(url, out, mask_url, "16,32,32")[:-1],
              "--dry-run"])
    dry = capsys.readouterr().out
    assert "mask" in dry and "8 of 9 blocks get no stage-one task, 45 of 48 patches" in dry, dry
    # the costs with the mask (a new user's walkthrough, 2026-11-29: the figures ignored it): at a GPU price that
    # makes the model time the whole cost, the total with the mask is the 3 of 48 patches computed
    cli.main(["plan", "--donations", str(tmp_path / "job"), *_flags(url, out, mask_url, "16,32,32")[:-1],
              "--dry-run", "--price-gpu-hour", "1e9"])
    dry = capsys.readouterr().out
    total = float(dry.split("cost in US dollars")[1].split(": $")[1].split(" ")[0].replace(",", ""))
    masked = float(dry.split("in all about $")[1].split(" ")[0].replace(",", ""))
    assert math.isclose(masked, total * 3 / 48, rel_tol=0.01), dry
    cli.main(["run", "--donations", str(tmp_path / "job"), *_flags(url, out, mask_url, "16,32,32")[:-1]])
    summary = capsys.readouterr().out
    assert "stage one: 1 task run, 0 already done, 8 outside the mask (no task)" in summary, summary
    keys = [p.name.split("%") for p in (tmp_path / "job" / "donations").iterdir()]
    assert keys and {receiver for receiver, _ in keys} <= {"0-32_0-32_0-16", "32-64_0-32_0-16", "0-32_32-64_0-16",
                                                          "32-64_32-64_0-16"}
    # every piece comes from the chunk of the only block with patches inside the mask (x, y < 56)
    assert all(Bbox.from_name(piece).stop[1] <= 56 and Bbox.from_name(piece).stop[2] <= 56 for _, piece in keys)
    assert [p.name for p in (tmp_path / "job" / "done" / "stage1").iterdir()] == ["0-32_0-32_0-16"]
    got = open_volume(out).read(Bbox((0, 0, 0), SHAPE))
    np.testing.assert_allclose(got, _monai_masked(data, mask), rtol=0, atol=1e-5)
    assert not got[:, :, 64:, :].any() and not got[:, :, :, 64:].any()
    # every output chunk exists (the cores of blocks outside the mask are written as zeros by stage two)
    assert len(list((tmp_path / "out").glob("*/*"))) == (96 // 32) ** 2


def test_a_bad_mask_is_refused_in_one_line(tmp_path, capsys):
    url, _ = make_input(tmp_path / "em", SHAPE, seed=33)
    mask_url, _ = _mask(tmp_path, [(0, 10, 0, 10)])
    for mask, mip, message in ((str(tmp_path / "none.zarr"), "0", "no volume at"), (mask_url, "1", "--mip 1"),
                               (mask_url, "True", "--mask-mip True")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["plan", "--donations", str(tmp_path / "job"), *_flags(url, f"file://{tmp_path / 'out'}",
                                                                          mask, "16,32,32"), "--mask-mip", mip])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "out").exists() and not (tmp_path / "job").exists()


def test_a_mask_without_a_voxel_size_is_refused_where_it_would_be_misplaced(tmp_path, capsys):
    """A plain zarr mask without a ``resolution`` attribute reads as 1 nm voxels: over a 40x8x8 nm
    input it would cover a corner and leave the rest uncomputed at exit 0 (a new user's walkthrough,
    2026-11-29). Refused in one line naming both voxel sizes and how to set the mask's, nothing
    written; accepted once the mask has its voxel size, or where the input has none either."""
    import zarr

    url, _ = make_input(tmp_path / "em", SHAPE, seed=34)  # precomputed, 40x8x8 nm
    bare = str(tmp_path / "bare.zarr")
    zarr.create_array(bare, shape=(1, *SHAPE), chunks=(1, 8, 48, 48), dtype="uint8")[:] = 1
    out, job = f"file://{tmp_path / 'out'}", str(tmp_path / "job")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plan", "--donations", job, *_flags(url, out, bare, "16,48,48")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert "--mask" in err[0] and "has no voxel size" in err[0] and "40,8,8" in err[0] and "resolution=[Z, Y, X]" in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "job").exists()

    zarr.open_array(bare).attrs.update(resolution=[40, 8, 8])
    cli.main(["plan", "--donations", job, *_flags(url, out, bare, "16,48,48")])
    assert (tmp_path / "job" / "manifest.json").exists()

    plain_input = str(tmp_path / "plain_em.zarr")  # no voxel size either: the two agree voxel for voxel
    zarr.create_array(plain_input, shape=(1, *SHAPE), chunks=(1, 8, 48, 48), dtype="uint8")[:] = 7
    bare2 = str(tmp_path / "bare2.zarr")
    zarr.create_array(bare2, shape=(1, *SHAPE), chunks=(1, 8, 48, 48), dtype="uint8")[:] = 1
    cli.main(["plan", "--donations", str(tmp_path / "job2"),
              *_flags(plain_input, str(tmp_path / "out2.zarr"), bare2, "16,48,48")])
    assert (tmp_path / "job2" / "manifest.json").exists()

    # the other way round: a mask with a voxel size over an input without one (a review, 2026-11-29)
    sized_mask, _ = _mask(tmp_path, [(0, 10, 0, 10)], name="sized")  # 40x16x16 nm
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plan", "--donations", str(tmp_path / "job3"),
                  *_flags(plain_input, str(tmp_path / "out3.zarr"), sized_mask, "16,48,48")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "the input" in err[0] and plain_input in err[0], err
    assert not (tmp_path / "out3.zarr").exists() and not (tmp_path / "job3").exists()


def test_a_mask_changed_in_place_is_refused_when_planned_again(tmp_path, capsys):
    """A mask overwritten after `plan` and planned again with the same command was accepted, and the
    run mixed the planned block map with the new mask at exit 0 (an adversarial review, 2026-11-29).
    Planning again now recomputes what the mask keeps and refuses a difference in one line."""
    url, _ = make_input(tmp_path / "em", SHAPE, seed=35)
    mask_url, data = _mask(tmp_path, [(0, 10, 0, 10)])
    args = ["plan", "--donations", str(tmp_path / "job"), *_flags(url, f"file://{tmp_path / 'out'}", mask_url,
                                                                  "16,32,32")]
    cli.main(args)
    cli.main(args)  # the same mask again: the same job, nothing to refuse
    volume = open_volume(mask_url)
    volume.write(volume.bbox, np.ones((1, *volume.bbox.shape), dtype=np.uint8))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "changed since this job was planned" in err[0], err
