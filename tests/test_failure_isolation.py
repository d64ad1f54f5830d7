"""A failed task does not stop the others: refused blocks (missing or corrupt donations, a store
that refuses a write) are reported in one line each at the end, with a non-zero exit status,
and every other block is still blended exactly; in streaming order a block whose donor's stage
one failed is not blended; in barrier order stage two does not start; an unexpected error is one
line with its type (exit 1), or its traceback with CHUNKFLOW_DEBUG. Real files, real Dask workers."""
from __future__ import annotations

import json
from pathlib import Path

import fire
import numpy as np
import pytest

from chunkflow.bbox import Bbox, Vec
from chunkflow.cli import COMMANDS
from chunkflow.cli.stages import main as stage_main
from chunkflow.planning import plan
from chunkflow.stages import DONATIONS, Resources, reference
from chunkflow.storage import open_store, open_volume
from chunkflow.units import count
from tests.helpers import make_input
from tests.test_engines_support import SHAPE, assert_complete_and_exact, run_flags, small_job

PICKY_MODEL = '''
import torch
from torch import nn


class Picky(nn.Module):
    """The identity, except that it raises on an input voxel of exactly 7 (a bug, as far as chunkflow knows)."""

    def forward(self, x):
        if bool((x == 7).any()):
            raise RuntimeError("sentinel voxel in the input")
        return x


def build_model():
    return Picky()
'''


def _errors(capsys) -> tuple[str, list[str]]:
    captured = capsys.readouterr()
    return captured.out, [line for line in captured.err.splitlines() if line.strip()]


def _names(job, blocks) -> set[str]:
    return {job.layout.block_box(b).name for b in blocks}


def _done(job, stage: int) -> set[str]:
    prefix = f"done/stage{stage}/"
    return {n[len(prefix):] for n in open_store(job.store).list(prefix)}


def _exact_on(job, blocks) -> None:
    output = open_volume(job.output).read(job.layout.bbox)
    expected = reference(job, Resources(job))
    for idx in blocks:
        sl = (slice(None),) + job.layout.block_box(idx).slices(job.layout.bbox)
        np.testing.assert_allclose(output[sl], expected[sl], rtol=0, atol=1e-5)


def _bands(job, blocks) -> list[np.ndarray]:
    output = open_volume(job.output)
    return [output.read(band) for b in blocks for band in job.layout.band_boxes(b)]


def _damage(job) -> tuple[list[Vec], list[str]]:
    """Stage one done; then one donation of block A deleted and one of block B corrupted, through the store."""
    stage_main(1, ["run", job.store, "--quiet"])
    store = open_store(job.store)
    a, b = [idx for idx in job.layout.block_indices() if len(job.layout.donations_to(idx)) >= 2][:2]
    deleted, corrupted = job.layout.donations_to(a)[0].key, job.layout.donations_to(b)[1].key
    store.delete(DONATIONS + deleted)
    data = bytearray(store.get(DONATIONS + corrupted))
    data[-5] ^= 0xFF
    store.put(DONATIONS + corrupted, bytes(data))
    return [a, b], [deleted, corrupted]


def _check_refused(job, out: str, err: list[str], refused, keys, before) -> None:
    """One line per refused block naming its bad donation; the others done and exact; the refused
    ones keep their failed marker and wrote nothing."""
    errors = [line for line in err if line.startswith("chunkflow: error: ")]
    assert len(errors) == 2, err
    for block, key, why in zip(refused, keys, ("1 missing: ", "1 refused: ")):
        name = job.layout.block_box(block).name
        [line] = [e for e in errors if key in e]
        assert line.startswith(f"chunkflow: error: receive-and-blend {name}: block {name} cannot be blended, "
                               f"donations {why}")
    assert "checksum" in errors[0] + errors[1]
    assert "2 failed" in out, out
    others = [b for b in job.layout.block_indices() if b not in refused]
    assert _done(job, 2) == _names(job, others)  # every other block blended...
    _exact_on(job, others)  # ...correctly
    store = open_store(job.store)
    for name in _names(job, refused):
        assert json.loads(store.get(f"failed/stage2/{name}"))["error"].startswith(f"block {name} cannot be blended")
    for was, now in zip(before, _bands(job, refused)):  # the refused blocks wrote nothing
        assert np.array_equal(was, now)


def test_stage_two_refuses_damaged_blocks_and_blends_all_the_others(tmp_path, capsys):
    job = small_job(tmp_path)
    refused, keys = _damage(job)
    before = _bands(job, refused)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        stage_main(2, ["run", job.store, "--blocks", "all", "--quiet"])
    assert exit_.value.code == 2
    out, err = _errors(capsys)
    assert len(err) == 2 and "stage two: 6 blocks run, 0 already done" in out, (out, err)
    _check_refused(job, out, err, refused, keys, before)


