"""Entry point of `python -m myq`: see `myq.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
