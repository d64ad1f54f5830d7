"""Inserting a stage's tasks into a queue at fleet speed (``chunkflow produce``, ``chunkflow barrier``).

python-task-queue's ``TaskQueue.insert`` turns every task into a ``partial``, checks its
signature, JSON-encodes it and hands it to 40 threads through an unbounded queue (so a million
tasks are all in memory at once); on ``fq://`` every task becomes *two* files (``queue/0--ID.json``
and ``movement/ID``, each taking a whole filesystem block: 8 KiB per task on ext4), and on
``sqs://`` the messages SQS reports as failed inside a ``SendMessageBatch`` are counted as sent.
Here the tasks are built lazily from the block names, in chunks, with a bounded number in flight:

- ``fq://``: one file per task, ``queue/0--ID.json``, written with one ``open``/``write``/``close``
  (no fsync, as python-task-queue); its contents are what python-task-queue writes, less the unused
  ``queueName``. The ``movement/ID`` file is not written: python-task-queue's lease creates it
  (``open(..., 'at')``) the first time the task is leased, and a task is only ever renewed, handed
  back or deleted after a lease, so workers see no difference. The ``insertions`` counter is
  updated once at the end (``chunkflow status --queue``).
- ``sqs://``: ``SendMessageBatch`` of 10 messages from many threads, each message counted only once
  SQS says it took it; entries it failed through no fault of the sender are sent again.

A message body is ``{"payload": [[module, function], [], kwargs, -1]}`` (plus ``"id"`` in a file),
exactly what ``taskqueue.totask`` reads, so every worker, old or new, reads these tasks, and
tasks that python-task-queue inserted are still read the same way.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from functools import partial
from typing import Callable, Iterator, Sequence

from tqdm import tqdm

from chunkflow.engines.task import STAGE_NAMES
from chunkflow.errors import QueueError, one_line

log = logging.getLogger(__name__)

#: tasks per file-queue work item, and threads writing task files. Linux creates the files of one directory one
#: at a time (it holds the directory's lock), so more threads only overlap each file's write and close with the
#: next create (on NFS, round trips to the server); on a local disk 16 threads were slower than 1 to 4
FQ_CHUNK, FQ_THREADS = 256, 4
#: messages per SendMessageBatch (the SQS maximum), and threads sending batches
SQS_BATCH, SQS_THREADS = 10, 32
#: attempts at the entries of a batch that SQS failed through no fault of ours (throttling, internal errors)
SQS_ATTEMPTS = 4
#: errors of a shared filesystem worth another try for the same task file
TRANSIENT = {errno.EAGAIN, errno.ESTALE, errno.ETIMEDOUT, errno.EINTR}
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


class BlockTasks:
    """The tasks of one stage of one job, one per block name, as ``fn(store=, job=, stage=, block=)``.

    ``len`` without building anything; each task's JSON is made only when it is sent.
    """

    def __init__(self, fn: Callable[..., object], store: str, job: str, stage: int, blocks: Sequence[str]):
        self.fn, self.store, self.job, self.stage, self.blocks = fn, store, job, int(stage), blocks
        key = json.dumps([fn.__module__, fn.__name__], separators=(",", ":"))
        self._head = (f'[{key},[],{{"store":{json.dumps(store)},"job":{json.dumps(job)},'
                      f'"stage":{self.stage},"block":')

    def __len__(self) -> int:
        return len(self.blocks)

    def payload(self, block: str) -> str:
        """The task as python-task-queue's JSON payload: ``[[module, name], [], kwargs, -1]``."""
        return f"{self._head}{json.dumps(block)}}},-1]"

    def chunks(self, size: int) -> Iterator[Sequence[str]]:
        for start in range(0, len(self.blocks), size):
            yield self.blocks[start:start + size]

    def partials(self) -> Iterator[partial]:
        for block in self.blocks:
            yield partial(self.fn, store=self.store, job=self.job, stage=self.stage, block=block)


class ChunkFailed(Exception):
    """A work item that stopped part-way: ``count`` of its tasks are in the queue."""

    def __init__(self, count: int, error: BaseException):
        super().__init__(one_line(error))
        self.count, self.error = count, error


