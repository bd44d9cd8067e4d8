"""`python -m treegrpo` runs the command line (same as the `treegrpo` script)."""

import sys

from treegrpo.cli import main

if __name__ == "__main__":
    sys.exit(main())
