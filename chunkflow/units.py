"""Human-readable sizes and counts for summaries, reports and dry runs."""
from __future__ import annotations


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: binary units up to PiB, whole bytes below 1 KiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``1, "block"`` -> ``"1 block"``, ``2, "block"`` -> ``"2 blocks"`` (``plural``: when not noun + s)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
