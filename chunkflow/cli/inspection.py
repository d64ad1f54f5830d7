"""``chunkflow inspect STORE``: what a donation store holds, as a table, JSON or a PNG.

Exit status: 0 when every block is complete or blended and nothing is malformed, stray
or refused; 1 when the report found something (an incomplete block during a run counts);
2 when the store could not be inspected (one line on stderr, nothing written).
"""
from __future__ import annotations

import contextlib
import json as jsonlib
import sys

from chunkflow.geometry import parse_key
from chunkflow.donation_format import format_block, format_table
from chunkflow.donation_report import LIMIT, check_piece, inspect_store, region_box
from chunkflow.store_layout import MANIFEST
from chunkflow.planning import load_job
from chunkflow.stages import DONATIONS
from chunkflow.storage import ObjectStore, open_store
from chunkflow.storage.donation_codec import DonationError, read_header
from chunkflow.errors import UsageError
from chunkflow.units import human_bytes



def inspect(store: str, block: str | None = None, piece: str | None = None, json: bool = False,
            png: str | None = None, z: int | None = None, channel: int = 0, verify: bool = False,
            headers: bool = False, credentials: str | None = None, workers: int = 16, region: str | None = None,
            sample: int | None = None, limit: int = LIMIT, quiet: bool = False) -> None:
    """Report per block: donations expected, present, missing, bytes, job hash and checksum status.

    Streams three listings of the store by prefix into per-block counters and reads no object body
    unless asked, so it stays fast and small on jobs of millions of blocks.

    Args:
        store: the job's store (the --donations given to plan), a directory or gs://bucket/prefix.
        block: one block (x0-x1_y0-y1_z0-z1) with a row per piece; reads the pieces' headers.
        piece: one donation key: its header, or with --png a slice of it.
        json: machine-readable output instead of the table.
        png: write a PNG slice to this path: of --piece, or of --block (summed donations beside the output).
        z: global z of the PNG slice (default: the middle of the piece or block).
        channel: channel of the PNG slice.
        verify: fetch every present donation (or a --sample of them) and check checksum, shape and job hash.
        headers: read each donation's header (a ranged GET of its first 4 KiB): job hash and raw size.
        credentials: a service-account JSON file for gs:// (default: Application Default Credentials).
        workers: concurrent reads for --verify/--headers.
        region: only the blocks intersecting this box (x0-x1_y0-y1_z0-z1), each with a row and its pieces.
        sample: read a random sample of this many present donations instead of all (with --verify, or alone).
        limit: a row per block when at most this many are selected, else rows for this many problem blocks.
        quiet: no progress bars (they are shown on stderr only when it is a terminal).
    """
    from chunkflow.cli.common import user_errors

    user_errors(_inspect)(store, block, piece, json, png, z, channel, verify, headers, credentials, workers,
                          region, sample, limit, quiet)  # a reader gone (``| head``) ends it quietly there


def _inspect(url: str, block, piece, as_json: bool, png, z, channel, verify: bool, headers: bool, credentials,
             workers: int, region, sample, limit, quiet: bool) -> None:
    from chunkflow.cli.common import setup_logging

    setup_logging(quiet=True)
    if not isinstance(url, str):
        raise UsageError(f"STORE {url!r} must be a directory or gs://bucket/prefix")
    if z is not None:
        _integer("z", z)
    _integer("channel", channel, minimum=0)
    _integer("workers", workers, minimum=1)
    _integer("limit", limit, minimum=0)
    if sample is not None:
        _integer("sample", sample, minimum=1)
    if region is not None:
        region = _region_text(region)
        if block is not None:
            raise UsageError("--block and --region cannot be used together: --block NAME is one block")
    store = open_store(url, credentials=credentials) if url.startswith("gs://") else open_store(url)
    if png is not None:
        _png(store, block, piece, str(png), z, channel)
        return
    if piece is not None:
        _piece(store, str(piece), as_json)
        return
    report = inspect_store(store, block=None if block is None else str(block), verify=verify,
                           headers=True if headers else None, workers=workers, region=region, sample=sample,
                           limit=limit, progress=not quiet and sys.stderr.isatty())
    if as_json:
        print(jsonlib.dumps(report.to_json(), indent=2))
    else:
        detail = block is not None or region is not None
        print("\n".join(format_block(report) if detail else format_table(report)))
    if not report.healthy:
        sys.exit(1)


def _integer(flag: str, value, minimum: int | None = None) -> int:
    """A numeric flag as Fire parsed it: an int (not a bool, a float or a word), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"--{flag} {value!r} is not an integer")
    if minimum is not None and value < minimum:
        raise UsageError(f"--{flag} {value} must be {'a positive integer' if minimum == 1 else f'>= {minimum}'}")
    return value


def _region_text(region) -> str:
    """``--region`` as typed (Fire may have made a number or a tuple of it), checked as a box name."""
    text = ",".join(map(str, region)) if isinstance(region, (tuple, list)) else str(region)
    region_box(text)
    return text


def _png(store: ObjectStore, block, piece, path: str, z, channel) -> None:
    from chunkflow.inspect_png import check_png_path, render_block, render_piece, save_png

    if piece is None and block is None:
        raise UsageError("--png needs --block NAME or --piece KEY")
    check_png_path(path)
    job = load_job(store) if store.exists(MANIFEST) else None
    refused: list[str] = []
    # cloud-files prints credential notices on stdout when a gs:// volume is opened.
    with contextlib.redirect_stdout(sys.stderr):
        if piece is not None:
            image = render_piece(store, str(piece), job, z, channel)
            what = f"piece {piece}"
        else:
            if job is None:
                raise UsageError(f"--png of a block needs the job manifest, and {store.url} has none; use --piece")
            image, refused = render_block(store, job, str(block), z, channel)
            what = f"block {block}"
    save_png(image, path)
    print(f"wrote {path}: {what}, {image.width}x{image.height} px")
    for line in refused:
        print(f"refused   {line}")


def _piece(store: ObjectStore, key: str, as_json: bool) -> None:
    try:
        parse_key(key)
    except ValueError as err:
        raise UsageError(f"--piece: {err}") from None
    job = load_job(store) if store.exists(MANIFEST) else None
    try:
        data = store.get(DONATIONS + key)
    except KeyError:
        raise UsageError(f"donation {key} is not in {store.url}") from None
    status, checksum, error, _, _ = check_piece(data, key, job)
    info: dict = {"key": key, "stored_bytes": len(data), "job_match": status, "checksum_status": checksum}
    if error is not None:
        info["error"] = error
    try:
        info.update(read_header(data, key).to_json())
        info["ratio"] = round(info["nbytes_raw"] / len(data), 3)
    except DonationError:
        pass  # an unreadable header: the error above says why
    if as_json:
        print(jsonlib.dumps(info, indent=2))
    else:
        for name, value in info.items():
            shown = human_bytes(value) if name in ("stored_bytes", "nbytes_raw", "nbytes_payload") else value
            print(f"{name:<15} {shown}")
    if error is not None:
        sys.exit(1)
