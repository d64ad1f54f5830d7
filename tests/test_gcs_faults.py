"""GCS faults with real processes and the real server (fake-gcs-server), no mocks.

- A stage-one worker SIGKILLed in the middle of uploading a donation: a loopback proxy in front of
  the server forwards the upload's headers and half its body, then holds it while the test kills
  the worker (``run`` and a queue ``worker``). The server publishes nothing for the cut upload; a
  rerun (or the next worker, once the lease runs out) finishes stage one, stage two blends, and
  the output equals the whole-volume reference.
- The server stopped mid-run: stage one parks (``chunkflow.engines.faults``) after its first block
  wrote a slab of its core, the server (filesystem backend) is killed, and every block then fails
  within the retry deadline, one line each, exit 2, no traceback. The server is started again on
  the same port with the same objects, the same command is rerun, and the output equals the
  reference.
"""
from __future__ import annotations

import http.client
import http.server
import os
import re
import signal
import socket
import subprocess
import threading
import time
from urllib.parse import urlparse

import numpy as np
import pytest

from chunkflow.bbox import Vec
from chunkflow.engines.queue import produce
from chunkflow.errors import StorageError
from chunkflow.stages import DONATIONS
from chunkflow.storage import open_store, open_volume
from tests.test_engines_support import PY, ROOT, assert_complete_and_exact
from tests.test_gcs_pipeline import gcs_job, smooth

MODULES = {1: "inference_and_donate", 2: "receive_and_blend"}
DEADLINE = 1  # CHUNKFLOW_GCS_RETRY_DEADLINE of every process here, in seconds


def stage_env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), CHUNKFLOW_GCS_RETRY_DEADLINE=str(DEADLINE), **extra)


def run_cmd(stage: int, store: str) -> list[str]:
    return [PY, "-m", MODULES[stage], "run", store, "--blocks", "all", "--quiet"]


