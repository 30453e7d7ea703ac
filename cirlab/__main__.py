"""``python -m cirlab``: the ``cirlab`` command (``python -m cirlab.cli`` also works, as torchrun uses it)."""
from cirlab.cli import console

if __name__ == "__main__":
    console()
