"""``python -m srlora.experiments``: the ``srlora`` command."""

import sys

from . import main

sys.exit(main())
