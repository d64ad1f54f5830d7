"""Producing tasks at fleet speed (issue 13): fq:// tasks are one small file each, streamed in chunks
with bounded memory; sqs:// tasks go in 10-message batches and arrive exactly once (a real moto
server); workers read these tasks and the ones python-task-queue inserted before; a queue that
fails part-way ends in one line saying how many tasks went in."""
from __future__ import annotations

import json
import shutil
import tracemalloc
import uuid
from functools import partial
from pathlib import Path

import pytest
from taskqueue.queueables import totask

from chunkflow.engines.queue import chunkflow_block, open_queue, produce, task_spec
from chunkflow.engines.queue_insert import BlockTasks, insert_tasks
from chunkflow.errors import QueueError
from tests.test_engines_support import fleet_env, run_fleet, small_job, tasks_run

STORE, JOB = "file:///shared/projects/em/job", "63d812e1fa75b9ff"


def names(n: int) -> list[str]:
    return [f"{i * 112}-{i * 112 + 112}_0-1152_0-1152" for i in range(n)]


def fq_blocks(folder: Path) -> list[str]:
    """The block of every task file in an fq:// queue, checking each file's id against its name."""
    blocks = []
    for path in (folder / "queue").iterdir():
        data = json.loads(path.read_text())
        assert path.name == f"0--{data['id']}.json"
        blocks.append(task_spec(totask(data), "fq://test").block)
    return blocks


def all_names(job) -> set[str]:
    return {job.layout.block_box(b).name for b in job.layout.block_indices()}


def test_fq_task_is_one_small_file_that_the_queue_leases_renews_and_deletes(tmp_path):
    job = small_job(tmp_path)
    url = f"fq://{tmp_path / 'q'}"
    assert produce(job, url) == job.layout.num_blocks
    files = list((tmp_path / "q" / "queue").iterdir())
    assert len(files) == job.layout.num_blocks and not list((tmp_path / "q" / "movement").iterdir())
    assert all(path.stat().st_size < 512 for path in files)  # python-task-queue wrote two files of ~300 + 45 bytes
    assert sorted(fq_blocks(tmp_path / "q")) == sorted(all_names(job))
    queue = open_queue(url)
    assert queue.inserted == job.layout.num_blocks and queue.enqueued == job.layout.num_blocks
    task = queue.lease(seconds=60, num_tasks=1, wait_sec=0)
    spec = task_spec(task, url)
    assert (spec.store, spec.job, spec.stage) == (job.store, job.job_hash, 1)
    queue.renew(task, 120)
    assert queue.leased == 1
    queue.cancel(task)
    assert queue.leased == 0
    leased = [queue.lease(seconds=60, num_tasks=1, wait_sec=0) for _ in range(job.layout.num_blocks)]
    assert {task_spec(t, url).block for t in leased} == all_names(job)
    queue.release_all()
    for t in leased:
        queue.delete(t)
    assert queue.enqueued == 0 and not list((tmp_path / "q" / "movement").iterdir())


def test_producing_into_a_new_fq_queue_never_sleeps_in_a_retry(tmp_path, monkeypatch):
    """python-task-queue reads a missing insertion counter through a retry that sleeps seconds;
    produce creates the counter first, so a new queue is filled without waiting."""
    import time

    sleeps, sleep = [], time.sleep
    monkeypatch.setattr(time, "sleep", lambda seconds: (sleeps.append(seconds), sleep(seconds)))
    job = small_job(tmp_path)
    url = f"fq://{tmp_path / 'q'}"
    assert produce(job, url) == job.layout.num_blocks and produce(job, url, force=True) == job.layout.num_blocks
    assert sleeps == [] and open_queue(url).inserted == 2 * job.layout.num_blocks

@pytest.mark.integration  # queue worker processes
def test_a_fleet_runs_tasks_of_both_formats_in_one_queue(tmp_path):
    """Tasks python-task-queue inserted (two files each) and new ones (one file) in one queue: workers
    run every block once and leave the queue empty, movement files included."""
    job = small_job(tmp_path)
    url = f"fq://{tmp_path / 'q'}"
    indices = list(job.layout.block_indices())
    old = [job.layout.block_box(b).name for b in indices[::2]]
    open_queue(url, create=True).insert(
        [partial(chunkflow_block, store=job.store, job=job.job_hash, stage=1, block=name) for name in old])
    assert produce(job, url, blocks=indices[1::2]) == len(indices[1::2])
    assert len(list((tmp_path / "q" / "movement").iterdir())) == len(old)
    outputs = run_fleet(1, url, fleet_env())
    assert sum(tasks_run(o) for o in outputs) == job.layout.num_blocks
    assert open_queue(url).enqueued == 0 and not list((tmp_path / "q" / "movement").iterdir())


