"""``chunkflow.engines.attempts``: a task's attempts counted from its markers in a real directory store,
given up after ``max_attempts``, the heartbeat of a live attempt, and the failed blocks a barrier reports.

The queue tests (``tests/test_queue.py``, ``tests/test_queue_healing.py``) run all this with real
workers that are killed; here each rule is checked on its own, on markers written by hand.
"""
from __future__ import annotations

import json
import time

import pytest

from chunkflow.engines.attempts import (AttemptsExhausted, FailedWatch, Heartbeat, exhausted, failed_record,
                                        failure_line, failures, gave_up, is_stale, last_attempt, marker_names,
                                        reset_given_up)
from chunkflow.errors import MissingInput
from chunkflow.storage import DirectoryStore
from chunkflow.store_layout import marker_name

BLOCK = "0-8_0-8_0-8"


@pytest.fixture
def store(tmp_path) -> DirectoryStore:
    return DirectoryStore(tmp_path / "job")


def _put(store, kind: str, block: str, record, stage: int = 1) -> None:
    data = record if isinstance(record, bytes) else json.dumps(record).encode()
    store.put(marker_name(kind, stage, block), data)


def _record(store, kind: str, block: str = BLOCK, stage: int = 1) -> dict:
    return json.loads(store.get(marker_name(kind, stage, block)))


def test_the_last_attempt_is_the_highest_either_marker_records(store):
    assert last_attempt(store, 1, BLOCK) == (0, None)
    _put(store, "running", BLOCK, {"attempt": 3})
    assert last_attempt(store, 1, BLOCK) == (3, None)   # a killed attempt counts like one that raised
    failed = {"attempt": 2, "error": "boom"}
    _put(store, "failed", BLOCK, failed)
    assert last_attempt(store, 1, BLOCK) == (3, failed)
    _put(store, "failed", BLOCK, {"attempt": 5})
    assert last_attempt(store, 1, BLOCK)[0] == 5
    assert last_attempt(store, 2, BLOCK) == (0, None)   # stages count apart


@pytest.mark.parametrize("running", [b"not json", b"[1, 2]", {"attempt": "x"}, {"host": "h"}])
def test_an_unreadable_marker_counts_no_attempt(store, running):
    _put(store, "running", BLOCK, running)
    assert last_attempt(store, 1, BLOCK) == (0, None)


def test_a_failed_record_says_what_failed_and_whether_it_gave_up():
    refusal = failed_record(MissingInput("chunk 0-8 is missing"), 1, 3)
    assert refusal["attempt"] == 1 and refusal["kind"] == "MissingInput" and refusal["refusal"] is True
    assert refusal["error"] == "chunk 0-8 is missing" and (refusal["max_attempts"], refusal["gave_up"]) == (3, False)
    assert abs(refusal["finished"] - time.time()) < 60
    assert failed_record(RuntimeError("x"), 3, 3)["gave_up"] is True
    unexpected = failed_record(RuntimeError("line one\nline two"), 1, None)
    assert unexpected["refusal"] is False and "\n" not in unexpected["error"]
    assert "max_attempts" not in unexpected and "gave_up" not in unexpected   # local and Dask engines


@pytest.mark.parametrize("record, line", [
    ({"attempt": 1, "error": "no such chunk", "kind": "MissingInput", "refusal": True},
     f"{BLOCK}: attempt 1 failed: no such chunk"),
    ({"attempt": 2, "error": "boom", "kind": "RuntimeError", "refusal": False, "max_attempts": 3, "gave_up": False},
     f"{BLOCK}: attempt 2 of 3 failed, to be retried: unexpected RuntimeError: boom"),
    ({"attempt": 3, "error": "boom", "kind": "RuntimeError", "refusal": False, "max_attempts": 3, "gave_up": True},
     f"{BLOCK}: gave up after 3 attempts: unexpected RuntimeError: boom"),
    ({}, f"{BLOCK}: attempt ? failed: ?"),
])
def test_failure_line(record, line):
    assert failure_line(BLOCK, record) == line
    assert gave_up(record) is bool(record.get("gave_up"))


def test_a_killed_last_attempt_is_given_up_with_a_failed_marker_that_says_so(store):
    _put(store, "running", BLOCK, {"attempt": 3, "host": "h"})
    _put(store, "failed", BLOCK, {"attempt": 2, "error": "boom", "kind": "RuntimeError", "refusal": False})
    last, failed = last_attempt(store, 1, BLOCK)
    err = exhausted(store, 1, BLOCK, last, failed, 3, {"host": "me"})
    assert isinstance(err, AttemptsExhausted)
    assert str(err).startswith(f"{BLOCK}: not run again, 3 of 3 attempts used: attempt 3 ended without a result: "
                               "its worker was killed or lost")
    assert str(err).endswith("; attempt 2 failed: unexpected RuntimeError: boom")
    record = _record(store, "failed")
    assert record["gave_up"] is True and record["attempt"] == 3 and record["host"] == "me"
    assert record["kind"] == "AttemptsExhausted" and record["max_attempts"] == 3
    assert not store.exists(marker_name("running", 1, BLOCK))


