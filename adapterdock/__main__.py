"""`python -m adapterdock ...` is `adapterdock ...`."""

import sys

from adapterdock.cli import main

sys.exit(main())
