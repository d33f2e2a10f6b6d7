"""``python -m grym``: the same as the ``grym`` command."""

import sys

from grym.cli import main

sys.exit(main())
