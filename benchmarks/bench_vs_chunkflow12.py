"""chunkflow 2 against chunkflow 1.2.0 (from PyPI) over the same blocks of the same volume.

chunkflow 1.2.0 runs in its own virtual environment (default ``/tmp/cf12venv``), made on first
use with::

    python -m venv /tmp/cf12venv
    /tmp/cf12venv/bin/pip install torch==2.13.0
    /tmp/cf12venv/bin/pip install chunkflow==1.2.0 opencv-python-headless

Both sides run the same network with the same weights (``bench_unet.py``, or with ``--model
membrane`` the trained demo U-Net; the state dict is saved to a file and loaded by each), the same
patch, overlap, block grid and batch size, and the original chunkflow bump map (``--blend bump``
here; ``wu`` there). 1.2.0 does what its CLI does by default: each block's input is grown by a
crop margin equal to the patch overlap, patches are laid from the grown chunk's corner, and the
margin is cropped from the output. chunkflow 2 runs its two
stages; its output equals its whole-volume reference within 1e-5 (Invariant 1, tested by the
suite), and ``--reference`` runs that reference here too. Reported: patches computed (vs the
global grid), time (wall and CPU), and the max abs difference of each output to the reference,
within 4 voxels of an inner block face and elsewhere (away from the volume's faces, where the two
pad differently), and how much larger the step between neighbouring voxels is across inner block
faces than elsewhere (a seam).

    python benchmarks/bench_vs_chunkflow12.py               # 64x512x512, blocks 32x256x256
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fire
import numpy as np
import torch

from common import BENCH_NET, HERE, ROOT, Timed, choice, make_input, run_two_stage, save, scratch, zyx
from chunkflow.backends import load_backend
from chunkflow.bbox import Vec
from chunkflow.planning import plan
from chunkflow.stages import Resources, reference as whole_volume_reference
from chunkflow.storage import open_volume

VENV_STEPS = (["-m", "venv"], ["pip", "install", "torch==2.13.0"],
              ["pip", "install", "chunkflow==1.2.0", "opencv-python-headless"])


def ensure_venv(venv: Path) -> Path:
    """The venv's python with chunkflow 1.2.0 importable; made if missing. Raises with pip's words."""
    python = venv / "bin" / "python"
    probe = [str(python), "-P", "-c", "import chunkflow.__version__ as v; "
             "from chunkflow.flow.divid_conquer.inferencer import Inferencer; print(v.version)"]
    if python.exists() and subprocess.run(probe, capture_output=True, cwd="/").returncode == 0:
        return python
    for step in VENV_STEPS:
        cmd = [sys.executable, *step, str(venv)] if step[0] == "-m" else [str(venv / "bin" / step[0]), *step[1:]]
        print("  $", " ".join(cmd), flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"making the chunkflow 1.2.0 venv failed at {' '.join(cmd)}:\n{done.stderr[-3000:]}")
    done = subprocess.run(probe, capture_output=True, text=True, cwd="/")
    if done.returncode:
        raise SystemExit(f"chunkflow 1.2.0 installed but does not import:\n{done.stderr[-3000:]}")
    return python


def near_inner_faces(shape: Vec, block: Vec, width: int = 4) -> np.ndarray:
    """True within ``width`` voxels of an inner block face (where crop-and-stitch seams live)."""
    mask = np.zeros(tuple(shape), dtype=bool)
    for a in range(3):
        coord = np.arange(shape[a])
        near = np.zeros(shape[a], dtype=bool)
        for face in range(block[a], shape[a], block[a]):
            near |= np.abs(coord - face + 0.5) < width
        view = [None, None, None]
        view[a] = slice(None)
        mask |= near[tuple(view)]
    return mask


def inside(shape: Vec, margin: Vec) -> np.ndarray:
    """True farther than ``margin`` from the volume's faces (where both tools pad differently)."""
    mask = np.zeros(tuple(shape), dtype=bool)
    mask[tuple(slice(m, s - m) for m, s in zip(margin, shape))] = True
    return mask


