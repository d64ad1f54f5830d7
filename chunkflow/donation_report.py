"""What a donation store holds, block by block: the report behind ``chunkflow inspect``.

The report comes from two listings by prefix (``donations/`` and ``done/``) and the
manifest, whatever the number of objects: no request per block, no object body. The
manifest's layout says which keys every block expects; the listing says which exist
and their sizes. From the keys alone one also knows each piece's raw size (voxels x
channels x dtype), hence the compression ratio, without fetching anything.

Bodies are read only when asked: ``verify`` fetches every listed donation (a bounded
thread pool, one piece in memory per thread) and checks checksum, shape and job hash
with the same decoder stage two uses; ``headers`` (the default for one block) reads
only the first :data:`HEAD_BYTES` of each piece with a ranged GET.

A listed name under ``donations/`` that is not a strict ``{block}%{piece}`` key (``..``,
``/``, non-integer ranges, ...) is reported as malformed and never used as a path: it
is not read, not parsed into a box, not deleted. Nothing here writes to the store.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from chunkflow.units import human_bytes
from chunkflow.bbox import Bbox
from chunkflow.geometry import GeometryError, parse_key
from chunkflow.job import MANIFEST, Job
from chunkflow.planning import load_job
from chunkflow.stages import DONATIONS
from chunkflow.storage import ObjectStore, StorageError
from chunkflow.storage.donation_codec import DonationError, decode_donation, header_end, read_header
from chunkflow.errors import UsageError


DONE = "done/"
HEAD_BYTES = 4096
UNCHECKED = "-"


@dataclass
class PieceReport:
    """One expected (or found) donation of a block."""

    key: str
    piece: str
    donor: str | None
    present: bool
    size: int = 0
    raw: int = 0
    job: str = UNCHECKED        # "ok", "foreign" or "-" (not read)
    checksum: str = UNCHECKED   # "ok", "bad" or "-" (not verified)
    error: str | None = None


@dataclass
class BlockReport:
    """Donations a block expects vs what the store holds, and its done markers."""

    block: str
    stage1: bool
    stage2: bool
    expected: int | None
    present: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    stored_bytes: int = 0
    raw_bytes: int = 0
    job: str = UNCHECKED
    checksum: str = UNCHECKED
    errors: list[str] = field(default_factory=list)
    pieces: list[PieceReport] | None = None

    @property
    def state(self) -> str:
        """``blended`` (stage two done; its donations may be cleaned up), ``bad`` (a piece was
        refused or does not belong), ``complete`` or ``incomplete``."""
        if self.errors or self.unexpected:
            return "bad"
        if self.stage2:
            return "blended"
        if self.expected is None or self.missing:
            return "incomplete"
        return "complete"


@dataclass
class StoreReport:
    url: str
    job_hash: str | None
    donation_dtype: str | None
    compression: str | None
    blocks: list[BlockReport]
    malformed: list[tuple[str, str]]
    orphans: list[str]
    objects: int
    stored_bytes: int
    raw_bytes: int
    checked: str

    @property
    def healthy(self) -> bool:
        """Every block complete or blended, and no malformed, stray or refused object."""
        return not self.malformed and not self.orphans and all(b.state in ("complete", "blended") for b in self.blocks)

    def counts(self) -> dict[str, int]:
        result = {s: 0 for s in ("complete", "blended", "incomplete", "bad")}
        for b in self.blocks:
            result[b.state] += 1
        return result

    def summary(self) -> str:
        c = self.counts()
        present = sum(b.present for b in self.blocks)
        expected = sum(b.expected or 0 for b in self.blocks)
        ratio = f" (raw {human_bytes(self.raw_bytes)}, ratio {self.raw_bytes / self.stored_bytes:.2f}x)" \
            if self.raw_bytes and self.stored_bytes else ""
        anomalies = ""
        if self.malformed or self.orphans:
            anomalies = f"; {len(self.malformed)} malformed and {len(self.orphans)} stray keys"
        return (f"{len(self.blocks)} blocks: {c['complete']} complete, {c['blended']} blended, "
                f"{c['incomplete']} incomplete, {c['bad']} bad; donations {present}/{expected} present, "
                f"{human_bytes(self.stored_bytes)} stored{ratio}; {self.objects} objects listed{anomalies}")

    def to_json(self) -> dict:
        data = asdict(self)
        for block, raw in zip(self.blocks, data["blocks"]):
            raw["state"] = block.state
            if raw["pieces"] is None:
                del raw["pieces"]
        data["malformed"] = [{"name": n, "reason": r} for n, r in self.malformed]
        data["counts"] = self.counts()
        data["healthy"] = self.healthy
        data["summary"] = self.summary()
        return data


def inspect_store(store: ObjectStore, block: str | None = None, verify: bool = False, headers: bool | None = None,
                  workers: int = 16) -> StoreReport:
    """Report on ``store``: a planned job (manifest present) or a prefix holding donations.

    ``block`` restricts the report to one block (by name) and lists its pieces; their
    headers are then read by default. ``verify`` fetches and fully checks every piece.
    """
    job = load_job(store) if store.exists(MANIFEST) else None
    wanted = _block_name(block, job) if block is not None else None
    # One block: list only its own keys (they all start with its name), not the whole bucket.
    listed, malformed, objects = _list_donations(store, f"{DONATIONS}{wanted}%" if wanted else DONATIONS)
    done = {name for name, _ in store.list_with_sizes(DONE)} if wanted is None else {
        name for stage in (1, 2) for name, _ in store.list_with_sizes(f"{DONE}stage{stage}/{wanted}")
        if name.endswith(f"/{wanted}")}
    objects += len(done) + (job is not None)
    if job is None and not listed and not malformed and wanted is None:
        raise StorageError(f"no chunkflow job and no donations at {store.url}")
    blocks, orphans = (_job_blocks(job, listed, done, wanted) if job is not None
                       else _prefix_blocks(listed, done, wanted))
    if wanted is not None and not blocks:
        raise StorageError(f"no donations or done markers for block {wanted} in {store.url}")
    if verify:
        read = "body"
    elif headers if headers is not None else wanted is not None:
        read = "head"
    else:
        read = None
    if read:
        _check(store, blocks, job, read == "body", workers)
    if wanted is None:
        stored = sum(size for keys in listed.values() for size in keys.values())
    else:
        stored = sum(b.stored_bytes for b in blocks)
    return StoreReport(
        url=store.url, job_hash=job.job_hash if job else None, donation_dtype=job.donation_dtype if job else None,
        compression=job.donation_compression if job else None, blocks=blocks, malformed=malformed,
        orphans=orphans, objects=objects, stored_bytes=stored, raw_bytes=sum(b.raw_bytes for b in blocks),
        checked={"body": "verified", "head": "headers", None: "listing"}[read])


def _block_name(block: str, job: Job | None) -> str:
    try:
        box = Bbox.from_name(str(block))
    except ValueError as err:
        raise UsageError(f"--block {block!r}: {err}") from None
    if job is not None:
        try:
            job.layout.block_index_of(box)
        except GeometryError as err:
            raise UsageError(f"--block {block!r}: {err}") from None
    return box.name


def _list_donations(store: ObjectStore, prefix: str = DONATIONS
                    ) -> tuple[dict[str, dict[str, int]], list[tuple[str, str]], int]:
    """One listing of ``prefix`` (``donations/``, or one block's keys): valid keys grouped by
    block name, malformed names, count."""
    by_block: dict[str, dict[str, int]] = {}
    malformed: list[tuple[str, str]] = []
    count = 0
    for name, size in store.list_with_sizes(prefix):
        count += 1
        key = name[len(DONATIONS):]
        try:
            block, _ = parse_key(key)
        except ValueError as err:
            malformed.append((name, str(err)))
            continue
        by_block.setdefault(block.name, {})[key] = size
    return by_block, malformed, count


def _job_blocks(job: Job, listed: dict[str, dict[str, int]], done: set[str],
                wanted: str | None) -> tuple[list[BlockReport], list[str]]:
    layout = job.layout
    itemsize = np.dtype(job.donation_dtype).itemsize
    names: dict = {}  # block index -> name, so each donor's name is computed once
    reports = []
    for idx in layout.block_indices():
        box = layout.block_box(idx)
        names[idx] = box.name
        if wanted is not None and box.name != wanted:
            continue
        present = listed.get(box.name, {})
        pieces = []
        for d in layout.donations_to(idx):
            size = present.get(d.key)
            donor = names.get(d.donor) or names.setdefault(d.donor, layout.block_box(d.donor).name)
            pieces.append(PieceReport(d.key, d.piece.name, donor, size is not None,
                                      size or 0, d.piece.size * job.out_channels * itemsize))
        expected = {p.key for p in pieces}
        report = BlockReport(
            block=box.name, stage1=f"{DONE}stage1/{box.name}" in done, stage2=f"{DONE}stage2/{box.name}" in done,
            expected=len(pieces), present=sum(p.present for p in pieces),
            missing=[p.key for p in pieces if not p.present],
            unexpected=sorted(k for k in present if k not in expected),
            stored_bytes=sum(p.size for p in pieces), raw_bytes=sum(p.raw for p in pieces if p.present),
            pieces=pieces)
        reports.append(report)
    known = set(names.values())
    orphans = sorted(DONATIONS + k for name, keys in listed.items() if name not in known for k in keys)
    return reports, orphans


def _prefix_blocks(listed: dict[str, dict[str, int]], done: set[str],
                   wanted: str | None) -> tuple[list[BlockReport], list[str]]:
    """Without a manifest nothing is expected: report what each block has."""
    names = set(listed) | {n.rsplit("/", 1)[-1] for n in done}
    reports = []
    for name in sorted(names, key=_sort_key):
        if wanted is not None and name != wanted:
            continue
        keys = listed.get(name, {})
        pieces = [PieceReport(k, k.split("%")[1], None, True, size) for k, size in sorted(keys.items())]
        reports.append(BlockReport(block=name, stage1=f"{DONE}stage1/{name}" in done,
                                   stage2=f"{DONE}stage2/{name}" in done, expected=None, present=len(keys),
                                   stored_bytes=sum(keys.values()), pieces=pieces))
    return reports, []


def _sort_key(name: str):
    try:
        box = Bbox.from_name(name)
        return (0, tuple(box.start), name)
    except ValueError:
        return (1, (), name)


def _check(store: ObjectStore, blocks: list[BlockReport], job: Job | None, full: bool, workers: int) -> None:
    """Read the present pieces of ``blocks`` (whole or head) and fill in job/checksum columns.

    Without a manifest there is no job to compare with: a block's job column then says
    whether its pieces agree on one job hash (``ok``) or not (``mixed``).
    """
    pieces = [p for b in blocks for p in (b.pieces or []) if p.present]
    hashes: dict[str, str] = {}
    threads = max(1, min(workers, len(pieces) or 1))
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cf-inspect") as pool:
        for piece, result in zip(pieces, pool.map(lambda p: _read_piece(store, p.key, job, full), pieces)):
            piece.job, piece.checksum, piece.error, raw, found = result
            piece.raw = piece.raw or raw
            if found:
                hashes[piece.key] = found
    for b in blocks:
        checked = [p for p in (b.pieces or []) if p.present]
        if not checked:
            continue
        if job is None:
            b.job = "ok" if len({hashes.get(p.key) for p in checked} - {None}) <= 1 else "mixed"
            b.raw_bytes = sum(p.raw for p in checked)
        else:
            b.job = "foreign" if any(p.job == "foreign" for p in checked) else "ok"
        if full:
            b.checksum = "bad" if any(p.checksum == "bad" for p in checked) else "ok"
        b.errors = [p.error for p in checked if p.error]


def _read_piece(store: ObjectStore, key: str, job: Job | None,
                full: bool) -> tuple[str, str, str | None, int, str | None]:
    """Fetch one piece (whole, or its head) and :func:`check_piece` it.

    Storage errors (permission, network) propagate: they are not a property of the piece.
    """
    name = DONATIONS + key
    try:
        data = store.get(name) if full else store.get_head(name, HEAD_BYTES)
        end = header_end(data)
        if not full and end is not None and end > len(data):
            data = store.get_head(name, end)
    except KeyError:
        return UNCHECKED, UNCHECKED, f"donation {key} vanished while inspecting", 0, None
    return check_piece(data, key, job, full)


def check_piece(data: bytes, key: str, job: Job | None,
                full: bool = True) -> tuple[str, str, str | None, int, str | None]:
    """``(job, checksum, error, raw bytes, job hash in its header)`` of a donation's bytes.

    ``full`` decodes and checks the checksum (``data`` must be the whole object);
    otherwise only the header is read. Without a ``job`` the piece's own hash is used.
    """
    try:
        header = read_header(data, key)
        if header.key != key:
            return UNCHECKED, "bad", f"donation {key} is mislabelled: its header names key {header.key}", 0, None
        expected_hash = job.job_hash if job is not None else header.job_hash
        if header.job_hash != expected_hash:
            return ("foreign", UNCHECKED, f"donation {key} belongs to job {header.job_hash}, not {expected_hash}", 0,
                    header.job_hash)
        if full:
            decode_donation(data, key, expected_hash, *((job.out_channels, job.donation_dtype) if job else ()))
        return "ok", "ok" if full else UNCHECKED, None, header.nbytes_raw, header.job_hash
    except DonationError as err:
        return UNCHECKED, "bad", str(err), 0, None



def printable(name: str) -> str:
    """A listed name made safe for a terminal: control and non-ASCII characters escaped."""
    return name if name.isascii() and name.isprintable() else ascii(name)[1:-1]


def format_table(report: StoreReport) -> list[str]:
    """The human-readable report: header, one row per block, anomalies, summary."""
    lines = []
    if report.job_hash:
        lines.append(f"job {report.job_hash} in {report.url} (donations {report.donation_dtype}, "
                     f"compression {report.compression}; checked: {report.checked})")
    else:
        lines.append(f"no manifest in {report.url}: donations found by key, nothing expected "
                     f"(checked: {report.checked})")
    width = max([len(b.block) for b in report.blocks] + [5])
    lines.append(f"{'block':<{width}}  {'state':<10} {'stage':<5} {'expected':>8} {'present':>7} {'missing':>7} "
                 f"{'bytes':>10} {'ratio':>6}  {'job':<7} checksum")
    for b in report.blocks:
        stage = "2" if b.stage2 else ("1" if b.stage1 else "-")
        expected = "?" if b.expected is None else str(b.expected)
        ratio = f"{b.raw_bytes / b.stored_bytes:.2f}" if b.raw_bytes and b.stored_bytes else "-"
        lines.append(f"{b.block:<{width}}  {b.state:<10} {stage:<5} {expected:>8} {b.present:>7} {len(b.missing):>7} "
                     f"{human_bytes(b.stored_bytes):>10} {ratio:>6}  {b.job:<7} {b.checksum}")
    for b in report.blocks:
        if b.state == "blended":
            continue
        for key in b.missing:
            lines.append(f"missing   {key} (block {b.block})")
        for err in b.errors:
            lines.append(f"refused   {printable(err)}")
        for key in b.unexpected:
            lines.append(f"unexpected {DONATIONS}{printable(key)}: not a piece block {b.block} expects")
    for name in report.orphans:
        lines.append(f"stray     {printable(name)}: its block is not a block of this job")
    for name, reason in report.malformed:
        lines.append(f"malformed {printable(name)}: skipped, not read ({printable(reason)})")
    lines.append(f"summary: {report.summary()}")
    return lines


def format_block(report: StoreReport) -> list[str]:
    """One block in detail: a row per piece (``--block``)."""
    lines = format_table(report)
    summary = lines.pop()
    for b in report.blocks:
        lines.append(f"pieces of block {b.block}:")
        width = max([len(p.key) for p in b.pieces or []] + [3])
        lines.append(f"  {'key':<{width}}  {'from block':<20} {'status':<8} {'bytes':>10} {'raw':>10}  {'job':<7} "
                     "checksum")
        for p in b.pieces or []:
            status = "present" if p.present else ("consumed" if b.stage2 else "MISSING")
            lines.append(f"  {p.key:<{width}}  {p.donor or '?':<20} {status:<8} {human_bytes(p.size):>10} "
                         f"{human_bytes(p.raw) if p.raw else '-':>10}  {p.job:<7} {p.checksum}")
    lines.append(summary)
    return lines
