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
crop margin equal to the patch overlap, patches are laid from the grown chunk's corner (its own
grid per block), and the margin is cropped from the output. chunkflow 2 runs its two stages; its
output equals its whole-volume reference within 1e-5 (Invariant 1, tested by the suite), and
``--reference`` runs that reference here too.

Reported:

- time: ``--repeat N`` runs the two tools interleaved (1.2.0, chunkflow 2, 1.2.0, ...); the ratio
  chunkflow 2 / 1.2.0 of each pair, wall and CPU, as median and min-max (a shared machine moves
  single runs by tens of percent);
- patches computed, for this volume, and from the geometry alone (no inference) for
  production-shaped volumes (``--production``, same patch, overlap and block): totals and the
  patches of one interior block. Per axis 1.2.0 computes ``ceil((block + overlap) / stride)``
  patches per block, the global grid ``block / stride`` on average, so the ratio tends to their
  product (1.42 with the defaults) as the volume grows; small volumes show more;
- the max and mean |difference| of 1.2.0's output to the reference, split into the region near
  the volume's faces (within ``patch - overlap``, where 1.2.0's patches read reflect padding and
  the reference's end flush with the volume) and the interior, and in the interior near inner
  block faces (a seam) vs elsewhere, with the step across inner block faces over the step
  elsewhere;
- with ``--anchored`` (on by default), what the rest of the difference is: chunkflow's exact
  blending (``chunkflow.sliding_window``, normalised by the true weight sum) of each block's grown,
  reflect-padded input on 1.2.0's own per-block grid, cropped as 1.2.0 crops it. 1.2.0 equal to
  that within float32 rounding means its blending is right and its difference to the reference
  is where its patches sit (each block anchors its grid at its own grown corner), not an error in
  how it blends them.

Both processes run with ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it: on a shared
machine, torch's spinning OpenMP team is starved in the thread that first called torch (1.2.0
calls its model from the main thread, chunkflow 2 from worker threads), which made 1.2.0 look
slower than it is.

    python benchmarks/bench_vs_chunkflow12.py --repeat 3     # 64x512x512, blocks 32x256x256
    python benchmarks/bench_vs_chunkflow12.py --counts-only  # the patch counts alone, no inference