def face_jump(volume: np.ndarray, block: Vec, margin: Vec) -> float:
    """Per axis, the mean |step| between neighbouring voxels across inner block faces over the mean
    step elsewhere along that axis, averaged over the axes (1.0: the faces are invisible; a seam
    makes it larger). Per axis, because steps along z are larger than in-plane ones in anisotropic
    EM. Volume-face margins are left out."""
    ratios = []
    for a in range(3):
        faces = list(range(block[a], volume.shape[a], block[a]))
        if not faces:
            continue
        step = np.abs(np.diff(volume, axis=a))
        keep = [slice(m, s - m) for m, s in zip(margin, volume.shape)]
        keep[a] = slice(None)
        step = np.moveaxis(step[tuple(keep)], a, 0)
        at = np.zeros(step.shape[0], dtype=bool)
        at[[f - 1 for f in faces]] = True
        ratios.append(float(step[at].mean() / step[~at].mean()))
    return float(np.mean(ratios))


def _max(values: np.ndarray) -> float:
    return float(values.max()) if values.size else float("nan")


def main(shape: str | tuple = "64,512,512", patch: str | tuple = "16,128,128", overlap: str | tuple = "4,32,32",
         block: str | tuple = "32,256,256", batch: int = 1, model: str = "bench", venv: str = "/tmp/cf12venv",
         reference: bool = False, workdir: str | None = None) -> None:
    """chunkflow 2 against chunkflow 1.2.0 (from PyPI) over the same blocks of the same volume.

    Args:
        shape: volume, ZYX (64,512,512 or 64x512x512): a synthetic EM volume, uint8.
        patch: patch, ZYX.
        overlap: patch overlap, ZYX (also 1.2.0's crop margin).
        block: block, ZYX (the same grid for both).
        batch: patches per forward pass (both).
        model: bench: bench_unet.py (random); membrane: the trained demo U-Net (builtin:membrane).
        venv: chunkflow 1.2.0's virtual environment (made on first use).
        reference: also run chunkflow 2's whole-volume reference (a switch: --reference).
        workdir: keep the volumes, weights and outputs here (default: a temporary directory, removed).
    """
    patch_text, overlap_text, block_text = zyx(patch, "patch"), zyx(overlap, "overlap"), zyx(block, "block")
    shape, patch, overlap, block = (Vec.parse(v) for v in (shape, patch_text, overlap_text, block_text))
    batch, model_name = int(batch), choice(model, ("bench", "membrane"), "model")
    reference_run = bool(reference)
    python = ensure_venv(Path(str(venv)))
    workdir = scratch("cf-bench-cf12-", None if workdir is None else str(workdir))
    url, _ = make_input(workdir, tuple(shape))
    model = BENCH_NET if model_name == "bench" else "builtin:membrane"
    net_file = HERE / "bench_unet.py" if model_name == "bench" else ROOT / "chunkflow" / "demo" / "unet.py"
    backend = load_backend(model)
    weights = workdir / "weights.pt"
    torch.save(backend.module.state_dict(), weights)

    job = plan(url, f"file://{workdir / 'ours'}", str(workdir / "job"), model, patch_text, overlap=overlap_text,
               block=block_text, blend="bump", batch_size=batch)
    ours = run_two_stage(job, backend)
    print(f"  chunkflow 2: {ours.wall:.2f} s wall, {ours.cpu:.2f} s CPU, {ours.stats1.patches} patches", flush=True)

    # one JSON argument: the driver runs in 1.2.0's venv, where fire (not a dependency of 1.2.0) may be missing
    driver_options = {"input": url, "output": f"file://{workdir / 'cf12'}", "net": str(net_file),
                      "weights": str(weights), "adapter": str(workdir / "cf12_model.py"), "patch": list(patch),
                      "overlap": list(overlap), "block": list(block), "batch": batch}
    cmd = [str(python), "-P", str(HERE / "cf12_driver.py"), json.dumps(driver_options)]
    with Timed() as whole:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
    if done.returncode:
        raise SystemExit(f"chunkflow 1.2.0 failed:\n{done.stderr[-3000:]}")
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  chunkflow {theirs['version']}: {theirs['wall']:.2f} s wall, {theirs['cpu']:.2f} s CPU, "
          f"{theirs['patches']} patches (process {whole.wall:.2f} s)", flush=True)
    cf12 = open_volume(f"file://{workdir / 'cf12'}").read(job.layout.bbox)

    if reference_run:
        with Timed() as tref:
            ref = whole_volume_reference(job, Resources(job, backend))
        print(f"  reference: {tref.wall:.2f} s", flush=True)
    else:
        ref = ours.output
    core = inside(shape, overlap)
    near = near_inner_faces(shape, block) & core
    far = ~near & core
    err = np.abs(cf12 - ref)[0]
    layout = job.layout
    record = {
        "model": model, "shape": list(shape), "patch": list(patch), "overlap": list(overlap), "block": list(block),
        "batch": batch, "blocks": layout.num_blocks, "patches_grid": layout.num_patches,
        "ours_patches": ours.stats1.patches, "cf12_patches": theirs["patches"], "cf12_version": theirs["version"],
        "ours_wall": round(ours.wall, 3), "ours_cpu": round(ours.cpu, 3),
        "ours_model": round(ours.stats1.seconds["model"], 3),
        "cf12_wall": round(theirs["wall"], 3), "cf12_cpu": round(theirs["cpu"], 3),
        "ratio_wall": round(ours.wall / theirs["wall"], 4), "ratio_cpu": round(ours.cpu / theirs["cpu"], 4),
        "reference_run": reference_run,
        "ours_max_diff": float(np.abs(ours.output - ref).max()),
        "cf12_max_diff": float(err.max()), "cf12_mean_diff": float(err.mean()),
        "cf12_max_diff_near_faces": _max(err[near]), "cf12_mean_diff_near_faces": float(err[near].mean()),
        "cf12_max_diff_elsewhere": _max(err[far]), "cf12_mean_diff_elsewhere": float(err[far].mean()),
        "face_jump_reference": face_jump(ref[0], block, overlap),
        "face_jump_ours": face_jump(ours.output[0], block, overlap),
        "face_jump_cf12": face_jump(cf12[0], block, overlap),
    }
    grid = layout.num_patches
    print(f"patches computed / grid: chunkflow 2 {ours.stats1.patches}/{grid} = {ours.stats1.patches / grid:.3f}; "
          f"chunkflow 1.2.0 {theirs['patches']}/{grid} = {theirs['patches'] / grid:.3f}")
    print(f"time: chunkflow 2 {ours.wall:.2f} s vs 1.2.0 {theirs['wall']:.2f} s wall "
          f"(ratio {record['ratio_wall']:.3f}); CPU {ours.cpu:.2f} s vs {theirs['cpu']:.2f} s "
          f"(ratio {record['ratio_cpu']:.3f})")
    what = ("the whole-volume reference" if reference_run
            else "the reference (chunkflow 2's output, = reference by Invariant 1)")
    print(f"max |output - {what}|: chunkflow 2 {record['ours_max_diff']:.2e}; chunkflow 1.2.0 "
          f"{record['cf12_max_diff']:.2e} (mean {record['cf12_mean_diff']:.2e})")
    print(f"  1.2.0 farther than one overlap from the volume's faces: within 4 voxels of an inner block face max "
          f"{record['cf12_max_diff_near_faces']:.2e} mean {record['cf12_mean_diff_near_faces']:.2e}; elsewhere max "
          f"{record['cf12_max_diff_elsewhere']:.2e} mean {record['cf12_mean_diff_elsewhere']:.2e}")
    print(f"  step across inner block faces / step elsewhere: reference {record['face_jump_reference']:.2f}, "
          f"chunkflow 2 {record['face_jump_ours']:.2f}, chunkflow 1.2.0 {record['face_jump_cf12']:.2f}")
    print(f"recorded in {save('vs_chunkflow12', record)}")


if __name__ == "__main__":
    fire.Fire(main)