@pytest.mark.parametrize("engine", ["local", "dask"])
def test_run_reports_refused_blocks_and_blends_all_the_others(tmp_path, capsys, engine):
    job = small_job(tmp_path)
    refused, keys = _damage(job)
    before = _bands(job, refused)
    capsys.readouterr()
    flags = ["--engine", "dask", "--workers", "2"] if engine == "dask" else []
    with pytest.raises(SystemExit) as exit_:
        fire.Fire(COMMANDS, ["run", *run_flags(job), "--quiet", *flags])
    assert exit_.value.code == 2
    out, err = _errors(capsys)
    assert "stage one: 0 tasks run, 8 already done" in out and "stage two: 6 tasks run, 0 already done" in out
    _check_refused(job, out, err, refused, keys, before)
    if engine == "dask":  # a refusal is not retried
        for name in _names(job, refused):
            assert json.loads(open_store(job.store).get(f"failed/stage2/{name}"))["attempt"] == 1


def _unwritable_donation(job) -> tuple[Vec, Path]:
    """A directory where one of donor D's donations goes: stage one of D fails (the store refuses the write)."""
    donor = next(idx for idx in job.layout.block_indices()
                 if 1 < sum(idx in job.layout.dependencies(b) for b in job.layout.block_indices()) < 8)
    blocker = open_store(job.store).root / "donations" / job.layout.donations_from(donor)[0].key
    blocker.mkdir(parents=True)
    (blocker / "in-the-way").write_text("x")
    return donor, blocker


@pytest.mark.parametrize("engine", ["local", "dask"])
def test_streaming_does_not_blend_blocks_whose_donor_failed(tmp_path, capsys, engine):
    model = "conv3" if engine == "local" else "identity"
    job = small_job(tmp_path, model)
    donor, blocker = _unwritable_donation(job)
    blocked = [b for b in job.layout.block_indices() if donor in job.layout.dependencies(b)]
    flags = ["--engine", "dask", "--workers", "2"] if engine == "dask" else []
    with pytest.raises(SystemExit) as exit_:
        fire.Fire(COMMANDS, ["run", *run_flags(job, model), "--mode", "streaming", "--quiet", *flags])
    assert exit_.value.code == 2
    out, err = _errors(capsys)
    errors = [line for line in err if line.startswith("chunkflow: error: ")]
    name = job.layout.block_box(donor).name
    assert errors[0].startswith(f"chunkflow: error: inference-and-donate {name}: cannot write donations/")
    assert sorted(errors[1:]) == sorted(f"chunkflow: error: receive-and-blend {n} not run: stage one of {name} failed"
                                        for n in _names(job, blocked))
    assert "1 failed" in out and f"{len(blocked)} not run" in out
    assert _done(job, 1) == _names(job, [b for b in job.layout.block_indices() if b != donor])
    others = [b for b in job.layout.block_indices() if b not in blocked]
    assert _done(job, 2) == _names(job, others)
    _exact_on(job, others)
    if engine == "dask":  # a refusal is not retried
        assert json.loads(open_store(job.store).get(f"failed/stage1/{name}"))["attempt"] == 1

    (blocker / "in-the-way").unlink()
    blocker.rmdir()
    fire.Fire(COMMANDS, ["run", *run_flags(job, model), "--mode", "streaming", "--quiet", *flags])
    assert f"stage two: {count(len(blocked), 'task')} run, {8 - len(blocked)} already done" in capsys.readouterr().out
    assert_complete_and_exact(job)


def test_barrier_does_not_start_stage_two_after_a_stage_one_failure(tmp_path, capsys):
    job = small_job(tmp_path)
    donor, _ = _unwritable_donation(job)
    with pytest.raises(SystemExit) as exit_:
        fire.Fire(COMMANDS, ["run", *run_flags(job), "--quiet"])
    assert exit_.value.code == 2
    out, err = _errors(capsys)
    name = job.layout.block_box(donor).name
    assert len(err) == 2 and err[0].startswith(f"chunkflow: error: inference-and-donate {name}: cannot write"), err
    assert err[1].startswith("chunkflow: error: receive-and-blend not started: stage one failed for 1 block;")
    assert "stage one: 7 tasks run" in out and "stage two: not started" in out
    assert len(_done(job, 1)) == 7 and not _done(job, 2)


def _picky_job(tmp_path):
    model = tmp_path / "picky.py"
    model.write_text(PICKY_MODEL)
    url, data = make_input(tmp_path / "in", SHAPE, seed=4, chunk=(8, 16, 16))
    data[0, 14, 60, 60] = 7.0  # in the last block, far from the others
    open_volume(url).write(open_volume(url).bbox, data)
    return plan(url, f"file://{tmp_path / 'out'}", str(tmp_path / "job"), str(model), "8,32,32", overlap="2,8,8",
                block="8,32,32", storage_chunk="8,16,16")


