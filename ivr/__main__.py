"""`python -m ivr ...`: the `ivr` command, from a checkout or the app's root."""

import sys

from .cli import main

sys.exit(main())
