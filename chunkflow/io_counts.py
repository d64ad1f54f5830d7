"""How many storage objects a job reads and writes (markers aside), from per-axis sums over the
block grid, never from a list of blocks: what :mod:`chunkflow.cost_model` prices and
``plan --dry-run`` (:mod:`chunkflow.dryrun`) reports."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from chunkflow.bbox import Bbox, Vec
from chunkflow.geometry import Layout

__all__ = ["IoCounts", "io_counts"]


@dataclass(frozen=True)
class IoCounts:
    """Object counts of a job's data (markers aside): what :mod:`chunkflow.cost_model` prices."""

    input_reads: int     # input storage chunks read, summed over stage-one tasks
    output_objects: int  # output objects (storage chunks, or shards) written, each once
    core_objects: int    # of those, the ones stage one writes (its cores)


def _cells(start: int, stop: int, origin: int, size: int) -> int:
    """How many cells of the grid ``origin + k * size`` the range ``[start, stop)`` meets."""
    return 0 if stop <= start else (stop - 1 - origin) // size - (start - origin) // size + 1


def io_counts(layout: Layout, context: Sequence[int] = (0, 0, 0), input_box: Bbox | None = None,
              input_chunk: Sequence[int] | None = None, output_unit: Sequence[int] | None = None) -> IoCounts:
    """Input chunks read and output objects written by the whole job, from per-axis sums.

    Args:
        layout: the job's layout.
        context: the model's context margin per side, ZYX: a stage-one task reads its chunk grown by it.
        input_box: the input volume's bounds (default: the layout's region); reads stop there (the rest is padding).
        input_chunk: the input's storage chunk, ZYX, on a grid from ``input_box.start`` (default: the output's).
        output_unit: the output's unit of writing, ZYX, on a grid from the region's start: its storage chunk
            (the default) or, for a sharded output, its shard.

    Returns:
        The counts: each a sum over blocks of a product of per-axis terms, so a product of per-axis sums.
    """
    box = input_box if input_box is not None else layout.bbox
    grid = Vec(input_chunk) if input_chunk is not None else layout.storage_chunk
    unit = Vec(output_unit) if output_unit is not None else layout.storage_chunk
    sums = []  # per axis: (input chunks read, output objects, core objects)
    for a, ax in enumerate(layout.axes):
        r = o = c = 0
        for k in range(ax.num_blocks):
            bs, be = ax.block_range(k)
            o += _cells(bs, be, ax.start, unit[a])
            ch = ax.chunk(k)
            if ch is not None:
                r += _cells(max(ch[0] - context[a], box.start[a]), min(ch[1] + context[a], box.stop[a]),
                            box.start[a], grid[a])
                c += 0 if layout.whole_block_writes else _cells(ax.core_start(k), be, ax.start, unit[a])
        sums.append((r, o, c))
    return IoCounts(*(int(np.prod(column, dtype=object)) for column in zip(*sums)))
