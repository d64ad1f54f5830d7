#!/usr/bin/env python
"""Stage two: fetch the donations of a block, add them into its band, write aligned output.

    python receive_and_blend.py run JOB --blocks all      blocks of a planned job, in this process
    python receive_and_blend.py worker QUEUE [--wait]     a fleet worker leasing tasks from fq:// or sqs://

Run `python receive_and_blend.py run --help` or `python receive_and_blend.py worker --help` for every flag.
"""
from chunkflow.cli.common import as_process
from chunkflow.cli.stages import main

if __name__ == "__main__":
    as_process(lambda: main(2))
