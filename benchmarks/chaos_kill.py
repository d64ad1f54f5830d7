"""Random SIGKILL chaos against queue workers: the output must still be exactly the reference.

Each run plans a small job (16x64x64 in 8 blocks, the tests' valid-convolution net), produces
its stage-one tasks, and keeps a fleet of ``--workers`` queue workers on it: at random times the
chaos monkey SIGKILLs a random worker (mostly one that is running a task, at a random instant of
it: its pid is in a running marker) and starts a new one in its place, as Kubernetes replaces a
lost pod; after ``--kills`` kills it lets the fleet finish. Then ``chunkflow barrier`` produces
stage two and stage two goes through the same. Every run must end with every block done, every
donation present exactly once, the output equal to the whole-volume reference (max |diff| <=
1e-5) and bit-identical to the first run's output; any difference raises.

    python benchmarks/chaos_kill.py --runs 10                     # fq:// queues, 3 workers
    python benchmarks/chaos_kill.py --runs 3 --queue sqs          # AWS_ENDPOINT_URL_SQS (e.g. moto_server)

Workers lease for 2 s (a killed worker's tasks come back 2 s later) with ``--max-attempts``
above the kill budget, since killed attempts count. Prints one line per run and records the runs
(kills, what each killed worker was doing, seconds) in ``results/chaos_kill.json`` unless
``--save False``.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import fire
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# queue workers under SIGKILL: the queue engine (produce, barrier) and the store's markers and donations
# are what this checks; the API runs no queue engine (chunkflow.run: local or dask)
from chunkflow.engines.queue import barrier, produce  # noqa: E402
from chunkflow.storage import open_store, open_volume  # noqa: E402
from tests.test_engines_support import SCRIPTS, assert_complete_and_exact, small_job  # noqa: E402

LEASE = 2


class Fleet:
    """``size`` workers of one stage on one queue, replaced when the monkey kills one."""

    def __init__(self, stage: int, queue: str, size: int, max_attempts: int, logs: Path):
        self.stage, self.queue, self.max_attempts, self.logs = stage, queue, max_attempts, logs
        self.env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.started = 0
        logs.mkdir(parents=True, exist_ok=True)
        self.procs = [self._start() for _ in range(size)]

    def _start(self) -> subprocess.Popen:
        self.started += 1
        with open(self.logs / f"stage{self.stage}-worker{self.started}.log", "w") as log:
            proc = subprocess.Popen([sys.executable, SCRIPTS[self.stage], "worker", self.queue, "--lease", str(LEASE),
                                     "--poll", "0.2", "--max-attempts", str(self.max_attempts), "--quiet"],
                                    env=self.env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
        proc.log = log.name
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.procs.remove(proc)
        self.procs.append(self._start())

    def reap(self) -> None:
        """Forget the workers that stopped by themselves (queue empty); any that failed raises."""
        for proc in [p for p in self.procs if p.poll() is not None]:
            if proc.returncode != 0:
                err = Path(proc.log).read_text()
                raise RuntimeError(f"stage-{self.stage} worker exited {proc.returncode}: {err[-2000:]}")
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def _running_pids(store, stage: int) -> dict[int, str]:
    """pid -> block of the running markers of ``stage`` (markers of dead workers included)."""
    pids = {}
    for name in store.list(f"running/stage{stage}/"):
        try:
            pids[int(json.loads(store.get(name))["pid"])] = name.rsplit("/", 1)[1]
        except (KeyError, ValueError, TypeError):
            continue
    return pids


def run_stage(job, stage: int, queue: str, workers: int, kills: int, rng: random.Random, max_attempts: int,
              logs: Path, timeout: float = 120.0) -> list[dict]:
    """Run one stage's fleet to the end with up to ``kills`` random SIGKILLs (fewer if the fleet
    finishes first), the workers' stderr in ``logs``; returns what each killed worker was doing."""
    store, fleet, killed = open_store(job.store), Fleet(stage, queue, workers, max_attempts, logs), []
    deadline, next_kill = time.monotonic() + timeout, time.monotonic()
    try:
        while fleet.procs:
            if time.monotonic() > deadline:
                raise RuntimeError(f"stage {stage} did not finish in {timeout:g} s")
            fleet.reap()
            if len(killed) < kills and fleet.procs and time.monotonic() >= next_kill:
                # the first kill waits for a running task, so that every stage loses one mid-flight
                doing = _kill_one(fleet, store, stage, rng, deadline, busy=not killed or rng.random() < 0.75)
                if doing is not None:
                    killed.append({"stage": stage, "doing": doing})
                next_kill = time.monotonic() + rng.uniform(0.2, 2.0)
            time.sleep(0.02)
    finally:
        fleet.close()
    return killed


