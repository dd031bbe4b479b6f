"""`python -m server [flags]`: the same as `adapterdock serve [flags]` (see `server.cli`)."""

import sys

from server.cli import main

if __name__ == "__main__":
    sys.exit(main())