def insert_tasks(queue, tasks: BlockTasks, queue_url: str, progress: bool = False,
                 threads: int | None = None) -> int:
    """Insert ``tasks`` into ``queue`` (a ``TaskQueue``); returns how many went in.

    QueueError (one line) if the queue refuses them, saying how many were inserted first.
    """
    from taskqueue.aws_queue_api import AWSTaskQueueAPI
    from taskqueue.file_queue_api import FileQueueAPI

    total = len(tasks)
    if not total:
        return 0
    api = getattr(queue, "api", None)
    if isinstance(api, FileQueueAPI):
        send, size, threads = partial(write_files, api.queue_path, tasks), FQ_CHUNK, threads or FQ_THREADS
    elif isinstance(api, AWSTaskQueueAPI):
        client = sqs_client(api, threads or SQS_THREADS)
        send, size, threads = partial(send_batch, client, api.qurl, tasks), SQS_BATCH, threads or SQS_THREADS
    else:  # another kind of queue: python-task-queue's own insert
        return queue.insert(tasks.partials(), total=total)
    what = f"{STAGE_NAMES.get(tasks.stage, f'stage {tasks.stage}')} tasks"
    tally = Tally()
    try:
        run_chunks(send, tasks.chunks(size), tally, total, threads, progress, f"producing {what}")
    except (KeyboardInterrupt, SystemExit):  # the tasks sent so far stay in the queue
        log.warning("interrupted: %d of %d %s were inserted into %s; %s", tally.inserted, total, what, queue_url,
                    again(tasks, queue_url))
        raise
    finally:
        if isinstance(api, FileQueueAPI) and tally.inserted:
            count_insertions(api, tally.inserted)
    if tally.error is not None:
        raise QueueError(f"{tally.inserted} of {total} {what} were inserted, then {type(tally.error).__name__}: "
                         f"{one_line(tally.error)}; {again(tasks, queue_url)}")
    return tally.inserted


def again(tasks: BlockTasks, queue_url: str) -> str:
    stage = " --stage 2" if tasks.stage == 2 else ""
    return (f"running `chunkflow produce {tasks.store} {queue_url}{stage}` again is safe: it skips the blocks that "
            "are done, and a block not done whose task is queued twice may run twice, which gives the same output")


class Tally:
    """What :func:`run_chunks` has inserted so far, and its first error."""

    def __init__(self) -> None:
        self.inserted = 0
        self.error: BaseException | None = None

    def collect(self, done: set[Future]) -> int:
        """Count the tasks of finished work items; returns how many they inserted."""
        before = self.inserted
        for future in done:
            if future.cancelled():
                continue
            try:
                count = future.result()
            except ChunkFailed as failed:
                count, self.error = failed.count, self.error or failed.error
            except Exception as err:  # noqa: BLE001
                count, self.error = 0, self.error or err
            self.inserted += count
        return self.inserted - before


