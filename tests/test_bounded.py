"""``chunkflow.bounded.Smallest``: the ``n`` smallest items of a stream in any order, in bounded memory.

``chunkflow inspect`` keeps its examples (malformed names, stray keys) with it while it streams listings
in no particular order; what it keeps must be the first ``n`` of a sorted listing, whatever the order.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkflow.bounded import Smallest
from tests.helpers import examples


@settings(max_examples=examples(200), deadline=None)
@given(st.lists(st.integers(-50, 50)), st.integers(1, 12))
def test_smallest_keeps_the_n_smallest_whatever_the_order(items, limit):
    kept = Smallest(limit)
    for item in items:
        kept.add(item)
    assert kept.items() == sorted(items)[:limit] and kept.count == len(items) and len(kept) == min(limit, len(items))
    again = Smallest(limit)
    for item in reversed(items):
        again.add(item)
    assert again.items() == kept.items()


@settings(max_examples=examples(100), deadline=None)
@given(st.lists(st.text(alphabet="ab/%0-9", max_size=6)), st.integers(1, 5))
def test_never_holds_more_than_twice_the_limit(names, limit):
    """The memory bound the docstring promises: at most ``2 x limit`` items held at any time."""
    kept = Smallest(limit)
    for name in names:
        kept.add(name)
        assert len(kept._items) < 2 * limit
    assert kept.items() == sorted(names)[:limit]


@settings(max_examples=examples(100), deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.text(alphabet="xy", max_size=2))), st.integers(1, 4),
       st.integers(0, 40))
def test_adding_after_reading_the_items_goes_on_correctly(items, limit, cut):
    """``items()`` in the middle of a stream (a progress report) changes nothing that comes after."""
    kept = Smallest(limit)
    for i, item in enumerate(items):
        if i == cut:
            assert kept.items() == sorted(items[:cut])[:limit]
        kept.add(item)
    assert kept.items() == sorted(items)[:limit] and kept.count == len(items)


def test_equal_items_are_all_kept_up_to_the_limit():
    kept = Smallest(3)
    for item in [5, 5, 5, 5, 1, 5]:
        kept.add(item)
    assert kept.items() == [1, 5, 5] and kept.count == 6


@pytest.mark.parametrize("limit", [0, -1])
def test_a_limit_below_one_is_refused(limit):
    with pytest.raises(ValueError, match=f"limit {limit} must be at least 1"):
        Smallest(limit)


def test_empty():
    kept = Smallest(4)
    assert kept.items() == [] and len(kept) == 0 and kept.count == 0
