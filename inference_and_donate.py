#!/usr/bin/env python
"""Stage one: convnet inference over a block's chunk, core written, margins donated.

    python inference_and_donate.py run JOB --blocks all      blocks of a planned job, in this process
    python inference_and_donate.py worker QUEUE [--wait]     a fleet worker leasing tasks from fq:// or sqs://

Run `python inference_and_donate.py run --help` or `python inference_and_donate.py worker --help` for every flag.
"""
from chunkflow.cli.common import as_process
from chunkflow.cli.stages import main

if __name__ == "__main__":
    as_process(lambda: main(1))
