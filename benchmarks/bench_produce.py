"""How fast tasks go into a queue, and what an fq:// task costs on disk (docs/fleet.md, "Producing tasks").

    python benchmarks/bench_produce.py --tasks 100000 --repeat 3 [--dir /shared/tmp] [--sqs]

Each trial runs in a fresh process (so its peak memory is its own) and inserts ``--tasks``
stage-two tasks of synthetic block names into a fresh fq:// queue under ``--dir``; trials of
``chunkflow`` (chunkflow.engines.queue_insert) and ``taskqueue`` (python-task-queue's
``TaskQueue.insert`` of partials, what ``produce`` did before) alternate. Reports tasks/s, files
and bytes (apparent and allocated) per task, and peak RSS. ``--sqs`` also sends them to a
moto_server SQS queue on loopback and receives them all back, counting each block once.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STORE, JOB = "file:///shared/projects/em/job", "63d812e1fa75b9ff"


def block_names(n: int) -> list[str]:
    side = 1 + round(n ** (1 / 3))
    names = [f"{z * 112}-{z * 112 + 112}_{y * 1152}-{y * 1152 + 1152}_{x * 1152}-{x * 1152 + 1152}"
             for z in range(side) for y in range(side) for x in range(side)]
    return names[:n]


def one_trial(method: str, n: int, url: str, threads: int | None = None) -> dict:
    # the queue engine's task insertion is what this measures (`chunkflow produce`): not in the API
    from chunkflow.engines.queue import chunkflow_block, open_queue
    from chunkflow.engines.queue_insert import BlockTasks, insert_tasks

    names = block_names(n)
    queue = open_queue(url, create=True)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if method == "chunkflow":
        count = insert_tasks(queue, BlockTasks(chunkflow_block, STORE, JOB, 2, names), url, threads=threads)
    else:
        count = queue.insert([partial(chunkflow_block, store=STORE, job=JOB, stage=2, block=b) for b in names],
                             total=n)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    assert count == n, (count, n)
    result = {"method": method, "tasks": n, "seconds": seconds, "rate": n / seconds, "load": os.getloadavg()[0],
              "user_us": (after.ru_utime - before.ru_utime) / n * 1e6,
              "sys_us": (after.ru_stime - before.ru_stime) / n * 1e6,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if url.startswith("fq://"):
        files = apparent = allocated = 0
        for folder in ("queue", "movement"):
            with os.scandir(os.path.join(url[5:], folder)) as entries:
                for entry in entries:
                    st = entry.stat()
                    files, apparent, allocated = files + 1, apparent + st.st_size, allocated + st.st_blocks * 512
        result.update(files_per_task=files / n, bytes_per_task=apparent / n, allocated_per_task=allocated / n)
    return result


def trial(method: str, n: int, url: str, threads: int | None) -> dict:
    extra = ["--threads", str(threads)] if threads else []
    out = subprocess.run([sys.executable, __file__, "--one", method, "--tasks", str(n), "--url", url, *extra],
                         check=True, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return json.loads(out.stdout.strip().splitlines()[-1])


def sqs_roundtrip(n: int) -> dict:
    """Send n tasks to a moto_server queue, receive them all; count each block once."""
    import boto3

    port = 5000 + os.getpid() % 1000
    proc = subprocess.Popen([shutil.which("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL_SQS=endpoint)
        client = boto3.client("sqs", region_name="us-east-1")
        qurl = client.create_queue(QueueName="bench")["QueueUrl"]
        result = one_trial("chunkflow", n, "sqs://bench")
        seen: dict[str, int] = {}
        while True:
            msgs = client.receive_message(QueueUrl=qurl, MaxNumberOfMessages=10, VisibilityTimeout=600,
                                          WaitTimeSeconds=0).get("Messages", [])
            if not msgs:
                break
            for msg in msgs:
                block = json.loads(msg["Body"])["payload"][2]["block"]
                seen[block] = seen.get(block, 0) + 1
        result.update(received=sum(seen.values()), distinct=len(seen), expected=n)
        return result
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the fq:// queues go")
    parser.add_argument("--methods", default="chunkflow,taskqueue")
    parser.add_argument("--threads", type=int, default=None, help="chunkflow's writer threads (default: its own)")
    parser.add_argument("--sqs", type=int, default=0, help="also round-trip this many tasks through moto's SQS")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_trial(args.one, args.tasks, args.url, args.threads)))
        return
    results: dict[str, list[dict]] = {}
    for r in range(args.repeat):
        for method in args.methods.split(","):
            folder = tempfile.mkdtemp(prefix=f"bench-produce-{method}-", dir=args.dir)
            try:
                res = trial(method, args.tasks, f"fq://{folder}", args.threads)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            results.setdefault(method, []).append(res)
            print(json.dumps(res), flush=True)
    for method, runs in results.items():
        rates = [run["rate"] for run in runs]
        last = runs[-1]
        print(f"{method}: {args.tasks} tasks, median {statistics.median(rates):,.0f} tasks/s "
              f"(runs: {', '.join(f'{r:,.0f}' for r in rates)}); {last['files_per_task']:g} files, "
              f"{last['bytes_per_task']:.0f} bytes, {last['allocated_per_task']:.0f} bytes allocated per task; "
              f"CPU per task {statistics.median(r['user_us'] for r in runs):.0f} us user + "
              f"{statistics.median(r['sys_us'] for r in runs):.0f} us system; peak RSS "
              f"{max(run['peak_rss_mb'] for run in runs):.0f} MB; 10^6 tasks in about "
              f"{1e6 / statistics.median(rates):.0f} s "
              f"at the median rate (load average {statistics.median(r['load'] for r in runs):.1f})")
    if args.sqs:
        print(json.dumps(sqs_roundtrip(args.sqs)))


if __name__ == "__main__":
    main()
