"""The human-readable ``chunkflow inspect`` report: a table of block rows, anomalies, a summary.

Rendering only: :func:`chunkflow.donation_report.inspect_store` builds the report.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from chunkflow.stages import DONATIONS
from chunkflow.units import human_bytes

if TYPE_CHECKING:
    from chunkflow.donation_report import StoreReport

__all__ = ["format_block", "format_table", "printable"]


def printable(name: str) -> str:
    """A listed name made safe for a terminal: control and non-ASCII characters escaped."""
    return name if name.isascii() and name.isprintable() else ascii(name)[1:-1]


def format_table(report: StoreReport) -> list[str]:
    """The human-readable report: header, one row per listed block, anomalies, summary."""
    lines = []
    checked = report.checked
    if report.sample is not None:
        checked += f", a random sample of {report.sample['read']} of {report.sample['of']} donations"
    if report.job_hash:
        lines.append(f"job {report.job_hash} in {report.url} (donations {report.donation_dtype}, "
                     f"compression {report.compression}; checked: {checked})")
    else:
        lines.append(f"no manifest in {report.url}: donations found by key, nothing expected (checked: {checked})")
    if report.selection.get("region"):
        lines.append(f"region {report.selection['region']}: {report.num_blocks} blocks intersect it")
    width = max([len(b.block) for b in report.blocks] + [5])
    lines.append(f"{'block':<{width}}  {'state':<10} {'stage':<5} {'expected':>8} {'present':>7} {'missing':>7} "
                 f"{'bytes':>10} {'ratio':>6}  {'job':<7} checksum")
    for b in report.blocks:
        stage = "2" if b.stage2 else ("1" if b.stage1 else "-")
        expected = "?" if b.expected is None else str(b.expected)
        ratio = f"{b.raw_bytes / b.stored_bytes:.2f}" if b.raw_bytes and b.stored_bytes else "-"
        lines.append(f"{b.block:<{width}}  {b.state:<10} {stage:<5} {expected:>8} {b.present:>7} {len(b.missing):>7} "
                     f"{human_bytes(b.stored_bytes):>10} {ratio:>6}  {b.job:<7} {b.checksum}")
    if report.rows == "problems":
        shown = len(report.blocks)
        lines.append(f"(rows for the first {shown} of {report.problems['count']} incomplete or bad blocks; every block "
                     f"gets a row when at most --limit {report.limit} are selected: see --region, --block)")
        for state, names in report.examples.items():
            if names:
                lines.append(f"examples  {state}: {', '.join(names)}")
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
    if report.orphan_count > len(report.orphans):
        lines.append(f"stray     ... and {report.orphan_count - len(report.orphans)} more")
    for name, reason in report.malformed:
        lines.append(f"malformed {printable(name)}: skipped, not read ({printable(reason)})")
    if report.malformed_count > len(report.malformed):
        lines.append(f"malformed ... and {report.malformed_count - len(report.malformed)} more")
    lines.append(f"summary: {report.summary()}")
    return lines


def format_block(report: StoreReport) -> list[str]:
    """The table, then each listed block's pieces, a row each (``--block``, ``--region``)."""
    lines = format_table(report)
    summary = lines.pop()
    for b in report.blocks:
        if b.pieces is None:
            continue
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
