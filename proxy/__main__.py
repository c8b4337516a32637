"""``python -m proxy``: the console script."""

import sys

from .server import main

sys.exit(main())
