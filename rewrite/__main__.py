"""`python -m rewrite ...` runs the `rewrite` command line (see rewrite.cli)."""

import sys

from rewrite.cli import main

if __name__ == "__main__":
    sys.exit(main())