def test_an_unexpected_error_is_one_line_with_its_type_and_exit_1(tmp_path, capsys, monkeypatch):
    job = _picky_job(tmp_path)
    argv = ["run", job.input, job.output, job.model, "8,32,32", "--overlap", "2,8,8", "--block", "8,32,32",
            "--donations", job.store, "--mode", "streaming", "--quiet"]
    with pytest.raises(SystemExit) as exit_:
        fire.Fire(COMMANDS, argv)
    assert exit_.value.code == 1
    out, err = _errors(capsys)
    last = job.layout.block_box(Vec(1, 1, 1)).name
    assert err == [f"chunkflow: error: inference-and-donate {last} failed with an unexpected RuntimeError: sentinel "
                   "voxel in the input (CHUNKFLOW_DEBUG=1 for the traceback)",
                   f"chunkflow: error: receive-and-blend {last} not run: stage one of {last} failed"], err
    assert len(_done(job, 1)) == len(_done(job, 2)) == 7  # the others ran
    assert "1 failed" in out and "1 not run" in out
    monkeypatch.setenv("CHUNKFLOW_DEBUG", "1")
    with pytest.raises(RuntimeError, match="sentinel voxel"):
        fire.Fire(COMMANDS, argv)


# ---- stage two run before stage one -----------------------------------------------------------------

def _tree(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and directory (None) under ``root``."""
    return {p.relative_to(root).as_posix(): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def _stage_two_refused(capsys, job, blocks: str, *flags: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        stage_main(2, ["run", job.store, "--blocks", blocks, "--quiet", *flags])
    assert exit_.value.code == 2
    out, err = _errors(capsys)
    assert out == "" and len(err) == 1 and err[0].startswith("chunkflow: error: stage one is not done for "), (out, err)
    return err[0]


@pytest.mark.parametrize("blocks, message", [
    ("all", "8 of the 8 blocks of the job (first: 0-32_0-32_0-8)"),
    # its only dependency is itself: no donations to miss, but its own core is not written yet
    ("0-32_0-32_0-8", "1 of the 1 block the selected blocks depend on (first: 0-32_0-32_0-8)"),
    ("32-64_32-64_8-16,0-32_0-32_8-16", "8 of the 8 blocks the selected blocks depend on (first: 0-32_0-32_0-8)"),
])
@pytest.mark.parametrize("flags", [[], ["--force"], ["--cleanup"]], ids=["plain", "force", "cleanup"])
def test_stage_two_before_stage_one_is_one_line_and_writes_nothing(tmp_path, capsys, blocks, message, flags):
    job = small_job(tmp_path)
    before = _tree(tmp_path)
    line = _stage_two_refused(capsys, job, blocks, *flags)
    assert message in line and f"python -m inference_and_donate run {job.store}" in line, line
    assert _tree(tmp_path) == before  # no marker, log entry, summary or output chunk


def test_stage_two_runs_once_the_stage_one_of_its_dependencies_is_done(tmp_path, capsys):
    """Stage one done for two blocks, the second one's log entry lost (a worker killed between its done
    marker and its log entry) and absent from the done checkpoint: stage two of a block that depends on
    those two runs; one that also depends on a block not done is refused and writes nothing."""
    job = small_job(tmp_path)
    store = open_store(job.store)
    first, second, pending = "0-32_0-32_0-8", "32-64_0-32_0-8", "0-32_32-64_0-8"
    stage_main(1, ["run", job.store, "--blocks", first, "--quiet"])
    from chunkflow.done_log import done_set
    from chunkflow.store_layout import log_prefix, summary_name

    done_set(store, 1, job)  # a checkpoint that counts only the first block
    checkpoint = store.get(summary_name(1))
    stage_main(1, ["run", job.store, "--blocks", second, "--quiet"])
    store.put(summary_name(1), checkpoint)
    for name in store.list(log_prefix(1)):
        if name.endswith("/" + second):
            store.delete(name)
    capsys.readouterr()
    before = _tree(tmp_path)
    line = _stage_two_refused(capsys, job, pending)
    assert f"1 of the 2 blocks the selected blocks depend on (first: {pending})" in line, line
    assert _tree(tmp_path) == before
    stage_main(2, ["run", job.store, "--blocks", second, "--quiet"])
    pieces = len(job.layout.donations_to(job.layout.block_index_of(Bbox.from_name(second))))
    assert pieces and f"stage two: 1 block run, 0 already done, {pieces} pieces received, " in capsys.readouterr().out
    assert _done(job, 2) == {second}
