"""Make the figures of docs/design.md from the real geometry and blending code.

    python docs/make_figures.py            # writes docs/figures/*.png

Every coordinate drawn here comes from ``chunkflow.geometry.Layout`` and every weight from
``chunkflow.blend``; nothing is drawn by hand, so the figures stay true if the code changes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

from chunkflow.bbox import Bbox, Vec  # noqa: E402
from chunkflow.blend import weight_map, weight_sum  # noqa: E402
from chunkflow.geometry import Layout  # noqa: E402

OUT = Path(__file__).resolve().parent / "figures"

# The small layout both figures use: a 2D slice (z is one voxel thick), drawn with x to the
# right and y downwards, as an image viewer shows it.
VOLUME = Bbox(Vec(0, 0, 0), Vec(1, 96, 96))
PATCH, OVERLAP, BLOCK, STORAGE = Vec(1, 24, 24), Vec(0, 8, 8), Vec(1, 32, 32), Vec(1, 8, 8)
FOCUS = Vec(0, 1, 1)  # the block whose core, band and donations are shown

BLOCK_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                 "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def layout() -> Layout:
    return Layout(VOLUME, PATCH, OVERLAP, BLOCK, STORAGE)


def colour(lay: Layout, idx: Vec) -> str:
    flat = (idx[0] * lay.grid_shape[1] + idx[1]) * lay.grid_shape[2] + idx[2]
    return BLOCK_COLOURS[flat % len(BLOCK_COLOURS)]


def rect(box: Bbox, inset: float = 0.0, **kw) -> Rectangle:
    """A matplotlib rectangle for the (y, x) extent of a ZYX box."""
    (_, y0, x0), (_, y1, x1) = box.start, box.stop
    return Rectangle((x0 + inset, y0 + inset), x1 - x0 - 2 * inset, y1 - y0 - 2 * inset, **kw)


def centre(box: Bbox) -> tuple[float, float]:
    return (box.start[2] + box.stop[2]) / 2, (box.start[1] + box.stop[1]) / 2


def yx(idx: Vec) -> str:
    return f"({idx[0]},{idx[1]},{idx[2]})"


def storage_grid(ax, lay: Layout, lo: int, hi: int) -> None:
    step_y, step_x = lay.storage_chunk[1], lay.storage_chunk[2]
    for y in range(lo - lo % step_y, hi + 1, step_y):
        ax.axhline(y, color="#dddddd", lw=0.6, zorder=0)
    for x in range(lo - lo % step_x, hi + 1, step_x):
        ax.axvline(x, color="#dddddd", lw=0.6, zorder=0)


def block_grid(ax, lay: Layout, lw: float = 2.2) -> None:
    for idx in lay.block_indices():
        ax.add_patch(rect(lay.block_box(idx), fill=False, ec="black", lw=lw, zorder=5))


def image_axes(ax, lo: float, hi: float, step: int, pad: float = 0.0) -> None:
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(hi + pad, lo - pad)  # y downwards
    ax.set_aspect("equal")
    ax.set_xticks(range(int(lo), int(hi) + 1, step))
    ax.set_yticks(range(int(lo), int(hi) + 1, step))
    ax.set_xlabel("x (voxels)")
    ax.set_ylabel("y (voxels)")


# ---- figure 1: the layout -------------------------------------------------------------------
def figure_layout(path: Path) -> None:
    lay = layout()
    box, chunk, core = lay.block_box(FOCUS), lay.chunk_box(FOCUS), lay.core_box(FOCUS)
    bands = lay.band_boxes(FOCUS)
    incoming = lay.donations_to(FOCUS)
    assert chunk is not None

    fig = plt.figure(figsize=(16, 13))
    grid = fig.add_gridspec(2, len(incoming), height_ratios=[2.3, 1], hspace=0.32, wspace=0.35,
                            left=0.05, right=0.98, top=0.895, bottom=0.04)
    top = grid[0, :].subgridspec(1, 2, wspace=0.18)

    # (a) the whole patch grid, coloured by owning block
    ax = fig.add_subplot(top[0])
    lo, hi = VOLUME.start[1], VOLUME.stop[1]
    storage_grid(ax, lay, lo, hi)
    for idx in lay.block_indices():
        c = colour(lay, idx)
        bb = lay.block_box(idx)
        ax.add_patch(rect(bb, fc=c, alpha=0.07, lw=0, zorder=1))
        for origin in lay.own_origins(idx):
            pbox = Bbox(origin, origin + lay.patch)
            inset = 0.45 * ((origin[1] // lay.stride[1] + origin[2] // lay.stride[2]) % 3)
            ax.add_patch(rect(pbox, inset=inset, fill=False, ec=c, lw=1.3, alpha=0.9, zorder=3))
            ax.plot(origin[2], origin[1], "o", ms=7, mfc=c, mec="black", mew=0.8, zorder=7)
        ax.text(bb.start[2] + 1.2, bb.stop[1] - 1.2, f"block {yx(idx)}", fontsize=9, va="bottom", ha="left",
                zorder=8, bbox=dict(boxstyle="round,pad=0.2", fc="white", ec=c, lw=1.2))
    block_grid(ax, lay)
    ax.add_patch(rect(box, fill=False, ec="black", lw=4.5, zorder=6))
    image_axes(ax, lo, hi, 16, pad=2)
    ox = ", ".join(str(o) for o in lay.axes[2].origins)
    ax.set_title(f"(a) global patch grid: output patch {lay.patch[1]}, overlap {lay.overlap[1]}, stride "
                 f"{lay.stride[1]}\norigins along x and y: {ox}  (last one flush)\n"
                 f"dots = patch origins; outline colour = owning block (block holding the origin)",
                 fontsize=11)

    # (b) the focus block: chunk, reach, core, band
    ax = fig.add_subplot(top[1])
    lo, hi = box.start[1] - 24, box.stop[1] + 16
    storage_grid(ax, lay, lo, hi)
    for idx in lay.block_indices():
        ax.add_patch(rect(lay.block_box(idx), fc=colour(lay, idx), alpha=0.07, lw=0, zorder=1))
    block_grid(ax, lay)
    ax.add_patch(rect(core, fc="#2ca02c", alpha=0.35, ec="#2ca02c", lw=2, zorder=2))
    cx, cy = centre(core)
    ax.text(cx, cy, "core\n(stage one\nwrites)", ha="center", va="center", fontsize=10, zorder=9)
    hatches = ["//", "\\\\", "xx"]
    for n, slab in enumerate(bands):
        ax.add_patch(rect(slab, fc="none", ec="#555555", hatch=hatches[n % 3], lw=1.2, zorder=2))
        sx, sy = centre(slab)
        ax.text(sx, sy, f"band slab {n + 1}\n{slab.name}\n(stage two writes)", ha="center", va="center",
                fontsize=9, zorder=9, bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="#555555"))
    ax.add_patch(rect(chunk, fill=False, ec=colour(lay, FOCUS), lw=2.5, ls="--", zorder=6))
    ax.text(chunk.stop[2] + 0.5, chunk.stop[1] + 1, f"dashed: chunk of {yx(FOCUS)}\n= union of its own\n"
            f"patches\n{chunk.name}", ha="right", va="top", fontsize=9, color=colour(lay, FOCUS), zorder=9,
            bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.85))
    # reach of the lower neighbours and the core start, per axis, from the AxisPlan
    ay, ax_ = lay.axes[1], lay.axes[2]
    ey, ex = ay.reach(FOCUS[1]), ax_.reach(FOCUS[2])
    ax.plot([ex, ex], [box.start[1], box.stop[1]], color="#d62728", lw=2.2, ls=":", zorder=7)
    ax.plot([box.start[2], box.stop[2]], [ey, ey], color="#d62728", lw=2.2, ls=":", zorder=7)
    ax.annotate(f"e_x = {ex}: reach of the lower\nneighbours' patches along x", xy=(ex, box.start[1]),
                xytext=(ex + 2, box.start[1] - 6), color="#d62728", fontsize=9, va="center", ha="left", zorder=9,
                arrowprops=dict(arrowstyle="->", color="#d62728"),
                bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.9))
    ax.annotate(f"e_y = {ey}", xy=(box.start[2], ey), xytext=(lo + 2, ey + 4), color="#d62728", fontsize=9,
                va="center", ha="left", zorder=9, arrowprops=dict(arrowstyle="->", color="#d62728"),
                bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.9))
    ax.annotate(f"core starts at {core.start[2]} (x and y): the first\nstorage-chunk boundary "
                f"(every {lay.storage_chunk[2]}) strictly\nabove e = {ex}; {ex} itself is a boundary,\n"
                f"so the band is {core.start[2] - box.start[2]} thick, not {ex - box.start[2]}",
                xy=(core.start[2], core.start[1]), xytext=(lo + 1, box.stop[1] + 2), fontsize=9, va="top",
                ha="left", color="#1a6e1a", zorder=9, arrowprops=dict(arrowstyle="->", color="#1a6e1a"),
                bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.9))
    for lower in (Vec(FOCUS[0], FOCUS[1] - 1, FOCUS[2]), Vec(FOCUS[0], FOCUS[1], FOCUS[2] - 1),
                  Vec(FOCUS[0], FOCUS[1] - 1, FOCUS[2] - 1)):
        lchunk = lay.chunk_box(lower)
        if lchunk is not None:
            ax.add_patch(rect(lchunk, fill=False, ec=colour(lay, lower), lw=1.6, ls="-.", zorder=4))
    image_axes(ax, lo, hi, 8)
    ax.set_title(f"(b) block {yx(FOCUS)} = {box.name}: core and band\n"
                 f"dash-dot outlines: chunks of the lower neighbours, reaching in up to e",
                 fontsize=11)

    # (c) one small panel per expected donation, with its key
    for n, d in enumerate(incoming):
        ax = fig.add_subplot(grid[1, n])
        lo, hi = box.start[1] - 10, box.stop[1] + 2
        storage_grid(ax, lay, lo, hi)
        ax.add_patch(rect(core, fc="#2ca02c", alpha=0.25, lw=0, zorder=1))
        for slab in bands:
            ax.add_patch(rect(slab, fc="none", ec="#bbbbbb", hatch="//", lw=0, zorder=1))
        ax.add_patch(rect(box, fill=False, ec="black", lw=2, zorder=5))
        c = colour(lay, d.donor)
        ax.add_patch(rect(d.piece, fc=c, alpha=0.75, ec="black", lw=1.2, zorder=4))
        px, py = centre(d.piece)
        if d.donor == FOCUS:
            slab = next(n for n, b in enumerate(bands) if b.contains(d.piece)) + 1
            who = f"self-donation of {yx(d.donor)} (band slab {slab})"
        else:
            who = f"from block {yx(d.donor)}"
            dy, dx = d.donor[1] - FOCUS[1], d.donor[2] - FOCUS[2]
            start = (px + 9 * dx, py + 9 * dy)
            ax.add_patch(FancyArrowPatch(start, (px, py), arrowstyle="-|>", mutation_scale=18, lw=2, color=c,
                                         zorder=7))
        ax.set_xlim(lo, hi)
        ax.set_ylim(hi, lo)
        ax.set_aspect("equal")
        ax.set_xticks([box.start[2], box.stop[2]])
        ax.set_yticks([box.start[1], box.stop[1]])
        ax.tick_params(labelsize=8)
        block_name, piece_name = d.key.split("%")
        ax.set_title(f"{who}\npiece x,y = {d.piece.start[2]}-{d.piece.stop[2]}, "
                     f"{d.piece.start[1]}-{d.piece.stop[1]}", fontsize=10)
        ax.set_xlabel(f"key:\n{block_name}%\n{piece_name}", fontsize=9, family="monospace")
    y_top = ax.get_position().y1
    fig.text(0.5, y_top + 0.055, f"(c) the {len(incoming)} donations stage two of block {yx(FOCUS)} must receive "
             "(Layout.donations_to), in key order; keys name boxes as x0-x1_y0-y1_z0-z1",
             ha="center", fontsize=12)
    fig.suptitle(f"Layout of a {VOLUME.shape[1]}x{VOLUME.shape[2]} slice (z one voxel thick): block "
                 f"{BLOCK[1]}, storage chunk {STORAGE[1]} (grey grid), block grid in black", fontsize=14, y=0.985)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- figure 2: weights along one axis --------------------------------------------------------
def figure_weights(path: Path) -> None:
    lay = layout()
    axis = lay.axes[2]
    n = lay.patch[2]
    length = VOLUME.shape[2]
    x = np.arange(VOLUME.start[2], VOLUME.stop[2])
    line = Bbox(Vec(0, 0, VOLUME.start[2]), Vec(1, 1, VOLUME.stop[2]))
    origins = [Vec(0, 0, o) for o in axis.origins]
    owners = [axis.block_index(o) for o in axis.origins]
    modes = ["constant", "gaussian", "bump"]

    fig, axes = plt.subplots(3, 3, figsize=(16, 11.5), gridspec_kw=dict(width_ratios=[1, 2.2, 2.2]))
    for r, mode in enumerate(modes):
        w = weight_map(mode, (1, 1, n))  # a patch one voxel thick: exactly the 1D profile
        prof = w[0, 0]
        N = weight_sum(w, origins, line)[0, 0]

        ax = axes[r, 0]
        ax.plot(np.arange(n), prof, "o-", ms=3.5, color="black")
        lo_w, hi_w = float(prof.min()), float(prof.max())
        if hi_w > lo_w:
            ax.set_yscale("log")
            ax.set_ylim(lo_w / 3, hi_w * 3)
        else:
            ax.set_ylim(0, 1.25 * hi_w)
        scale = " (log scale)" if hi_w > lo_w else ""
        ax.set_title(f"{mode}: w(i) on one patch{scale}\nmin {lo_w:.3g}, max {hi_w:.3g}", fontsize=10)
        ax.set_xlabel("i (voxel inside the output patch)")
        if mode == "gaussian":
            ax.axhline(1e-3, color="#d62728", ls=":", lw=1.2)
            ax.text(n / 2, 1.4e-3, "clamp floor 1e-3", color="#d62728", ha="center", fontsize=9)

        contrib = np.zeros((len(origins), length), dtype=np.float64)
        for k, o in enumerate(axis.origins):
            contrib[k, o - VOLUME.start[2]:o - VOLUME.start[2] + n] = prof
        cols = [_shade(BLOCK_COLOURS[b], 0.55 if k % 2 else 1.0) for k, b in enumerate(owners)]

        ax = axes[r, 1]
        ax.stackplot(x + 0.5, contrib, colors=cols, alpha=0.85, step="mid", edgecolor="white", linewidth=0.3)
        ax.plot(x + 0.5, N, color="black", lw=1.6, drawstyle="steps-mid", label="N(x) = weight_sum(...)")
        assert np.allclose(contrib.sum(0), N, rtol=1e-6)
        ax.set_title(f"{mode}: w(x - origin) of each patch, stacked; the top is N(x)"
                     f" (min {N.min():.3g}, max {N.max():.3g})", fontsize=10)
        ax.legend(loc="upper right", fontsize=9, framealpha=0.9)
        ax.set_ylim(0, N.max() * 1.25)

        ax = axes[r, 2]
        ax.stackplot(x + 0.5, contrib / N, colors=cols, alpha=0.85, step="mid", edgecolor="white", linewidth=0.3)
        ax.set_ylim(0, 1.12)
        ax.axhline(1.0, color="black", lw=1)
        ax.set_title(f"{mode}: w(x - origin) / N(x), stacked: the blend coefficients sum to 1", fontsize=10)
        for a in (axes[r, 1], axes[r, 2]):
            for b in range(1, axis.num_blocks):
                a.axvline(axis.block_range(b)[0], color="black", lw=2, ls="--")
            a.set_xlim(VOLUME.start[2], VOLUME.stop[2])
            a.set_xticks(range(VOLUME.start[2], VOLUME.stop[2] + 1, 8))
            a.set_xlabel("x (voxels)")
            a.tick_params(labelsize=8)
    fig.suptitle(f"Blend weights along x for the layout of the first figure: output patch {n}, overlap "
                 f"{lay.overlap[2]}, origins {', '.join(map(str, axis.origins))}; colours = owning block "
                 f"(blocks of {lay.block[2]}, dashed borders)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _shade(hex_colour: str, factor: float) -> tuple[float, float, float]:
    rgb = np.array(matplotlib.colors.to_rgb(hex_colour))
    return tuple(1 - (1 - rgb) * factor)  # factor < 1 lightens


def main(argv: list[str]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    figure_layout(OUT / "layout.png")
    figure_weights(OUT / "weights.png")
    for p in sorted(OUT.glob("*.png")):
        print(p)


if __name__ == "__main__":
    main(sys.argv[1:])
