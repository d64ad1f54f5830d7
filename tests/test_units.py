"""chunkflow/units.py: the byte sizes that summaries, reports and dry runs print."""
from __future__ import annotations

import pytest

from chunkflow.units import count, human_bytes


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
                                     (5 * 2 ** 30, "5.0 GiB"), (2 ** 40, "1.0 TiB"),
                                     (2 ** 50, "1.0 PiB"), (3 * 2 ** 60, "3072.0 PiB"), (-2048, "-2.0 KiB")])
def test_binary_units_up_to_pib_whole_bytes_below_one_kib(n, text):
    assert human_bytes(n) == text


@pytest.mark.parametrize("n, noun, plural, text", [
    (0, "block", None, "0 blocks"), (1, "block", None, "1 block"), (2, "block", None, "2 blocks"),
    (1, "patch", "patches", "1 patch"), (3, "patch", "patches", "3 patches"), (1, "retry", "retries", "1 retry"),
])
def test_counts_are_singular_for_one_only(n, noun, plural, text):
    assert count(n, noun, plural) == text
