"""`python -m medseg` is the same as the `medseg` console script."""

import sys

from medseg.cli import main

if __name__ == "__main__":
    sys.exit(main())
