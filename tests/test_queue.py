"""Task-queue fleets: sqs:// against a real moto server, fq:// duplicates, and the refusals
(a queue of another job, a manifest changed after planning, a stage-one queue given to a
stage-two worker, stage two produced early)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import fire
import pytest

from chunkflow.cli import COMMANDS
from chunkflow.cli_stages import main as stage_main
from chunkflow.engines.queue import barrier, open_queue, produce
from chunkflow.job import MANIFEST, Job
from tests.test_engines_support import assert_complete_and_exact, fleet_env, run_fleet, small_job

AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def sqs_endpoint():
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
    env = dict(AWS, AWS_ENDPOINT_URL_SQS=url)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.kill()
        proc.wait()


def _sqs_queue(name: str) -> str:
    import boto3

    boto3.client("sqs", region_name="us-east-1").create_queue(QueueName=name)
    return f"sqs://{name}"


def test_sqs_fleet_with_barrier_equals_reference(tmp_path, sqs_endpoint):
    job = small_job(tmp_path)
    one, two = _sqs_queue(f"one-{uuid.uuid4().hex[:8]}"), _sqs_queue(f"two-{uuid.uuid4().hex[:8]}")
    assert produce(job, one) == job.layout.num_blocks
    assert open_queue(one).enqueued == job.layout.num_blocks
    run_fleet(1, one, fleet_env())
    assert open_queue(one).enqueued == 0
    assert barrier(job, two, poll=0.2, timeout=30) == job.layout.num_blocks
    outputs = run_fleet(2, two, fleet_env())
    assert sum(int(o.split(": ")[1].split(" tasks run")[0]) for o in outputs) == job.layout.num_blocks
    assert_complete_and_exact(job)


def test_missing_sqs_queue_ends_in_one_line(tmp_path, sqs_endpoint, capsys):
    job = small_job(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        fire.Fire(COMMANDS, ["produce", job.store, "sqs://no-such-queue", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "cannot use queue sqs://no-such-queue" in err and len(err.splitlines()) == 1


def test_fq_every_task_twice_equals_reference(tmp_path, capsys):
    """Each task is in the queue twice and forced: both copies run, on two workers."""
    job = small_job(tmp_path)
    one, two = f"fq://{tmp_path / 'q1'}", f"fq://{tmp_path / 'q2'}"
    produce(job, one)
    produce(job, one, force=True)
    fire.Fire(COMMANDS, ["status", job.store, "--queue", one, "--json"])
    assert json.loads(capsys.readouterr().out)["queue"]["enqueued"] == 2 * job.layout.num_blocks
    run_fleet(1, one, fleet_env(), flags=("--force",))
    produce(job, two, stage=2)
    produce(job, two, stage=2, force=True)
    run_fleet(2, two, fleet_env(), flags=("--force",))
    fire.Fire(COMMANDS, ["status", job.store, "--queue", one, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["queue"]["completed"] == 2 * job.layout.num_blocks and report["queue"]["enqueued"] == 0
    assert produce(job, one) == 0 and produce(job, two, stage=2) == 0  # nothing left to produce
    assert_complete_and_exact(job)


def _refused(capsys, stage: int, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        stage_main(stage, argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_worker_refuses_a_queue_of_another_job(tmp_path, capsys):
    job, other = small_job(tmp_path / "a"), small_job(tmp_path / "b", seed=2)
    assert job.job_hash != other.job_hash
    queue = f"fq://{tmp_path / 'q'}"
    produce(job, queue)
    err = _refused(capsys, 1, ["worker", queue, "--job", other.store, "--quiet"])
    assert f"belongs to job {job.job_hash}" in err and f"serves job {other.job_hash}" in err
    assert open_queue(queue).enqueued == job.layout.num_blocks and open_queue(queue).leased == 0  # handed back


def test_worker_refuses_a_manifest_changed_after_planning(tmp_path, capsys):
    job = small_job(tmp_path)
    queue = f"fq://{tmp_path / 'q'}"
    produce(job, queue)
    manifest = Path(tmp_path / "job" / MANIFEST)
    raw = json.loads(manifest.read_text())
    raw["blend"] = "constant"
    manifest.write_text(json.dumps(raw))  # edited, hash not updated
    assert "was changed after planning" in _refused(capsys, 1, ["worker", queue, "--quiet"])
    raw["job_hash"] = ""
    manifest.write_text(Job(**raw).to_json())  # a consistent manifest of another job
    assert "the manifest changed after the tasks were produced" in _refused(capsys, 1, ["worker", queue, "--quiet"])
    assert open_queue(queue).enqueued == job.layout.num_blocks


def test_stage_two_worker_refuses_stage_one_tasks_and_early_stage_two(tmp_path, capsys):
    job = small_job(tmp_path)
    queue = f"fq://{tmp_path / 'q'}"
    produce(job, queue)
    assert "receive_and_blend workers take stage-two tasks" in _refused(capsys, 2, ["worker", queue, "--quiet"])
    with pytest.raises(SystemExit):
        fire.Fire(COMMANDS, ["produce", job.store, queue, "--stage", "2", "--quiet"])
    assert "stage one of job" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fire.Fire(COMMANDS, ["barrier", job.store, queue, "--poll", "0.1", "--timeout", "0.3", "--quiet"])
    assert "8 of 8 blocks not done" in capsys.readouterr().err