def run_stage_process(stage: int, store: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(run_cmd(stage, store), cwd=ROOT, env=stage_env(**env), capture_output=True, text=True,
                          timeout=timeout)


class UploadCutter:
    """A loopback proxy to the real server. It forwards every request and its answer, except the
    ``nth`` upload of a donation: that one's headers and half its body go to the server, then the
    proxy holds the connection (``stalled`` is set, ``key`` names the donation) until
    :meth:`release`, and drops both connections without an answer (``dropped`` is set)."""

    def __init__(self, upstream: str, nth: int) -> None:
        up = urlparse(upstream)
        self.stalled, self.dropped, self._released = threading.Event(), threading.Event(), threading.Event()
        self.key: str | None = None
        self.uploads = 0
        outer, lock = self, threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_one(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                cut = False
                if self.command == "POST" and self.path.startswith("/upload/") and b"/" + DONATIONS.encode() in body:
                    with lock:
                        outer.uploads += 1
                        cut = outer.uploads == nth
                if cut:
                    self.cut(body)
                    return
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                conn.request(self.command, self.path, body=body or None,
                             headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                resp = conn.getresponse()
                payload = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def cut(self, body: bytes) -> None:
                found = re.search(rb'"name":\s*"[^"]*?/' + DONATIONS.encode() + rb'([^"]+)"', body)
                outer.key = found.group(1).decode() if found else None
                head = [f"{self.command} {self.path} HTTP/1.1", f"Host: {up.netloc}"]
                head += [f"{k}: {v}" for k, v in self.headers.items() if k.lower() != "host"]
                with socket.create_connection((up.hostname, up.port), timeout=30) as server:
                    server.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body[: len(body) // 2])
                    outer.stalled.set()
                    outer._released.wait(60)
                outer.dropped.set()  # the server saw the connection end half-way through the body
                self.close_connection = True

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = handle_one

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # the killed worker's connections reset: expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self.release()
        if self.stalled.is_set():
            assert self.dropped.wait(30)
        self.server.shutdown()
        self.server.server_close()


def _wait_for(event: threading.Event, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not event.wait(0.05):
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the worker exited {proc.returncode} before its upload was cut: {err[-2000:]}")
        assert time.monotonic() < deadline, "no donation upload reached the proxy"


@pytest.mark.parametrize("how", ["run", "worker"])
def test_worker_killed_mid_upload_leaves_no_donation_and_a_rerun_completes(gcs_server, gcs_bucket, tmp_path, how):
    job = gcs_job(gcs_bucket)
    store = open_store(job.store)
    proxy = UploadCutter(gcs_server, nth=3)
    queue = f"fq://{tmp_path / 'queue'}"
    if how == "run":
        cmd = run_cmd(1, job.store)
    else:
        assert produce(job, queue) == job.layout.num_blocks
        cmd = [PY, "-m", MODULES[1], "worker", queue, "--lease", "2", "--poll", "0.2", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=stage_env(STORAGE_EMULATOR_HOST=proxy.url),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(proxy.stalled, proc, timeout=60)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
        proxy.close()
    assert proc.returncode == -signal.SIGKILL
    # the cut upload published nothing, the two before it are complete (uploads run in parallel, so
    # others may have completed meanwhile), and only blocks whose every donation is stored are
    # marked done (the donor of the cut one is not)
    assert proxy.key is not None
    donated = {name[len(DONATIONS):] for name in store.list(DONATIONS)}
    assert proxy.key not in donated and len(donated) >= 2
    done = {name.rsplit("/", 1)[1] for name in store.list("done/stage1/")}
    gives = {job.layout.block_box(b).name: {d.key for d in job.layout.donations_from(b)}
             for b in job.layout.block_indices()}
    [donor] = [name for name, keys in gives.items() if proxy.key in keys]
    assert donor not in done and all(gives[name] <= donated for name in done)

    if how == "run":  # the same command again, straight to the server
        again = run_stage_process(1, job.store)
    else:  # the next worker: it waits for the dead worker's lease to run out, then runs its task
        again = subprocess.run(cmd, cwd=ROOT, env=stage_env(), capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr[-3000:]
    blend = run_stage_process(2, job.store)
    assert blend.returncode == 0, blend.stderr[-3000:]
    assert_complete_and_exact(job)


def _error_lines(stderr: str) -> list[str]:
    """stderr without the fault hook's own log line."""
    return [line for line in stderr.splitlines() if "test fault hook" not in line]


@pytest.mark.parametrize("fmt", ["precomputed", "zarr"])
def test_server_stopped_mid_run_fails_each_block_in_bounded_time_and_a_rerun_completes(gcs_restartable, tmp_path,
                                                                                      fmt):
    server = gcs_restartable
    job = gcs_job(gcs_restartable.bucket, fmt)
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    # stage one parks after the first block wrote a slab of its core (its donations not yet sent)
    env = stage_env(CHUNKFLOW_TEST_PAUSE_AT="stage1:during-write", CHUNKFLOW_TEST_PAUSE_DIR=str(pauses),
                    CHUNKFLOW_TEST_PAUSE_SECONDS="2")
    proc = subprocess.Popen(run_cmd(1, job.store), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (pauses / "stage1-during-write.pid").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "stage one never reached its first write"
            time.sleep(0.02)
        server.stop()
        stopped = time.monotonic()
        _, err = proc.communicate(timeout=120)
        failing = time.monotonic() - stopped
    finally:
        proc.kill()
    blocks = {job.layout.block_box(b).name for b in job.layout.block_indices()}
    lines = _error_lines(err)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    assert len(lines) == len(blocks), err
    prefix = "chunkflow: error: inference-and-donate "
    assert all(line.startswith(prefix) for line in lines), err
    assert {line[len(prefix):].split(":", 1)[0] for line in lines} == blocks, err
    print(f"{len(blocks)} blocks failed {failing:.1f} s after the server stopped:", *lines, sep="\n")
    # each block fails within about two deadlines (its first call, then its failed/ marker's write)
    assert failing < len(blocks) * 3 * DEADLINE + 15, f"took {failing:.0f} s"

    server.start()  # same port, same objects on disk
    again = run_stage_process(1, job.store)
    assert again.returncode == 0, again.stderr[-3000:]
    blend = run_stage_process(2, job.store)
    assert blend.returncode == 0, blend.stderr[-3000:]
    assert_complete_and_exact(job)


@pytest.mark.parametrize("fmt", ["precomputed", "zarr"])
def test_volume_calls_fail_in_bounded_time_while_the_server_is_gone(gcs_restartable, monkeypatch, fmt):
    """cloud-files (precomputed) and gcsfs (zarr) retry on their own, for minutes without a bound;
    opening a gs:// volume bounds them by CHUNKFLOW_GCS_RETRY_DEADLINE in this process."""
    monkeypatch.setenv("CHUNKFLOW_GCS_RETRY_DEADLINE", str(DEADLINE))
    job = gcs_job(gcs_restartable.bucket, fmt)
    source, target = open_volume(job.input), open_volume(job.output)
    box = job.layout.block_box(Vec(0, 0, 0))
    expected = smooth()[(slice(None),) + box.slices(job.layout.bbox)]
    gcs_restartable.stop()
    for what, call in (("read", lambda: source.read(box)),
                       ("write", lambda: target.write(box, np.zeros_like(expected)))):
        started = time.monotonic()
        with pytest.raises(StorageError) as err:
            call()
        elapsed = time.monotonic() - started
        assert elapsed < 5 + 3 * DEADLINE, f"{what} took {elapsed:.1f} s"
        assert str(err.value).startswith(f"{what} of box {box.name}") and "\n" not in str(err.value)
    gcs_restartable.start()  # the same objects, the same handles
    np.testing.assert_array_equal(source.read(box), expected)
