"""`python -m trainers TASK ...` is `adapterdock train TASK ...` (see trainers.cli)."""

import sys

from trainers.cli import main

sys.exit(main())
