"""The region of interest of a job (``--bbox``): pure geometry, no I/O.

A job computes a region of its input (by default the whole input) at one mip level. The patch
grid is laid over the region; the network's context and the face padding come from the input
beyond the region wherever the input has data (``Volume.read`` pads only past the input's own
faces), so the result over the region is exactly whole-volume inference over that region.

An output that already exists may cover more than the region. Its storage chunks are the unit of
every write, so the region must start on its chunk grid and stop on it (or at its far face):
then every block boundary is a chunk boundary and no two tasks ever share a chunk.
"""
from __future__ import annotations

from chunkflow.bbox import Bbox, Vec, zyx_text
from chunkflow.errors import JobError


def parse_region(text: str | None, input_bbox: Bbox, mip: int = 0) -> Bbox:
    """The region ``x0-x1_y0-y1_z0-z1`` (voxels of mip ``mip``), checked against the input's
    bounds at that level; ``None``: the whole input."""
    if text is None:
        return input_bbox
    if not isinstance(text, str):
        raise JobError(f"--bbox {text!r} is not a box name x0-x1_y0-y1_z0-z1 such as {input_bbox.name}")
    try:
        region = Bbox.from_name(text.strip())
    except ValueError:
        raise JobError(f"--bbox {text!r} is not a box name x0-x1_y0-y1_z0-z1 such as {input_bbox.name}") from None
    if not input_bbox.contains(region):
        inside = region.intersect(input_bbox)
        hint = f"; inside it: {inside.name}" if not inside.is_empty() else ""
        raise JobError(f"--bbox {region.name} reaches outside the input, which covers {input_bbox.name} at mip "
                       f"{mip}{hint}")
    return region


def aligned_region(region: Bbox, output_bbox: Bbox, chunk: Vec) -> Bbox:
    """The smallest region holding ``region`` whose faces lie on the output's chunk grid (or
    its far faces), clipped to the output."""
    origin = output_bbox.start
    start = Vec(origin[a] + (region.start[a] - origin[a]) // chunk[a] * chunk[a] for a in range(3))
    stop = Vec(min(output_bbox.stop[a], origin[a] - (-(region.stop[a] - origin[a]) // chunk[a]) * chunk[a])
               for a in range(3))
    return Bbox(start, stop)


def is_aligned(region: Bbox, output_bbox: Bbox, chunk: Vec) -> bool:
    """Whether every face of ``region`` is on the output's chunk grid or at its far face."""
    for a in range(3):
        if (region.start[a] - output_bbox.start[a]) % chunk[a]:
            return False
        if (region.stop[a] - output_bbox.start[a]) % chunk[a] and region.stop[a] != output_bbox.stop[a]:
            return False
    return True


def check_output_region(region: Bbox, output_bbox: Bbox, chunk: Vec, output: str, input_bbox: Bbox) -> None:
    """Refuse an existing output that does not cover ``region``, or a region not aligned to its
    storage chunks (naming the aligned region to use instead, where there is one)."""
    if not output_bbox.contains(region):
        raise JobError(f"output {output} covers {output_bbox.name}, which does not hold the region {region.name}; "
                       "give a new output (it is created covering the region) or a region inside it")
    if is_aligned(region, output_bbox, chunk):
        return
    grid = zyx_text(chunk)
    suggestion = aligned_region(region, output_bbox, chunk)
    if input_bbox.contains(suggestion):
        hint = f"; use --bbox {suggestion.name} instead"
    else:
        hint = "; no aligned region inside the input holds it: give a new output for this region"
    start = zyx_text(output_bbox.start)
    raise JobError(f"region {region.name} is not aligned to the storage chunks ({grid} z,y,x from {start}) of the "
                   f"existing output {output}, so its writes would share chunks with the rest of that output{hint}")
