"""``python -m chunkflow ...``: the ``chunkflow`` command, for when pip's script directory is not
on PATH (pyenv before a rehash, a venv that is not activated)."""
from chunkflow.cli import console

if __name__ == "__main__":
    console()
