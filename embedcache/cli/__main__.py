"""``python -m embedcache.cli``: the ``embedcache`` command."""

import sys

from embedcache.cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
