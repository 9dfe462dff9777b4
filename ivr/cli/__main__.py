"""`python -m ivr.cli ...`: the `ivr` command, as `python -m ivr` runs it."""

import sys

from .commands import main

sys.exit(main())
