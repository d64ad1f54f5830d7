#!/usr/bin/env python
"""Stage one: convnet inference over a block's chunk, core written, margins donated.

    python inference_and_donate.py JOB --blocks all [--device cuda:0] [--batch-size 8]

Run `python inference_and_donate.py --help` for every flag.
"""
import fire

from chunkflow.cli_stages import inference_and_donate

if __name__ == "__main__":
    fire.Fire(inference_and_donate, name="inference_and_donate.py")
