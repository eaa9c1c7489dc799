"""`python -m proxy` runs the pgscout command line."""

import sys

from pgscout.cli import main

sys.exit(main())
