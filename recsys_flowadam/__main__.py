"""`python -m recsys_flowadam` is the `recsys-flowadam` command."""

import sys

from recsys_flowadam.cli import main

sys.exit(main())
