"""``python -m cirlab``: the ``cirlab`` command (``python -m cirlab.cli`` also works, as torchrun uses it)."""
import sys

from cirlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
