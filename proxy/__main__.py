"""`python -m proxy` runs the pgscout command line."""

import sys

from .cli import main

sys.exit(main())
