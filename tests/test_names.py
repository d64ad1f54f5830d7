"""``chunkflow.storage.names``: what a store accepts as an object name or a listing prefix.

A name is checked before it reaches any store, so no key can escape the store root; a refusal is
an :class:`InvalidName`, a storage error and a ValueError, one line naming the value. The stores'
own refusals (every call of a real directory store) are in ``tests/test_objects.py``.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkflow.errors import StorageError
from chunkflow.storage.names import InvalidName, validate_name, validate_prefix
from tests.helpers import examples

#: a segment that is safe on its own: no slash, backslash or NUL, not "." or ".."
SEGMENT = st.text(alphabet=st.characters(blacklist_characters="/\\\x00", blacklist_categories=("Cs",)),
                  min_size=1, max_size=8).filter(lambda s: s not in (".", ".."))
NAME = st.lists(SEGMENT, min_size=1, max_size=5).map("/".join)


@settings(max_examples=examples(200), deadline=None)
@given(NAME)
def test_a_relative_name_of_safe_segments_is_returned_unchanged(name):
    assert validate_name(name) == name
    assert validate_prefix(name) == name and validate_prefix(name + "/") == name + "/"


@settings(max_examples=examples(200), deadline=None)
@given(st.lists(SEGMENT, max_size=3), st.sampled_from(["..", ".", ""]), st.lists(SEGMENT, max_size=3))
def test_a_dot_dotdot_or_empty_segment_anywhere_is_refused(before, bad, after):
    name = "/".join([*before, bad, *after])
    with pytest.raises(InvalidName):
        validate_name(name)


@pytest.mark.parametrize("name, why", [
    ("", "must be a non-empty string"),
    (None, "must be a non-empty string"),
    (b"a/b", "must be a non-empty string"),
    ("a\\b", "contains a backslash or NUL"),
    ("a\x00b", "contains a backslash or NUL"),
    ("/etc/passwd", "is absolute; names are relative like a/b/c"),
    ("a//b", "has an empty path segment"),
    ("a/", "has an empty path segment"),
    ("../x", "contains '..'"),
    ("a/../../b", "contains '..'"),
    ("./a", "contains '.'"),
])
def test_each_refusal_is_one_line_naming_the_value_and_why(name, why):
    with pytest.raises(InvalidName) as err:
        validate_name(name)
    assert str(err.value) == f"object name {name!r} {why}"
    assert isinstance(err.value, StorageError) and isinstance(err.value, ValueError)


def test_the_caller_says_what_the_value_is():
    with pytest.raises(InvalidName, match=r"^store prefix '\.\./up' contains '\.\.'$"):
        validate_name("../up", "store prefix")


@pytest.mark.parametrize("prefix", ["", "donations/", "done/stage1/", "a", "a/b"])
def test_prefixes_accepted(prefix):
    assert validate_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["/", "//", "a//", "../", "/abs/", "a/./"])
def test_prefixes_refused_as_prefixes(prefix):
    with pytest.raises(InvalidName, match=r"^prefix "):
        validate_prefix(prefix)