@pytest.mark.slow  # 20,000 tasks: a scale test
def test_fq_many_tasks_each_exactly_once_in_bounded_memory(tmp_path):
    url = f"fq://{tmp_path / 'q'}"
    blocks = names(20_000)
    queue = open_queue(url, create=True)
    tracemalloc.start()
    try:
        assert insert_tasks(queue, BlockTasks(chunkflow_block, STORE, JOB, 2, blocks), url) == len(blocks)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    found = fq_blocks(tmp_path / "q")
    assert len(found) == len(blocks) and set(found) == set(blocks)
    assert queue.inserted == len(blocks)
    # python-task-queue's insert holds every task at once (a peak of ~8 MiB here, ~400 MB for a million
    # tasks); only the chunks in flight are built here (~0.3 MiB)
    assert peak < 2 * 2 ** 20, f"{peak / 2 ** 20:.1f} MiB"


def test_produce_shows_progress_with_a_rate(tmp_path, capfd):
    job = small_job(tmp_path)
    produce(job, f"fq://{tmp_path / 'q'}", progress=True)
    err = capfd.readouterr().err
    assert "producing inference-and-donate tasks" in err, err
    assert f"{job.layout.num_blocks}/{job.layout.num_blocks}" in err and "task/s" in err, err


def test_fq_queue_gone_ends_in_one_line(tmp_path):
    job = small_job(tmp_path)
    url = f"fq://{tmp_path / 'q'}"
    queue = open_queue(url, create=True)
    shutil.rmtree(tmp_path / "q")
    with pytest.raises(QueueError) as err:
        produce(job, url, queue=queue)
    message = str(err.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"cannot insert into {url}: 0 of {job.layout.num_blocks} ")
    assert "FileNotFoundError" in message and f"chunkflow produce {job.store} {url}` again is safe" in message


# ---- sqs:// (a real moto server) ---------------------------------------------------------------

def sqs_queue(name: str) -> tuple[object, str]:
    import boto3

    client = boto3.client("sqs", region_name="us-east-1")
    return client, client.create_queue(QueueName=name)["QueueUrl"]


def receive_all(client, qurl: str) -> list[str]:
    """Every message's block, each message received once (kept invisible) until the queue is empty."""
    blocks = []
    while True:
        msgs = client.receive_message(QueueUrl=qurl, MaxNumberOfMessages=10, VisibilityTimeout=600,
                                      WaitTimeSeconds=0).get("Messages", [])
        if not msgs:
            return blocks
        blocks += [task_spec(totask(json.loads(m["Body"])), "sqs://test").block for m in msgs]


def test_sqs_tasks_arrive_exactly_once(sqs_endpoint):
    name = f"produce-{uuid.uuid4().hex[:8]}"
    client, qurl = sqs_queue(name)
    blocks = names(203)  # not a multiple of 10: the last batch is short (moto receives slowly: few messages)
    queue = open_queue(f"sqs://{name}")
    assert insert_tasks(queue, BlockTasks(chunkflow_block, STORE, JOB, 2, blocks), f"sqs://{name}") == len(blocks)
    received = receive_all(client, qurl)
    assert len(received) == len(blocks) and set(received) == set(blocks)


def test_sqs_partial_insert_says_how_many_went_in(sqs_endpoint):
    """A message SQS refuses (too long) in the middle: the error says how many tasks were inserted,
    and exactly that many are in the queue."""
    name = f"partial-{uuid.uuid4().hex[:8]}"
    client, qurl = sqs_queue(name)
    blocks = names(400)
    blocks[200] = "x" * 1_100_000  # over SQS's limit (256 KiB, 1 MiB since 2025)
    url = f"sqs://{name}"
    with pytest.raises(QueueError) as err:
        insert_tasks(open_queue(url), BlockTasks(chunkflow_block, STORE, JOB, 2, blocks), url)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "again is safe" in message and "--stage 2" in message, message
    inserted = int(message.split(" of ")[0])
    received = receive_all(client, qurl)
    assert 0 < inserted < len(blocks), message
    assert len(received) == inserted == len(set(received)), (inserted, len(received))


def test_sqs_queue_deleted_after_opening_ends_in_one_line(tmp_path, sqs_endpoint):
    job = small_job(tmp_path)
    name = f"gone-{uuid.uuid4().hex[:8]}"
    client, qurl = sqs_queue(name)
    url = f"sqs://{name}"
    queue = open_queue(url)
    client.delete_queue(QueueUrl=qurl)
    with pytest.raises(QueueError) as err:
        produce(job, url, queue=queue)
    message = str(err.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"cannot insert into {url}: 0 of {job.layout.num_blocks} inference-and-donate tasks "
                              "were inserted, then "), message
    assert "queue does not exist" in message, message
    assert "again is safe" in message
