"""chunkflow/bbox.py: ZYX vectors and half-open boxes, and box names (``x0-x1_y0-y1_z0-z1``),
the keys of every block, chunk and donation. Pure functions on real objects."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkflow.bbox import Bbox, Vec, zyx_text
from chunkflow.errors import GeometryError
from tests.helpers import examples

coords = st.integers(-50, 50)
boxes = st.builds(lambda start, shape: Bbox.from_shape(start, shape),
                  st.tuples(coords, coords, coords), st.tuples(*[st.integers(1, 12)] * 3))


def test_a_name_is_x_first_and_the_box_zyx():
    box = Bbox.from_name("10-20_-5-5_0-3")
    assert box.start == Vec(0, -5, 10) and box.stop == Vec(3, 5, 20)
    assert box.shape == Vec(3, 10, 10) and box.size == 300 and str(box) == box.name == "10-20_-5-5_0-3"


@settings(max_examples=examples(200), deadline=None)
@given(box=boxes)
def test_names_round_trip(box):
    assert Bbox.from_name(box.name) == box


@pytest.mark.parametrize("name", ["01-2_0-1_0-1", "+1-2_0-1_0-1", "-0-1_0-1_0-1", "1-2_0-1", "1-2_0-1_0-1_0-1",
                                  "\u0661-2_0-1_0-1", "1-2_0-1_0-1 ", "2-2_0-1_0-1", "3-2_0-1_0-1", ""])
def test_a_name_has_one_spelling_and_a_non_empty_box(name):
    """No leading zeros, signs other than '-' on non-zero numbers, non-ASCII digits, other arities,
    trailing text or empty boxes: one box, one name (names are compared as strings)."""
    with pytest.raises(GeometryError, match="box name"):
        Bbox.from_name(name)


def test_a_name_that_is_not_a_string_is_refused():
    with pytest.raises(GeometryError, match="is not a box name"):
        Bbox.from_name(("0-1_0-1_0-1",))  # type: ignore[arg-type]


@pytest.mark.parametrize("text, expected", [("16,128,128", (16, 128, 128)), ("16x128x128", (16, 128, 128)),
                                            (" 4, 8 ,8", (4, 8, 8)), (8, (8, 8, 8)), ((1, 2, 3), (1, 2, 3)),
                                            ([-1, 0, 1], (-1, 0, 1))])
def test_vec_parse_accepts_zyx_text_an_int_or_three_integers(text, expected):
    assert Vec.parse(text) == Vec(*expected)


@pytest.mark.parametrize("text, shown", [("8.5,64,64", "'8.5,64,64'"), ((8.5, 64, 64), "'8.5,64,64'"),
                                         (True, "True"), ((1, True, 3), "'1,True,3'"), ("16,128", None),
                                         ("a,b,c", "'a,b,c'")])
def test_vec_parse_refuses_in_one_line_naming_the_value(text, shown):
    with pytest.raises(GeometryError) as err:
        Vec.parse(text, "--input-patch")
    message = str(err.value)
    assert len(message.splitlines()) == 1
    if shown is not None:
        assert message.startswith(f"--input-patch {shown} is not three integers z,y,x"), message


def test_vec_arithmetic_is_element_wise_with_ints_and_triples():
    v = Vec(2, 4, 6)
    assert v + 1 == Vec(3, 5, 7) and 1 + v == Vec(3, 5, 7) and v - (1, 2, 3) == Vec(1, 2, 3)
    assert 10 - v == Vec(8, 6, 4) and v * 2 == 2 * v == Vec(4, 8, 12) and v // 4 == Vec(0, 1, 1)
    assert v % 4 == Vec(2, 0, 2) and -v == Vec(-2, -4, -6) and v.prod() == 48 and v.xyz() == (6, 4, 2)
    assert isinstance(v + 1, Vec) and repr(v) == "Vec(2, 4, 6)" and Vec([1, 2, 3]) == Vec(1, 2, 3)
    with pytest.raises(GeometryError, match="3 components"):
        Vec(1, 2)
    for short in (lambda: v + (1, 2), lambda: [1, 2] - v, lambda: v * np.array([1, 2]), lambda: v // (2, 2, 2, 2)):
        with pytest.raises(GeometryError, match="3 components"):
            short()


@settings(max_examples=examples(200), deadline=None)
@given(a=boxes, b=boxes)
def test_intersect_contains_and_slices_agree_with_arrays(a, b):
    """The intersection, as slices of an array over the union's bounds, selects exactly the voxels
    inside both boxes; containment and emptiness say the same."""
    world = Bbox(Vec(min(x, y) for x, y in zip(a.start, b.start)), Vec(max(x, y) for x, y in zip(a.stop, b.stop)))
    in_a, in_b = np.zeros(world.shape, bool), np.zeros(world.shape, bool)
    in_a[a.slices(world)] = True
    in_b[b.slices(world)] = True
    both = a.intersect(b)
    assert both.is_empty() == (not (in_a & in_b).any())
    if not both.is_empty():
        got = np.zeros(world.shape, bool)
        got[both.slices(world)] = True
        assert np.array_equal(got, in_a & in_b) and both.size == int(got.sum())
        assert a.contains(both) and b.contains(both)
    else:
        assert both.shape.prod() == 0 and both.size == 0
    assert a.contains(b) == bool(in_a[in_b].all()) and a.contains(a)


def test_grow_translate_points_and_z_slabs():
    box = Bbox.from_shape((2, 0, -4), (5, 3, 3))
    assert box.grow(1) == Bbox((1, -1, -5), (8, 4, 0)) and box.grow((0, 1, 2)) == Bbox((2, -1, -6), (7, 4, 1))
    assert box.translate((1, 1, 1)) == Bbox((3, 1, -3), (8, 4, 0))
    assert box.contains_point((2, 0, -4)) and not box.contains_point((7, 0, -4))  # half-open
    slabs = list(box.z_slabs(2))
    assert [s.shape[0] for s in slabs] == [2, 2, 1] and slabs[0].start == box.start and slabs[-1].stop == box.stop
    assert list(box.z_slabs(0)) == list(box.z_slabs(1)) and len(list(box.z_slabs(1))) == 5


def test_zyx_text_is_how_messages_show_sizes():
    assert zyx_text((16, 128.0, 128)) == "16,128,128" and zyx_text((4.5, 8, 8), floats=True) == "4.5,8,8"


scalars = st.one_of(st.integers(-1000, 1000), st.booleans(), st.integers(-1000, 1000).map(np.int64),
                    st.integers(-1000, 1000).map(np.int32), st.floats(-1000, 1000, allow_nan=False))
triples = st.tuples(scalars, scalars, scalars)


@settings(max_examples=examples(300), deadline=None)
@given(a=triples, b=st.one_of(triples, st.integers(-5, 5).filter(bool)))
def test_vec_fast_paths_give_plain_ints_as_the_general_conversion_does(a, b):
    """Vec takes three plain ints as they are and returns a Vec given to it (it is immutable); anything
    else (numpy integers, bools, floats, generators) is converted with int() as before. Arithmetic on
    such values gives the same plain-int Vec as converting each result."""
    v = Vec(a)
    assert v == tuple(int(x) for x in a) and all(type(x) is int for x in v) and type(v) is Vec
    assert Vec(v) is v and Vec(x for x in a) == v and Vec(*a) == v
    w = b if isinstance(b, int) else Vec(b)
    o = (w, w, w) if isinstance(w, int) else w
    for got, want in ((v + w, [x + y for x, y in zip(v, o)]), (v - w, [x - y for x, y in zip(v, o)]),
                      (v * w, [x * y for x, y in zip(v, o)]), (-v, [-x for x in v])):
        assert type(got) is Vec and list(got) == want and all(type(x) is int for x in got)
    if all(o):
        assert list(v // w) == [x // y for x, y in zip(v, o)] and list(v % w) == [x % y for x, y in zip(v, o)]
    raw = (a[0] + np.int64(1), a[1], a[2])  # numpy results of arithmetic outside Vec are converted too
    assert all(type(x) is int for x in Vec(raw)) and all(type(x) is int for x in Bbox(raw, raw).start)