def _kill_one(fleet: Fleet, store, stage: int, rng: random.Random, deadline: float, busy: bool) -> str | None:
    """SIGKILL a worker: with ``busy`` one seen running a task (waiting for one), a random instant
    after it was seen; else any worker, whatever it is doing (starting, polling, holding a lease).
    Returns what the killed worker was doing; None if every worker had stopped by itself."""
    victim = None
    if busy:
        while victim is None and time.monotonic() < deadline:
            ours = {p.pid: p for p in fleet.procs if p.poll() is None}
            if not ours:
                return None
            busy = [pid for pid in _running_pids(store, stage) if pid in ours]
            if busy:
                victim = ours[rng.choice(busy)]
            else:
                time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.1))
    if victim is None or victim.poll() is not None:
        alive = [p for p in fleet.procs if p.poll() is None]
        if not alive:
            return None
        victim = rng.choice(alive)
    block = _running_pids(store, stage).get(victim.pid)
    fleet.kill(victim)
    return f"running {block}" if block else "starting, polling or between tasks"


def _queues(kind: str, workdir: Path) -> tuple[str, str]:
    if kind == "fq":
        return f"fq://{workdir / 'q1'}", f"fq://{workdir / 'q2'}"
    if kind != "sqs":
        raise ValueError(f"--queue {kind!r}: fq or sqs")
    import boto3

    client = boto3.client("sqs", region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    names = [f"chaos-{n}-{uuid.uuid4().hex[:8]}" for n in ("one", "two")]
    for name in names:
        client.create_queue(QueueName=name)
    return f"sqs://{names[0]}", f"sqs://{names[1]}"


def one_run(workdir: Path, queue: str = "fq", workers: int = 3, kills: int = 3, seed: int = 0,
            max_attempts: int | None = None, model: str = "conv3") -> dict:
    """One chaos run in ``workdir``: both stages, ``kills`` SIGKILLs in each; raises AssertionError
    if the result is not complete and exact. Returns the record of the run."""
    rng, started = random.Random(seed), time.monotonic()
    attempts = max_attempts if max_attempts is not None else kills + 3
    job = small_job(workdir, model=model)
    one, two = _queues(queue, workdir)
    produce(job, one)
    killed = run_stage(job, 1, one, workers, kills, rng, attempts, workdir / "logs")
    barrier(job, two, poll=0.2, timeout=60)
    killed += run_stage(job, 2, two, workers, kills, rng, attempts, workdir / "logs")
    assert_complete_and_exact(job)
    output = open_volume(job.output).read(job.layout.bbox)
    return {"seed": seed, "queue": queue, "workers": workers, "killed": killed,
            "seconds": round(time.monotonic() - started, 2), "output_sha256": hashlib.sha256(
                np.ascontiguousarray(output).tobytes()).hexdigest()}


def chaos_runs(runs: int = 3, queue: str = "fq", workers: int = 3, kills: int = 3, seed: int = 0,
               max_attempts: int | None = None, workdir: str | Path | None = None,
               model: str = "conv3") -> list[dict]:
    """``runs`` chaos runs; raises if any output differs from the reference or from the first run."""
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="chunkflow-chaos-"))
    records = []
    for i in range(runs):
        record = one_run(base / f"run{i}", queue, workers, kills, seed + i, max_attempts, model)
        if records and record["output_sha256"] != records[0]["output_sha256"]:
            raise AssertionError(f"run {i}: output differs from run 0's (every run must give the same bytes)")
        records.append(record)
        doing = "; ".join(f"stage {k['stage']}: {k['doing']}" for k in record["killed"]) or "none"
        print(f"run {i}: {len(record['killed'])} workers killed ({doing}); output exact; {record['seconds']} s",
              flush=True)
    return records


def main(runs: int = 3, queue: str = "fq", workers: int = 3, kills: int = 3, seed: int = 0,
         max_attempts: int | None = None, workdir: str | None = None, model: str = "conv3",
         save: bool = True) -> None:
    """Chaos runs (see the module docstring); ``kills`` per stage, ``seed`` of the first run,
    ``model`` conv3 (the tests' valid-convolution net) or identity (faster tasks)."""
    records = chaos_runs(runs, queue, workers, kills, seed, max_attempts, workdir, model)
    print(f"{runs} runs, {sum(len(r['killed']) for r in records)} workers killed, every output exact and identical")
    if save:
        from common import save as save_record

        save_record("chaos_kill", {"runs": records})


if __name__ == "__main__":
    fire.Fire(main)
