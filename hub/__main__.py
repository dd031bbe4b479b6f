"""`python -m hub ...` is `adapterdock hub ...`."""

import sys

from hub.cli import main

sys.exit(main())
