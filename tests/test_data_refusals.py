"""Data that would give a silently wrong output is refused per block, naming what is wrong:
missing input chunks (unless --fill-missing, which counts them), NaN/Inf from the model.
A refused block writes nothing to the output; its failed marker says why."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from chunkflow import cli
from chunkflow.bbox import Bbox
from chunkflow.storage import create_volume, open_volume
from tests.helpers import make_input

FLAGS = ["--model", "identity", "--input-patch", "8,32,32", "--overlap", "2,8,8", "--block", "16,32,32", "--quiet"]
BOX = Bbox((0, 0, 0), (16, 64, 64))


def _holey(tmp_path: Path) -> tuple[str, np.ndarray, Path]:
    """An input whose chunk x 32-64, y 0-32, z 8-16 was never written (deleted from disk)."""
    url, data = make_input(tmp_path / "em", (16, 64, 64), seed=5)
    hole = next((tmp_path / "em").glob("*/32-64_0-32_8-16"))
    hole.unlink()
    return url, data, hole


def _run(*args: str) -> int:
    try:
        cli.main(["run", *args])
    except SystemExit as exit_info:
        return int(exit_info.code or 0)
    return 0


def test_a_missing_input_chunk_is_refused_by_name(tmp_path, capsys):
    url, _, hole = _holey(tmp_path)
    out = f"file://{tmp_path / 'out'}"
    status = _run("--input", url, "--output", out, *FLAGS)
    err = capsys.readouterr().err
    assert status == 2
    assert "32-64_0-32_8-16" in err and "--fill-missing" in err and "missing" in err
    # the blocks whose chunk reads the hole (with its context) were refused; nothing of theirs was written
    failed = list((tmp_path / "out.donations" / "failed" / "stage1").iterdir())
    assert failed and all("missing" in json.loads(f.read_text())["error"] for f in failed)
    written = {p.name for p in (tmp_path / "out").glob("*/*")}
    for marker in failed:
        block = Bbox.from_name(marker.name)
        assert not any(block.intersect(Bbox.from_name(name)) == Bbox.from_name(name) for name in written), written


def test_fill_missing_reads_zeros_on_purpose_and_counts_them(tmp_path, capsys):
    """Invariant 1 with a hole: --fill-missing gives exactly the whole-volume result of the input
    with that chunk set to zero, and the summary counts the chunks filled."""
    url, data, _ = _holey(tmp_path)
    out = f"file://{tmp_path / 'out'}"
    assert _run("--input", url, "--output", out, "--fill-missing", *FLAGS[:-1]) == 0
    summary = capsys.readouterr().out
    assert "missing chunks read as zeros" in summary
    zeroed = data.copy()
    zeroed[:, 8:16, 0:32, 32:64] = 0
    explicit = create_volume(f"file://{tmp_path / 'zeroed'}", BOX, (8, 32, 32), 1, "float32")
    explicit.write(BOX, zeroed)
    cli.main(["reference", "--input", f"file://{tmp_path / 'zeroed'}", "--output", f"file://{tmp_path / 'ref'}",
              *FLAGS[:6], "--quiet"])
    got = open_volume(out).read(BOX)
    ref = open_volume(f"file://{tmp_path / 'ref'}").read(BOX)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_a_model_that_returns_nan_is_refused_for_the_block(tmp_path, capsys):
    url, _ = make_input(tmp_path / "em", (16, 64, 64), seed=6)
    model = tmp_path / "nan.py"
    model.write_text("import torch\n\n\nclass NaNWhereBright(torch.nn.Module):\n"
                     "    def forward(self, x):\n        return torch.where(x > 0.9999, x * float('nan'), x)\n\n\n"
                     "def build_model():\n    return NaNWhereBright()\n")
    out = tmp_path / "out"
    flags = ["--model", str(model), *FLAGS[2:]]
    status = _run("--input", url, "--output", f"file://{out}", *flags)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and err
    assert all("NaN or Inf" in line and "inference-and-donate" in line for line in err[:-1]), err
    assert "receive-and-blend not started" in err[-1]
    failed = list((tmp_path / "out.donations" / "failed" / "stage1").iterdir())
    assert len(failed) == len(err) - 1
    assert all("NaN or Inf" in json.loads(f.read_text())["error"] for f in failed)
    written = open_volume(f"file://{out}").read(BOX)
    assert np.isfinite(written).all(), "a NaN reached the output"


@pytest.mark.skipif(os.environ.get("CHUNKFLOW_DEBUG") is not None, reason="CHUNKFLOW_DEBUG re-raises")
def test_an_existing_sharded_output_is_refused(tmp_path, capsys):
    from cloudvolume import CloudVolume

    url, _ = make_input(tmp_path / "em", (16, 64, 64), seed=7)
    info = CloudVolume.create_new_info(num_channels=1, layer_type="image", data_type="float32", encoding="raw",
                                       resolution=[8, 8, 40], voxel_offset=[0, 0, 0], volume_size=[64, 64, 16],
                                       chunk_size=[32, 32, 16])
    info["scales"][0]["sharding"] = {"@type": "neuroglancer_uint64_sharded_v1", "preshift_bits": 0,
                                     "hash": "identity", "minishard_bits": 0, "shard_bits": 0,
                                     "minishard_index_encoding": "raw", "data_encoding": "raw"}
    CloudVolume(f"precomputed://file://{tmp_path / 'sharded'}", info=info).commit_info()
    status = _run("--input", url, "--output", f"file://{tmp_path / 'sharded'}", *FLAGS)
    assert status == 2 and "sharded" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == ["info"]
    assert not (tmp_path / "sharded.donations").exists()
