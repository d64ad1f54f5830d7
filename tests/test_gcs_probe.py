"""chunkflow.storage.gcs_probe: a gs:// location whose endpoint does not answer is refused in one
line after the retry deadline, and a probe still waiting says so instead of staying silent."""
from __future__ import annotations

import logging
import socket
import time

import pytest

from chunkflow.errors import StorageError
from chunkflow.storage import gcs_client, gcs_probe


def _closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def unreachable(monkeypatch):
    """An endpoint that refuses every connection, retried for 3 s in sleeps of at most 0.4 s.

    google-api-core draws each back-off sleep from uniform(0, delay) and gives up at once when the
    next sleep would cross the deadline, so with its default delays (1, 2, 4 s) a 3 s deadline could
    end after a 0.1 s sleep, before the probe's patience; short sleeps make the wait last the deadline."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("CHUNKFLOW_GCS_RETRY_DEADLINE", "3")
    monkeypatch.setattr(gcs_client, "retry_policy",
                        lambda deadline: DEFAULT_RETRY.with_timeout(deadline).with_delay(initial=0.4, maximum=0.4))
    monkeypatch.setattr(gcs_probe, "PATIENCE_S", 0.2)


def test_a_probe_that_waits_says_so_then_refuses_in_one_line(unreachable, caplog):
    caplog.set_level(logging.WARNING, logger="chunkflow")
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        gcs_probe.probe_bucket("gs://no-such-bucket/em", "gs://no-such-bucket/em")
    elapsed = time.monotonic() - started
    assert elapsed < 30
    assert "\n" not in str(err.value) and "no-such-bucket" in str(err.value)
    waits = [r.getMessage() for r in caplog.records if r.name == "chunkflow.storage.gcs_probe"]
    assert len(waits) == 1, (waits, f"refused after {elapsed:.2f} s: {err.value}")
    assert "no answer yet from the GCS endpoint" in waits[0] and "no-such-bucket" in waits[0]
    assert "CHUNKFLOW_GCS_RETRY_DEADLINE" in waits[0]


def test_a_probe_answered_at_once_says_nothing(gcs_bucket, monkeypatch, caplog):
    monkeypatch.setattr(gcs_probe, "PATIENCE_S", 0.3)
    caplog.set_level(logging.WARNING, logger="chunkflow")
    gcs_probe.probe_bucket(f"gs://{gcs_bucket}/em", f"gs://{gcs_bucket}/em")
    time.sleep(0.5)  # past the patience: a timer left running would log now
    assert not [r for r in caplog.records if r.name == "chunkflow.storage.gcs_probe"]