"""
from __future__ import annotations

import os

# A spinning OpenMP team is starved on a shared machine, and only in the thread that calls torch
# first (the main thread: 1.2.0's whole run; chunkflow 2 calls its model from worker threads):
# measured 4-10x slower per batch there under load, against none with PASSIVE. Both tools (the
# driver inherits the environment) wait passively unless OMP_WAIT_POLICY says otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import itertools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import fire  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import (BENCH_NET, HERE, ROOT, Timed, choice, make_input, run_two_stage, save, scratch,  # noqa: E402
                    zyx, zyx_list)
import chunkflow  # noqa: E402
from chunkflow import Bbox, Vec  # noqa: E402
# the model is loaded once and reused: its weights are saved for 1.2.0, it runs both stages
# (run_two_stage) and the timed reference, so the reference's time excludes loading it; the API's
# chunkflow.reference(job) loads the job's model itself, inside that time
from chunkflow.backends import load_backend  # noqa: E402
from chunkflow.stages import Resources, reference as whole_volume_reference  # noqa: E402
# patch counts of production layouts, without a job or a volume
from chunkflow.geometry import Layout  # noqa: E402
# reads 1.2.0's output: the API has no volume I/O
from chunkflow.storage import open_volume  # noqa: E402

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


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def cf12_axis_counts(length: int, patch: int, overlap: int, block: int) -> list[int]:
    """Patches 1.2.0 lays along one axis in each block: from the corner of the block grown by the
    overlap on both sides, stride ``patch - overlap``, the last moved flush (its
    ``_construct_patch_slices_list``): ``ceil((grown - overlap) / stride)``."""
    stride = patch - overlap
    counts = []
    for start in range(0, length, block):
        grown = min(block, length - start) + 2 * overlap
        counts.append(-(-(grown - overlap) // stride))
    return counts


def patch_counts(shape: Vec, patch: Vec, overlap: Vec, block: Vec) -> dict:
    """Patches computed by each tool over ``shape``, from the geometry alone, and those of one
    interior block (``nan`` for chunkflow 2 where no block is interior along an axis)."""
    layout = Layout(Bbox(Vec(0, 0, 0), shape), patch, overlap, block)
    ours_axes = [[len(ax.origins[slice(*ax.own(k))]) for k in range(ax.num_blocks)] for ax in layout.axes]
    cf12_axes = [cf12_axis_counts(shape[a], patch[a], overlap[a], block[a]) for a in range(3)]
    ours, cf12 = layout.num_patches, int(np.prod([sum(c) for c in cf12_axes]))
    inner_ours = float(np.prod([np.mean(c[1:-1]) if len(c) > 2 else np.nan for c in ours_axes]))
    inner_cf12 = int(np.prod([c[len(c) // 2] for c in cf12_axes]))
    aligned = all((min(block[a], shape[a]) + overlap[a]) % (patch[a] - overlap[a]) == 0 for a in range(3))
    return {"shape": list(shape), "blocks": layout.num_blocks, "ours": ours, "cf12": cf12,
            "ratio": round(cf12 / ours, 4), "ours_per_interior_block": round(inner_ours, 3),
            "cf12_per_interior_block": inner_cf12, "cf12_aligned": aligned}


def near_volume_faces(shape: Vec, width: Vec) -> np.ndarray:
    """True within ``width`` voxels of a face of the volume."""
    return ~inside(shape, width)


def grown_block(image: np.ndarray, lo: tuple, hi: tuple, margin: Vec) -> np.ndarray:
    """The block ``[lo, hi)`` of ``image`` grown by ``margin``, reflect-padded past the volume's
    faces, as cf12_driver.py reads it for 1.2.0."""
    glo = [a - m for a, m in zip(lo, margin)]
    ghi = [a + m for a, m in zip(hi, margin)]
    ilo = [max(a, 0) for a in glo]
    ihi = [min(a, s) for a, s in zip(ghi, image.shape)]
    raw = image[tuple(slice(a, b) for a, b in zip(ilo, ihi))]
    return np.pad(raw, [(i - g, h - j) for g, i, j, h in zip(glo, ilo, ihi, ghi)], mode="reflect")


def anchored_reference(image: np.ndarray, predict, patch: Vec, overlap: Vec, block: Vec, batch: int) -> np.ndarray:
    """chunkflow's exact blending on 1.2.0's grid: per block, ``sliding_window`` of the grown
    block (its grid starts at the grown corner, as 1.2.0's does; normalised by the true weight
    sum), cropped by the overlap. Every patch is run (1.2.0 skips none)."""
    out = np.zeros((1, *image.shape), dtype=np.float32)
    for lo in itertools.product(*(range(0, s, b) for s, b in zip(image.shape, block))):
        hi = tuple(min(a + b, s) for a, b, s in zip(lo, block, image.shape))
        chunk = grown_block(image, lo, hi, overlap)
        blended = chunkflow.sliding_window(chunk[None], predict, tuple(patch), overlap=tuple(overlap), blend="bump",
                                           batch_size=batch, skip_blank=False)
        crop = tuple(slice(m, m + b - a) for m, a, b in zip(overlap, lo, hi))
        out[(slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi))] = blended[(slice(None),) + crop]
    return out


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "all": [round(v, 4) for v in values]}


def run_cf12(python: Path, options: dict) -> dict:
    """One run of cf12_driver.py in 1.2.0's venv; its JSON line."""
    cmd = [str(python), "-P", str(HERE / "cf12_driver.py"), json.dumps(options)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
    if done.returncode:
        raise SystemExit(f"chunkflow 1.2.0 failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_counts(rows: list[dict]) -> None:
    print("patches computed (from the geometry; chunkflow 2 = the global grid):")
    for r in rows:
        shape = "x".join(str(v) for v in r["shape"])
        inner = "-" if r["ours_per_interior_block"] != r["ours_per_interior_block"] else \
            f"{r['ours_per_interior_block']:.2f} (mean)"
        print(f"  {shape:>15}, {r['blocks']:5d} blocks: chunkflow 2 {r['ours']:7d}, 1.2.0 {r['cf12']:7d} = "
              f"{r['ratio']:.3f}x; per interior block: {inner} vs "
              f"{r['cf12_per_interior_block']}{'' if r['cf12_aligned'] else ' (1.2.0 would refuse: not aligned)'}")


def main(shape: str | tuple = "64,512,512", patch: str | tuple = "16,128,128", overlap: str | tuple = "4,32,32",
         block: str | tuple = "32,256,256", batch: int = 1, model: str = "bench", venv: str = "/tmp/cf12venv",
         repeat: int = 1, reference: bool = False, anchored: bool = True,
         production: str = "96,768,768;320,2560,2560", counts_only: bool = False,
         workdir: str | None = None) -> None:
    """chunkflow 2 against chunkflow 1.2.0 (from PyPI) over the same blocks of the same volume.

    Args:
        shape: volume, ZYX (64,512,512 or 64x512x512): a synthetic EM volume, uint8.
        patch: patch, ZYX.
        overlap: patch overlap, ZYX (also 1.2.0's crop margin).
        block: block, ZYX (the same grid for both).
        batch: patches per forward pass (both).
        model: bench: bench_unet.py (random); membrane: the trained demo U-Net (builtin:membrane).
        venv: chunkflow 1.2.0's virtual environment (made on first use).
        repeat: runs of each tool, interleaved (1.2.0 first in each pair).
        reference: also run chunkflow 2's whole-volume reference (a switch: --reference).
        anchored: also blend each block on 1.2.0's own grid with chunkflow (--noanchored: skip it).
        production: volumes (ZYX, ``;``-separated) whose patch counts are computed from the geometry.
        counts_only: print the patch counts and stop (no venv, no inference).
        workdir: keep the volumes, weights and outputs here (default: a temporary directory, removed).
    """
    patch_text, overlap_text, block_text = zyx(patch, "patch"), zyx(overlap, "overlap"), zyx(block, "block")
    shape, patch, overlap, block = (Vec.parse(v) for v in (shape, patch_text, overlap_text, block_text))
    batch, repeat, model_name = int(batch), int(repeat), choice(model, ("bench", "membrane"), "model")
    if repeat < 1:
        raise SystemExit("error: --repeat must be at least 1")
    counts = [patch_counts(s, patch, overlap, block) for s in [shape] + [Vec.parse(v) for v in zyx_list(production)]]
    print_counts(counts)
    if counts_only:
        return
    python = ensure_venv(Path(str(venv)))
    workdir = scratch("cf-bench-cf12-", None if workdir is None else str(workdir))
    url, image = make_input(workdir, tuple(shape))
    model = BENCH_NET if model_name == "bench" else "builtin:membrane"
    net_file = HERE / "bench_unet.py" if model_name == "bench" else ROOT / "chunkflow" / "demo" / "unet.py"
    backend = load_backend(model)
    weights = workdir / "weights.pt"
    torch.save(backend.module.state_dict(), weights)
    # one JSON argument: the driver runs in 1.2.0's venv, where fire (not a dependency of 1.2.0) may be missing
    driver_options = {"input": url, "output": f"file://{workdir / 'cf12'}", "net": str(net_file),
                      "weights": str(weights), "adapter": str(workdir / "cf12_model.py"), "patch": list(patch),
                      "overlap": list(overlap), "block": list(block), "batch": batch}

    theirs_runs, ours_runs = [], []
    for r in range(repeat):
        theirs = run_cf12(python, driver_options)
        theirs_runs.append(theirs)
        print(f"  #{r} chunkflow {theirs['version']}: {theirs['wall']:.2f} s wall, {theirs['cpu']:.2f} s CPU, "
              f"{theirs['patches']} patches (load {os.getloadavg()[0]:.1f})", flush=True)
        job = chunkflow.plan(url, f"file://{workdir / f'ours{r}'}", str(workdir / f"job{r}"), model, patch_text,
                             overlap=overlap_text, block=block_text, blend="bump", batch_size=batch)
        ours = run_two_stage(job, backend)
        ours_runs.append(ours)
        print(f"  #{r} chunkflow 2:     {ours.wall:.2f} s wall, {ours.cpu:.2f} s CPU, {ours.stats1.patches} patches "
              f"(load {os.getloadavg()[0]:.1f}); ratio {ours.wall / theirs['wall']:.3f} wall, "
              f"{ours.cpu / theirs['cpu']:.3f} CPU", flush=True)
    cf12 = open_volume(f"file://{workdir / 'cf12'}").read(job.layout.bbox)
    if reference:
        with Timed() as tref:
            ref = whole_volume_reference(job, Resources(job, backend))
        print(f"  reference: {tref.wall:.2f} s", flush=True)
    else:
        ref = ours.output

    faces = near_volume_faces(shape, patch - overlap)
    interior = ~faces
    near = near_inner_faces(shape, block) & interior
    far = interior & ~near
    err = np.abs(cf12 - ref)[0]
    ratio_wall = spread([o.wall / t["wall"] for o, t in zip(ours_runs, theirs_runs)])
    ratio_cpu = spread([o.cpu / t["cpu"] for o, t in zip(ours_runs, theirs_runs)])
    record = {
        "model": model, "shape": list(shape), "patch": list(patch), "overlap": list(overlap), "block": list(block),
        "batch": batch, "repeat": repeat, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "blocks": job.layout.num_blocks, "patches_grid": job.layout.num_patches,
        "ours_patches": ours.stats1.patches, "cf12_patches": theirs["patches"], "cf12_version": theirs["version"],
        "patch_counts": counts,
        "ours_wall": round(statistics.median(o.wall for o in ours_runs), 3),
        "cf12_wall": round(statistics.median(t["wall"] for t in theirs_runs), 3),
        "ours_walls": [round(o.wall, 3) for o in ours_runs], "cf12_walls": [round(t["wall"], 3) for t in theirs_runs],
        "ours_cpus": [round(o.cpu, 3) for o in ours_runs], "cf12_cpus": [round(t["cpu"], 3) for t in theirs_runs],
        "ratio_wall": ratio_wall["median"], "ratio_cpu": ratio_cpu["median"],
        "ratio_wall_spread": ratio_wall, "ratio_cpu_spread": ratio_cpu,
        "reference_run": bool(reference), "ours_max_diff": float(np.abs(ours.output - ref).max()),
        "cf12_max_diff": float(err.max()), "cf12_mean_diff": float(err.mean()),
        "face_width": list(patch - overlap),
        "cf12_max_diff_volume_faces": _max(err[faces]), "cf12_mean_diff_volume_faces": _mean(err[faces]),
        "cf12_max_diff_interior": _max(err[interior]), "cf12_mean_diff_interior": _mean(err[interior]),
        "cf12_max_diff_near_faces": _max(err[near]), "cf12_mean_diff_near_faces": _mean(err[near]),
        "cf12_max_diff_elsewhere": _max(err[far]), "cf12_mean_diff_elsewhere": _mean(err[far]),
        "face_jump_reference": face_jump(ref[0], block, overlap),
        "face_jump_ours": face_jump(ours.output[0], block, overlap),
        "face_jump_cf12": face_jump(cf12[0], block, overlap),
    }
    grid = job.layout.num_patches
    print(f"patches computed / grid: chunkflow 2 {ours.stats1.patches}/{grid} = {ours.stats1.patches / grid:.3f}; "
          f"chunkflow 1.2.0 {theirs['patches']}/{grid} = {theirs['patches'] / grid:.3f}")
    print(f"time, {repeat} interleaved pair(s), chunkflow 2 / 1.2.0: wall median {ratio_wall['median']:.3f} "
          f"(min {ratio_wall['min']:.3f}, max {ratio_wall['max']:.3f}); CPU median {ratio_cpu['median']:.3f} "
          f"(min {ratio_cpu['min']:.3f}, max {ratio_cpu['max']:.3f})")
    what = ("the whole-volume reference" if reference
            else "the reference (chunkflow 2's output, = reference by Invariant 1)")
    print(f"max |output - {what}|: chunkflow 2 {record['ours_max_diff']:.2e}; chunkflow 1.2.0 "
          f"{record['cf12_max_diff']:.2e} (mean {record['cf12_mean_diff']:.2e})")
    print(f"  1.2.0 within {_text(patch - overlap)} of the volume's faces (its patches read reflect padding): max "
          f"{record['cf12_max_diff_volume_faces']:.2e} mean {record['cf12_mean_diff_volume_faces']:.2e}; interior: max "
          f"{record['cf12_max_diff_interior']:.2e} mean {record['cf12_mean_diff_interior']:.2e}")
    print(f"  interior, within 4 voxels of an inner block face: max {record['cf12_max_diff_near_faces']:.2e} mean "
          f"{record['cf12_mean_diff_near_faces']:.2e}; elsewhere max {record['cf12_max_diff_elsewhere']:.2e} mean "
          f"{record['cf12_mean_diff_elsewhere']:.2e}")
    print(f"  step across inner block faces / step elsewhere: reference {record['face_jump_reference']:.2f}, "
          f"chunkflow 2 {record['face_jump_ours']:.2f}, chunkflow 1.2.0 {record['face_jump_cf12']:.2f}")
    if anchored:
        with Timed() as tanc:
            anc = anchored_reference(image, backend.predict, patch, overlap, block, batch)
        grid_err = np.abs(cf12 - anc)[0]
        record.update({"anchored_seconds": round(tanc.wall, 3), "cf12_vs_anchored_max": float(grid_err.max()),
                       "cf12_vs_anchored_max_interior": _max(grid_err[interior]),
                       "cf12_vs_anchored_max_volume_faces": _max(grid_err[faces]),
                       "anchored_vs_reference_max_interior": _max(np.abs(anc - ref)[0][interior])})
        print(f"  1.2.0 vs chunkflow's exact blend on 1.2.0's own per-block grid ({tanc.wall:.1f} s): max "
              f"{record['cf12_vs_anchored_max']:.2e} (interior {record['cf12_vs_anchored_max_interior']:.2e}, "
              f"near the volume's faces {record['cf12_vs_anchored_max_volume_faces']:.2e}); that blend vs the "
              f"reference in the interior: max {record['anchored_vs_reference_max_interior']:.2e}")
    print(f"recorded in {save('vs_chunkflow12', record)}")


def _text(v) -> str:
    return ",".join(str(int(x)) for x in v)


if __name__ == "__main__":
    fire.Fire(main)
