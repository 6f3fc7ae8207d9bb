"""``python -m metactl`` is the ``metactl`` command."""

import sys

from .cli import main

sys.exit(main())