def run_chunks(send: Callable[[Sequence[str]], int], chunks: Iterator[Sequence[str]], tally: Tally, total: int,
               threads: int, progress: bool, desc: str) -> None:
    """``send`` every chunk from ``threads`` threads, at most ``2 * threads`` chunks in flight, counting
    into ``tally``; stops sending at the first failure (the chunks in flight finish)."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix="produce")
    bar = tqdm(total=total, desc=desc, unit="task", disable=not progress, mininterval=0.5, dynamic_ncols=True)
    pending: set[Future] = set()
    try:
        for chunk in chunks:
            if tally.error is not None:
                break
            pending.add(pool.submit(send, chunk))
            if len(pending) >= 2 * threads:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                bar.update(tally.collect(done))
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            bar.update(tally.collect(done))
    finally:  # also on Ctrl-C: what is running finishes and is counted, what is not started never starts
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.update(tally.collect(pending))
        bar.close()


# ---- fq:// -------------------------------------------------------------------------------------

def write_files(queue_path: str, tasks: BlockTasks, blocks: Sequence[str]) -> int:
    """One task file per block in ``queue_path`` (``0--ID.json``: leasable now); the count written."""
    count, hexes = 0, os.urandom(16 * len(blocks)).hex()  # one system call for the chunk's random ids
    for i, block in enumerate(blocks):
        h = hexes[32 * i:32 * i + 32]
        ident = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"  # a uuid's form, as python-task-queue's ids
        path = os.path.join(queue_path, f"0--{ident}.json")
        data = f'{{"payload":{tasks.payload(block)},"id":"{ident}"}}'.encode()
        for attempt in range(3):
            try:
                write_once(path, data)
                break
            except OSError as err:
                if err.errno not in TRANSIENT or attempt == 2:
                    raise ChunkFailed(count, err) from None
                time.sleep(0.2 * (attempt + 1))
        count += 1
    return count


def write_once(path: str, data: bytes) -> None:
    """Create ``path`` holding ``data``; on a failure no file is left (a worker must never lease half a task)."""
    fd = os.open(path, FILE_FLAGS, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        with_no_error(os.remove, path)
        raise
    os.close(fd)


def count_insertions(api, count: int) -> None:
    """python-task-queue's ``insertions`` counter of an fq:// queue (``chunkflow status --queue``).

    The counter file is created first (holding 0) when it is missing: python-task-queue reads it
    with up to 4 attempts and random back-off, and on a new queue each of them fails, which cost
    0.5-3.5 s of sleep per ``produce``. ``O_EXCL`` leaves a counter that another producer made."""
    with_no_error(create_counter, api.insertions_path)
    try:
        api.add_insert_count(count)
    except Exception as err:  # noqa: BLE001 (the tasks are in; only the counter is off)
        log.warning("the queue's insertion counter was not updated: %s", one_line(err, typed=True))


def create_counter(path: str) -> None:
    fd = os.open(path, FILE_FLAGS, 0o644)
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)


def with_no_error(fn: Callable[..., object], *args: object) -> None:
    try:
        fn(*args)
    except OSError:
        pass


# ---- sqs:// ------------------------------------------------------------------------------------

def sqs_client(api, threads: int):
    """A boto3 SQS client like python-task-queue's (same credentials, region, endpoint) whose connection
    pool holds ``threads`` connections (boto3's default of 10 would make the extra threads wait)."""
    import boto3
    from botocore.config import Config
    from taskqueue.secrets import aws_credentials

    meta, credentials = api.sqs.meta, aws_credentials()
    return boto3.session.Session().client(  # a session of its own: boto3's default one is not thread-safe
        "sqs", region_name=meta.region_name, endpoint_url=meta.endpoint_url,
        aws_access_key_id=credentials.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=credentials.get("AWS_SECRET_ACCESS_KEY"),
        config=meta.config.merge(Config(max_pool_connections=threads)))


def send_batch(client, queue_url: str, tasks: BlockTasks, blocks: Sequence[str]) -> int:
    """One ``SendMessageBatch`` of up to 10 tasks; the count SQS took. Entries SQS failed on its side
    are sent again (up to :data:`SQS_ATTEMPTS` times); one it refuses as the sender's fault is an error."""
    entries = [{"Id": str(i), "MessageBody": f'{{"payload":{tasks.payload(block)}}}'} for i, block in enumerate(blocks)]
    sent = 0
    for attempt in range(SQS_ATTEMPTS):
        try:
            response = client.send_message_batch(QueueUrl=queue_url, Entries=entries)
        except Exception as err:  # noqa: BLE001 (botocore retried throttling and 5xx already)
            raise ChunkFailed(sent, err) from None
        sent += len(response.get("Successful", ()))
        failed = response.get("Failed", ())
        if not failed:
            return sent
        refused = [entry for entry in failed if entry.get("SenderFault")]
        if refused or attempt == SQS_ATTEMPTS - 1:
            first = (refused or failed)[0]
            raise ChunkFailed(sent, QueueError(
                f"SQS {'refused' if refused else 'failed'} {len(refused or failed)} of a batch of {len(entries)} "
                f"messages: {first.get('Code', '?')}: {first.get('Message', '')}"))
        again_ids = {entry["Id"] for entry in failed}
        entries = [entry for entry in entries if entry["Id"] in again_ids]
        time.sleep(0.1 * 2 ** attempt)
    return sent