def test_a_task_already_given_up_keeps_its_failed_marker(store):
    given = {"attempt": 2, "error": "no such chunk", "refusal": True, "max_attempts": 2, "gave_up": True}
    _put(store, "failed", BLOCK, given)
    _put(store, "running", BLOCK, {"attempt": 1})   # a stray duplicate's marker
    err = exhausted(store, 1, BLOCK, 2, given, 2, {})
    assert str(err) == f"{BLOCK}: not run again, 2 of 2 attempts used: {BLOCK}: gave up after 2 attempts: no such chunk"
    assert _record(store, "failed") == given
    assert not store.exists(marker_name("running", 1, BLOCK))


def test_failures_reads_the_records_and_leaves_out_what_it_cannot(store):
    _put(store, "failed", "a", {"attempt": 1})
    _put(store, "failed", "b", b"{not json")
    _put(store, "failed", "c", b"[]")
    assert failures(store, 1, ["a", "b", "c", "absent"]) == {"a": {"attempt": 1}}
    assert failures(store, 1, []) == {}
    assert marker_names(store, "failed", 1) == {"a", "b", "c"} and marker_names(store, "failed", 2) == set()


def test_reset_given_up_deletes_only_the_given_up_markers_of_the_blocks_asked(store):
    _put(store, "failed", "a", {"attempt": 3, "gave_up": True})
    _put(store, "failed", "b", {"attempt": 1, "gave_up": False})
    _put(store, "failed", "c", {"attempt": 3, "gave_up": True})   # not enqueued again: left alone
    _put(store, "failed", "d", {"attempt": 1})
    assert reset_given_up(store, 1, {"a", "b", "d"}) == ["a"]
    assert marker_names(store, "failed", 1) == {"b", "c", "d"}
    assert reset_given_up(store, 2, {"a"}) == []


@pytest.mark.parametrize("record, stale", [
    ({"lease": 60, "started": 0.0}, True),
    ({"lease": 60, "started": 0.0, "heartbeat": 950.0}, False),
    ({"lease": 60, "started": 0.0, "heartbeat": 900.0}, True),
    ({"lease": 60, "started": 950.0}, False),
    ({"started": 0.0}, False),                       # no lease: local and Dask markers never are
    ({"lease": "60", "started": 0.0}, False),
    ({"lease": 60}, False),
])
def test_is_stale(record, stale):
    assert is_stale(record, now=1000.0) is stale


def test_the_heartbeat_writes_the_attached_marker_until_detached(store):
    name = marker_name("running", 1, BLOCK)
    beat = Heartbeat(lease=30)
    beat.beat()   # nothing attached: nothing written
    assert not store.exists(name)
    record = {"attempt": 1, "lease": 30, "started": time.time() - 100}
    beat.attach(store, name, record)
    beat.beat()
    written = _record(store, "running")
    assert written["attempt"] == 1 and abs(written["heartbeat"] - time.time()) < 60
    assert "heartbeat" not in record   # the caller's record is not changed
    assert not is_stale(written, time.time())
    beat.detach()
    store.delete(name)
    beat.beat()
    assert not store.exists(name)


def test_a_failed_watch_reports_each_failure_once_and_again_when_given_up(store):
    watch = FailedWatch(store, 2)
    assert watch.update({"a", "b"}) == []
    _put(store, "failed", "a", {"attempt": 1, "error": "x", "max_attempts": 2, "gave_up": False}, stage=2)
    _put(store, "failed", "z", {"attempt": 1, "error": "x", "max_attempts": 2, "gave_up": True}, stage=2)
    assert watch.update({"a", "b"}) == ["a: attempt 1 of 2 failed, to be retried: x"]   # z is not pending
    assert watch.update({"a", "b"}) == []
    _put(store, "failed", "a", {"attempt": 2, "error": "x", "max_attempts": 2, "gave_up": True}, stage=2)
    assert watch.update({"a", "b"}) == ["a: gave up after 2 attempts: x"]
    assert watch.update({"a", "b"}) == []   # given up: not read again
    assert not watch.covers({"a", "b"}) and watch.covers({"a"})
    assert watch.describe({"a"}) == "a: gave up after 2 attempts: x"
    store.delete(marker_name("failed", 2, "a"))   # `produce` reset it
    watch.update({"a", "b"})
    assert watch.given_up == {}


def test_a_failed_watch_describes_at_most_five_given_up_blocks_in_name_order(store):
    blocks = {f"b{i}" for i in range(7)}
    for block in blocks:
        _put(store, "failed", block, {"attempt": 1, "error": "x", "max_attempts": 1, "gave_up": True}, stage=1)
    watch = FailedWatch(store, 1)
    assert len(watch.update(blocks)) == 7 and watch.covers(blocks)
    assert watch.describe(blocks) == "; ".join(f"b{i}: gave up after 1 attempts: x" for i in range(5)) + "; and 2 more"
