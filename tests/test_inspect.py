"""`chunkflow inspect`: the report, its JSON, one block, PNG slices, and one-line errors.

CLI tests run the installed ``chunkflow`` command in a subprocess against a local store or
the real fake-gcs-server. fake-gcs-server has no access control and never answers 403, so
the permission tests put :class:`PolicyProxy` in front of it: a loopback HTTP proxy that
forwards every request to the real server unless its policy denies it, in which case it
answers 403 with the error body GCS sends. The client libraries cannot tell the difference.
"""
from __future__ import annotations

import http.client
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from chunkflow.bbox import Bbox, Vec
from chunkflow.engines import LocalEngine, run_stage
from chunkflow.donation_format import format_table
from chunkflow.donation_report import inspect_store
from chunkflow.inspect_png import TINTS, CORE, MISSING
from chunkflow.planning import plan
from chunkflow.stages import DONATIONS
from chunkflow.storage import StorageError, create_volume, open_store
from chunkflow.storage.donation_codec import encode_donation
from tests.test_gcs_pipeline import SHAPE, gcs_job, smooth

CHUNKFLOW = shutil.which("chunkflow", path=str(Path(sys.executable).parent)) or "chunkflow"
TARGET = Vec(1, 1, 1)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``chunkflow inspect ARGS``; ``env`` values of None remove a variable."""
    merged = {**os.environ, **(env or {})}
    return subprocess.run([CHUNKFLOW, "inspect", *args], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in merged.items() if v is not None})


def one_line_error(result: subprocess.CompletedProcess, *fragments: str, stdout: str = "") -> str:
    """Exit 2, one error line on stderr; stdout is empty, or (a stage run) only its summary."""
    err = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert len(err.splitlines()) == 1 and err.startswith("chunkflow: error: "), err
    assert result.stdout.strip() == stdout
    for fragment in fragments:
        assert fragment in err, err
    return err


def _stage_summary(stdout: str) -> str:
    """A stage run prints its one-line summary even when its only block was refused."""
    line = stdout.strip()
    assert len(line.splitlines()) == 1 and line.startswith("stage two: 0 blocks run") and line.endswith("1 failed")
    return line


@pytest.fixture
def local_job(tmp_path):
    """Stage one done on a local job; block TARGET then loses one donation and has another corrupted."""
    vol = create_volume(f"file://{tmp_path / 'in'}", Bbox.from_shape((0, 0, 0), SHAPE), Vec(8, 32, 32), 1, "float32")
    vol.write(vol.bbox, smooth())
    job = plan(vol.url, f"file://{tmp_path / 'out'}", str(tmp_path / "job"), "identity", "8,32,32",
               overlap="2,8,8", block="8,32,32", compression="zstd")
    run_stage(job, 1, LocalEngine(), progress=False)
    keys = [d.key for d in job.layout.donations_to(TARGET)]
    root = tmp_path / "job" / "donations"
    (root / keys[0]).unlink()
    data = bytearray((root / keys[1]).read_bytes())
    data[-7] ^= 0x55
    (root / keys[1]).write_bytes(bytes(data))
    return job, keys


def test_report_names_missing_and_corrupt_pieces(local_job):
    job, keys = local_job
    block = job.layout.block_box(TARGET).name
    listed = inspect_store(open_store(job.store))
    assert listed.counts() == {"complete": job.layout.num_blocks - 1, "blended": 0, "incomplete": 1, "bad": 0}
    text = "\n".join(format_table(listed))
    assert f"missing   {keys[0]} (block {block})" in text and keys[1] not in text  # bodies not read
    verified = inspect_store(open_store(job.store), verify=True)
    text = "\n".join(format_table(verified))
    assert f"refused   donation {keys[1]} is corrupt" in text and verified.counts()["bad"] == 1
    assert verified.raw_bytes > verified.stored_bytes  # zstd on smooth data: the ratio is reported
    assert "ratio" in verified.summary()


@pytest.mark.slow  # the installed `chunkflow inspect` in subprocesses
def test_cli_table_json_and_block(local_job):
    job, keys = local_job
    block = job.layout.block_box(TARGET).name
    table = cli(job.store)
    assert table.returncode == 1 and table.stderr == ""  # problems found: exit 1
    assert f"missing   {keys[0]} (block {block})" in table.stdout
    assert table.stdout.splitlines()[-1].startswith(f"summary: {job.layout.num_blocks} blocks: 7 complete")

    verified = json.loads(cli(job.store, "--json", "--verify").stdout)
    assert verified["healthy"] is False and verified["job_hash"] == job.job_hash
    [row] = [b for b in verified["blocks"] if b["block"] == block]
    assert row["state"] == "bad" and row["missing"] == [keys[0]] and row["checksum"] == "bad"
    assert any(keys[1] in e and "checksum mismatch" in e for e in row["errors"])

    detail = cli(job.store, "--block", block)
    assert detail.returncode == 1
    lines = detail.stdout.splitlines()
    assert any(line.split()[0] == keys[0] and "MISSING" in line for line in lines if line.startswith("  "))
    rows = [line.split() for line in lines if line.startswith("  ") and "%" in line]
    assert len(rows) == len(keys) and all(r[-2] == "ok" for r in rows if r[2] == "present")  # headers read

    corrupt = cli(job.store, "--piece", keys[1])
    assert corrupt.returncode == 1 and "checksum_status bad" in corrupt.stdout
    assert f"error           donation {keys[1]} is corrupt: checksum mismatch" in corrupt.stdout
    good = json.loads(cli(job.store, "--piece", keys[2], "--json").stdout)
    assert good["job_match"] == "ok" and good["checksum_status"] == "ok" and good["compression"] == "zstd"
    assert good["ratio"] == round(good["nbytes_raw"] / good["stored_bytes"], 3)


@pytest.mark.slow  # the installed `chunkflow inspect` in subprocesses
def test_cli_region_sample_and_limit(local_job):
    job, keys = local_job
    block = job.layout.block_box(TARGET).name
    # the region touches TARGET and the block below it along x: exactly those two, each with its pieces
    region = "30-40_40-50_10-12"
    report = json.loads(cli(job.store, "--region", region, "--json").stdout)
    boxes = [job.layout.block_box(idx) for idx in job.layout.block_indices()]
    inside = [b.name for b in boxes if not b.intersect(Bbox.from_name(region)).is_empty()]
    assert [b["block"] for b in report["blocks"]] == inside and len(inside) == 2 and block in inside
    assert report["selection"] == {"block": None, "region": region, "blocks": 2} and report["rows"] == "all"
    assert all(len(b["pieces"]) == b["expected"] for b in report["blocks"])
    text = cli(job.store, "--region", region)
    assert text.returncode == 1 and f"region {region}: 2 blocks intersect it" in text.stdout
    assert f"pieces of block {block}:" in text.stdout and f"missing   {keys[0]} (block {block})" in text.stdout

    # a sample that covers every donation of the job finds the corrupt one; a small one reads only that many
    everything = json.loads(cli(job.store, "--verify", "--sample", "1000", "--json").stdout)
    present = everything["donations"]["present"]
    assert everything["sample"] == {"requested": 1000, "read": present, "of": present}
    assert everything["counts"]["bad"] == 1 and everything["checked"] == "verified"
    few = json.loads(cli(job.store, "--sample", "3", "--json", "--quiet").stdout)
    assert few["sample"] == {"requested": 3, "read": 3, "of": present}

    # rows: every block when the job has at most --limit blocks, else only the problem blocks
    limited = json.loads(cli(job.store, "--json", "--limit", "2").stdout)
    assert limited["rows"] == "problems" and [b["block"] for b in limited["blocks"]] == [block]
    assert "pieces" not in limited["blocks"][0] and limited["blocks"][0]["missing"] == [keys[0]]
    assert limited["counts"] == {"complete": job.layout.num_blocks - 1, "blended": 0, "incomplete": 1, "bad": 0}
    table = cli(job.store, "--limit", "2")
    assert "(rows for the first 1 of 1 incomplete or bad blocks" in table.stdout
    assert table.stdout.splitlines()[-1].startswith(f"summary: {job.layout.num_blocks} blocks: 7 complete")


@pytest.mark.slow  # the installed `chunkflow inspect` in subprocesses
def test_cli_png_of_a_block_and_of_a_piece(local_job, tmp_path):
    job, keys = local_job
    block = job.layout.block_box(TARGET).name
    png = tmp_path / "block.png"
    result = cli(job.store, "--block", block, "--png", str(png), "--z", "12")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {png}: block {block}")
    rgb = np.asarray(Image.open(png).convert("RGB"))
    colours = {tuple(c) for c in rgb.reshape(-1, 3)}
    assert TINTS[MISSING] in colours and TINTS[CORE] in colours   # the gap and the core are visible
    assert rgb.shape[1] > 2 * 256                                  # two panels, upscaled

    piece = [d for d in job.layout.donations_to(TARGET) if d.key == keys[2]][0]
    result = cli(job.store, "--piece", piece.key, "--png", str(tmp_path / "piece.png"))
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "piece.png").size[0] >= piece.piece.shape[2]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a subprocess per case
@pytest.mark.parametrize("case", ["not a store", "no block", "bad z", "png without target", "png dir missing",
                                  "junk piece", "absent piece", "z not a number", "z not whole",
                                  "channel not a number", "channel negative", "workers not a number", "workers 0",
                                  "region not a box", "region empty box", "region outside", "region and block",
                                  "sample 0", "sample not a number", "sample not whole", "limit negative"])
def test_cli_local_errors_are_one_line_and_write_nothing(local_job, tmp_path, case):
    job, keys = local_job
    block = job.layout.block_box(TARGET).name
    png = tmp_path / "nothing.png"
    args, fragments = {
        "not a store": ([str(tmp_path / "nowhere")], ["no chunkflow job and no donations at"]),
        "no block": ([job.store, "--block", "0-1_0-1_0-1"], ["0-1_0-1_0-1 is not a block of this job"]),
        "bad z": ([job.store, "--block", block, "--png", str(png), "--z", "99"], ["--z 99 is outside"]),
        "png without target": ([job.store, "--png", str(png)], ["--png needs --block NAME or --piece KEY"]),
        "png dir missing": ([job.store, "--block", block, "--png", str(tmp_path / "no" / "x.png")],
                            ["cannot write PNG"]),
        "junk piece": ([job.store, "--piece", "../x"], ["is not a donation key"]),
        "absent piece": ([job.store, "--piece", keys[0]], [f"donation {keys[0]} is not in"]),
        "z not a number": ([job.store, "--block", block, "--png", str(png), "--z", "abc"],
                           ["--z 'abc' is not an integer"]),
        "z not whole": ([job.store, "--block", block, "--png", str(png), "--z", "1.5"], ["--z 1.5 is not an integer"]),
        "channel not a number": ([job.store, "--block", block, "--png", str(png), "--channel", "abc"],
                                 ["--channel 'abc' is not an integer"]),
        "channel negative": ([job.store, "--piece", keys[2], "--png", str(png), "--channel=-1"],
                             ["--channel -1 must be >= 0"]),
        "workers not a number": ([job.store, "--verify", "--workers", "abc"], ["--workers 'abc' is not an integer"]),
        "workers 0": ([job.store, "--verify", "--workers", "0"], ["--workers 0 must be a positive integer"]),
        "region not a box": ([job.store, "--region", "abc"],
                             ["--region 'abc' is not a box x0-x1_y0-y1_z0-z1 of integers"]),
        "region empty box": ([job.store, "--region", "9-3_0-8_0-8"], ["--region '9-3_0-8_0-8' is not a box"]),
        "region outside": ([job.store, "--region", "100-200_0-8_0-8"],
                           [f"--region 100-200_0-8_0-8 does not intersect the job's volume {job.layout.bbox.name}"]),
        "region and block": ([job.store, "--region", "0-8_0-8_0-8", "--block", block],
                             ["--block and --region cannot be used together"]),
        "sample 0": ([job.store, "--verify", "--sample", "0"], ["--sample 0 must be a positive integer"]),
        "sample not a number": ([job.store, "--verify", "--sample", "abc"], ["--sample 'abc' is not an integer"]),
        "sample not whole": ([job.store, "--sample", "2.5"], ["--sample 2.5 is not an integer"]),
        "limit negative": ([job.store, "--limit=-1"], ["--limit -1 must be >= 0"]),
    }[case]
    one_line_error(cli(*args), *fragments)
    assert not png.exists() and not (tmp_path / "nowhere").exists() and not (tmp_path / "no").exists()


@pytest.fixture
def gcs_damaged(gcs_bucket):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    job = gcs_job(gcs_bucket)
    run_stage(job, 1, LocalEngine(), progress=False)
    keys = [d.key for d in job.layout.donations_to(TARGET)]
    bucket = storage.Client(project="x", credentials=AnonymousCredentials()).bucket(gcs_bucket)
    bucket.blob(f"job/{DONATIONS}{keys[0]}").delete()
    blob = bucket.blob(f"job/{DONATIONS}{keys[1]}")
    blob.upload_from_string(blob.download_as_bytes()[:-10])  # truncated
    bucket.blob(f"job/{DONATIONS}../escape").upload_from_string(b"junk")
    return job, keys


def test_cli_on_gcs(gcs_damaged, tmp_path):
    job, keys = gcs_damaged
    table = cli(job.store, "--verify")
    assert table.returncode == 1, table.stderr
    assert f"missing   {keys[0]}" in table.stdout and f"refused   donation {keys[1]} is truncated" in table.stdout
    assert "malformed donations/../escape: skipped, not read" in table.stdout
    report = json.loads(cli(job.store, "--json").stdout)
    assert report["malformed"][0]["name"] == "donations/../escape" and report["counts"]["incomplete"] == 1
    png = cli(job.store, "--block", job.layout.block_box(TARGET).name, "--png", str(tmp_path / "b.png"))
    width, height = Image.open(tmp_path / "b.png").size
    assert png.returncode == 0 and png.stdout.splitlines() == [  # cloud-files' notices are kept off stdout
        f"wrote {tmp_path / 'b.png'}: block {job.layout.block_box(TARGET).name}, {width}x{height} px",
        f"refused   donation {keys[1]} is truncated"]


class PolicyProxy:
    """A loopback proxy to the real fake-gcs-server that answers 403 where ``deny(method, path)``."""

    def __init__(self, upstream: str, deny):
        up = urlparse(upstream)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_one(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if deny(self.command, self.path):
                    payload = json.dumps({"error": {"code": 403, "message": "caller does not have storage.objects "
                                          "access to the Google Cloud Storage bucket. Permission denied.",
                                          "errors": [{"domain": "global", "reason": "forbidden"}]}}).encode()
                    status, headers = 403, [("Content-Type", "application/json; charset=UTF-8")]
                else:
                    conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                    conn.request(self.command, self.path, body=body,
                                 headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                    resp = conn.getresponse()
                    payload, status = resp.read(), resp.status
                    headers = [(k, v) for k, v in resp.getheaders()
                               if k.lower() not in ("content-length", "transfer-encoding", "connection")]
                    conn.close()
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = handle_one

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        outer.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        outer.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(gcs_server):
    made = []

    def make(deny):
        p = PolicyProxy(gcs_server, deny)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def test_read_only_permission_gives_one_line_403_on_write(gcs_damaged, proxy, monkeypatch):
    job, _ = gcs_damaged
    read_only = proxy(lambda method, path: method not in ("GET", "HEAD"))
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", read_only.url)
    store = open_store(job.store, retry_deadline=1)
    assert inspect_store(store).job_hash == job.job_hash  # reading is allowed...
    with pytest.raises(StorageError) as err:                 # ...writing is not
        store.put(DONATIONS + "0-32_0-32_0-8%0-8_0-32_0-8", b"x")
    assert str(err.value).startswith(f"permission denied: write {job.store}/donations/") and "403" in str(err.value)


@pytest.mark.parametrize("case", ["missing bucket", "refused", "forbidden", "forbidden body", "no bucket name",
                                  "stage two"])
def test_cli_gcs_errors_are_one_line_exit_2(gcs_damaged, proxy, tmp_path, case):
    job, keys = gcs_damaged
    env = {"CHUNKFLOW_GCS_RETRY_DEADLINE": "1"}
    png = tmp_path / "x.png"
    args = [job.store, "--png", str(png), "--block", job.layout.block_box(TARGET).name]
    if case == "missing bucket":
        name = f"missing-{uuid.uuid4().hex[:8]}"
        one_line_error(cli(f"gs://{name}/job", *args[1:], env=env), f"bucket {name} does not exist")
    elif case == "refused":
        port = _closed_port()
        env["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
        one_line_error(cli(*args, env=env), "connection refused", f"127.0.0.1:{port}")
    elif case == "forbidden":
        env["STORAGE_EMULATOR_HOST"] = proxy(lambda method, path: True).url
        one_line_error(cli(*args, env=env), f"permission denied: open {job.store}", "403")
    elif case == "forbidden body":  # listing allowed, object reads denied
        env["STORAGE_EMULATOR_HOST"] = proxy(lambda method, path: "alt=media" in path).url
        one_line_error(cli(job.store, "--verify", env=env), "permission denied: read", "403")
    elif case == "no bucket name":
        one_line_error(cli("gs://", env=env), "names no bucket")
    else:  # stage two names every problem of the block: missing, truncated and another job's piece
        foreign = encode_donation(np.zeros((1, *Bbox.from_name(keys[2].split("%")[1]).shape), np.float32),
                                  Bbox.from_name(keys[2].split("%")[1]), keys[2], "0123456789abcdef")
        open_store(job.store).put(DONATIONS + keys[2], foreign)
        script = str(Path(__file__).parents[1] / "receive_and_blend.py")
        result = subprocess.run([sys.executable, script, job.store, "--blocks", job.layout.block_box(TARGET).name,
                                 "--quiet"], capture_output=True, text=True, timeout=120, env={**os.environ, **env})
        one_line_error(result, f"{keys[0]}", f"donation {keys[1]} is truncated",
                       f"donation {keys[2]} belongs to job 0123456789abcdef, not {job.job_hash}", "nothing was written",
                       stdout=_stage_summary(result.stdout))
    assert not png.exists()


def _service_account(path: Path, token_uri: str) -> Path:
    """A well-formed service-account key file (a fresh RSA key) whose token endpoint is ``token_uri``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path.write_text(json.dumps({"type": "service_account", "project_id": "lab", "private_key_id": "1",
                                "private_key": pem, "client_email": "worker@lab.iam.gserviceaccount.com",
                                "client_id": "1", "token_uri": token_uri}))
    return path


@pytest.mark.parametrize("case", ["no file", "not a key", "token endpoint down", "adc file missing"])
def test_cli_credential_errors_are_one_line(gcs_server, tmp_path, case):
    env = {"CHUNKFLOW_GCS_RETRY_DEADLINE": "1"}
    if case == "no file":
        result = cli("gs://lab/job", "--credentials", str(tmp_path / "none.json"), env=env)
        one_line_error(result, f"cannot load Google credentials '{tmp_path / 'none.json'}'")
    elif case == "not a key":
        (tmp_path / "key.json").write_text("{}")
        one_line_error(cli("gs://lab/job", "--credentials", str(tmp_path / "key.json"), env=env),
                       "cannot load Google credentials")
    elif case == "token endpoint down":
        key = _service_account(tmp_path / "key.json", f"http://127.0.0.1:{_closed_port()}/token")
        one_line_error(cli("gs://lab/job", "--credentials", str(key), env=env),
                       "cannot get an access token (open gs://lab/job)", "Connection refused")
    else:
        env.update(STORAGE_EMULATOR_HOST=None, GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "none.json"))
        one_line_error(cli("gs://lab/job", env=env), "GOOGLE_APPLICATION_CREDENTIALS for gs://lab/job",
                       "none.json was not found")
