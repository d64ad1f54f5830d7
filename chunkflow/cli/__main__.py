"""``python -m chunkflow.cli``: the ``chunkflow`` command."""
from chunkflow.cli import console

if __name__ == "__main__":
    console()
