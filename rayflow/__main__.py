"""``python -m rayflow``: the same as the ``rayflow`` command."""

import sys

from rayflow.cli import main

sys.exit(main())
