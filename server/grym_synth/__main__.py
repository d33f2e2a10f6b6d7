"""``python -m grym_synth``: the same as the ``grym-synth`` command."""

import sys

from grym_synth.cli import main

sys.exit(main())
