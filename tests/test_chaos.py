"""Random SIGKILL chaos (benchmarks/chaos_kill.py) as a test: queue workers of both stages are
killed at random instants (the first kill of each stage while a task runs) and replaced; every
run must end complete and exactly equal to the whole-volume reference, and identical across runs."""
from __future__ import annotations

import importlib.util

import pytest

from tests.test_engines_support import ROOT

pytestmark = pytest.mark.integration  # every test here starts real worker processes


def _chaos():
    spec = importlib.util.spec_from_file_location("chaos_kill", ROOT / "benchmarks" / "chaos_kill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(records: list[dict], runs: int, kills: int) -> None:
    assert len(records) == runs and len({r["output_sha256"] for r in records}) == 1
    for record in records:
        stages = [k["stage"] for k in record["killed"]]
        assert stages == [1] * kills + [2] * kills, record  # every planned kill happened, in both stages
        assert record["killed"][0]["doing"].startswith("running ")


def test_fq_workers_killed_at_random_keep_the_output_exact(tmp_path):
    records = _chaos().chaos_runs(runs=2, queue="fq", workers=2, kills=1, seed=11, workdir=tmp_path,
                                  model="identity")
    _check(records, 2, 1)


@pytest.mark.usefixtures("sqs_endpoint")
def test_sqs_workers_killed_at_random_keep_the_output_exact(tmp_path):
    _check(_chaos().chaos_runs(runs=1, queue="sqs", workers=2, kills=1, seed=5, workdir=tmp_path,
                               model="identity"), 1, 1)
