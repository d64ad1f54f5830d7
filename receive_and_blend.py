#!/usr/bin/env python
"""Stage two: fetch the donations of a block, add them into its band, write aligned output.

    python receive_and_blend.py JOB --blocks all [--cleanup]

Run `python receive_and_blend.py --help` for every flag.
"""
import fire

from chunkflow.cli_stages import receive_and_blend

if __name__ == "__main__":
    fire.Fire(receive_and_blend, name="receive_and_blend.py")
